"""Scan readers under arbitrary bytes: a file is either cut into patches or given a reason."""

from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anogan_batch.io.readers import READERS, ReadOptions, check_size, read_npy
from anogan_batch.io.storage import Listed
from anogan_batch.job.ingest import process_file
from anogan_batch.job.ingest_config import IngestConfig
from tests.corpus import npy_bomb, valid_files

CFG = IngestConfig(patch_size=16, max_pixels=2**20)
VALID = valid_files()
EXTS = sorted(VALID)


def ingest_bytes(data: bytes, ext: str) -> tuple[list[dict], list[dict]]:
    """One file through both phases of ingest: its rows and scan rows (a slide's work units,
    when its plan has several, run and settled)."""
    import pyarrow.dataset as pads

    from anogan_batch.job.ingest import run_units, settle_units, unit_items

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "scan" + ext)
        with open(path, "wb") as f:
            f.write(data)
        listed = Listed(path, "scan" + ext, len(data))
        rows, scans = process_file(listed, d, CFG)
        items = unit_items(scans, {listed.shown: listed})
        if items:
            out = os.path.join(d, "out")
            os.makedirs(out)
            scans = settle_units(scans, run_units(items, out, CFG, use_ray=False))
            rows += pads.dataset(out, format="parquet").to_table().to_pylist()
        return rows, scans


def check_outcome(rows: list[dict], scans: list[dict]) -> None:
    """Each image is a scan row with patches, or a scan row with a reason; ids never repeat."""
    assert scans, "a file always leaves at least one scan row"
    for scan in scans:
        if scan["reason"] is None:  # a read scan: its geometry is recorded
            assert scan["height"] >= 16 and scan["width"] >= 16 and scan["n_patches"] > 0
        else:
            assert isinstance(scan["reason"], str) and scan["reason"].strip()
            assert scan["n_patches"] == 0
    ids = [r["patch_id"] for r in rows]
    assert len(ids) == len(set(ids))
    assert sum(s["n_patches"] for s in scans if s["reason"] is None) == len(rows)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048), st.sampled_from(EXTS))
def test_random_bytes_never_escape_the_reader(data, ext):
    check_outcome(*ingest_bytes(data, ext))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(EXTS),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_damaged_valid_files_never_escape_the_reader(ext, flips, cut):
    data = bytearray(VALID[ext])
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    check_outcome(*ingest_bytes(bytes(data), ext))


def test_valid_files_of_every_format_are_read():
    for ext in EXTS:
        rows, scans = ingest_bytes(VALID[ext], ext)
        assert [s["reason"] for s in scans] == [None] and len(rows) == 4, ext


def test_headers_are_checked_before_anything_is_allocated():
    opts = ReadOptions(max_pixels=1000)
    check_size(1000, opts, "x")
    for declared in (1001, 10**12):
        with pytest.raises(ValueError, match=f"declares {declared:,} values"):
            check_size(declared, opts, "x")
    with pytest.raises(ValueError, match="declares 10,000,000,000 values"):
        read_npy(npy_bomb(), ReadOptions())


def test_every_format_has_a_reader():
    assert set(READERS) >= set(EXTS)


def test_nifti_volumes_are_cut_along_k_with_their_scaling():
    import gzip

    import numpy as np

    from anogan_batch.io.readers import read_nifti
    from tests.corpus import nifti_bytes

    volume = np.arange(5 * 6 * 3, dtype=np.int16).reshape(5, 6, 3)
    for raw in (nifti_bytes(volume, slope=2.0), gzip.compress(nifti_bytes(volume, slope=2.0))):
        images = read_nifti(raw, ReadOptions())
        assert [img.suffix for img in images] == ["@0000", "@0001", "@0002"]
        for k, img in enumerate(images):
            np.testing.assert_array_equal(img.values, volume[:, :, k] * 2.0)


def test_a_nifti_is_checked_before_a_voxel_is_decompressed_or_allocated(monkeypatch):
    import gzip

    from anogan_batch.io.readers import read_nifti
    from tests.corpus import nifti_bombs

    bombs = nifti_bombs()
    with pytest.raises(ValueError, match="declares 10,240,000,000 values"):
        read_nifti(bombs[".nii"], ReadOptions())
    # 4 x 4 x 4 declared, 200 MB of zeros after: only the declared bytes are decompressed
    decompressed = []
    real_read = gzip.GzipFile.read

    def counting_read(self, size=-1):
        data = real_read(self, size)
        decompressed.append(len(data))
        return data

    monkeypatch.setattr(gzip.GzipFile, "read", counting_read)
    images = read_nifti(bombs[".nii.gz"], ReadOptions())
    assert len(images) == 4 and images[0].values.shape == (4, 4)
    assert sum(decompressed) < 2**21  # the header's read and the declared voxels, not 200 MB


def test_nifti_file_names_lose_both_suffixes():
    from anogan_batch.io.readers import suffix_of
    from anogan_batch.job.ingest import scan_id_for

    assert suffix_of("ct/Head.NII.GZ") == ".nii.gz" and scan_id_for("ct/head.nii.gz") == "ct/head"
    assert suffix_of("a.tar.gz") == ".gz" and scan_id_for("a.tar.gz") == "a.tar"
    assert suffix_of(".nii.gz") == ".gz" and scan_id_for("x/.hidden") == "x/.hidden"


def test_a_tiff_declaring_more_strips_than_it_lists_is_refused_unread():
    """A flipped bit makes the header declare a 32,800-row image over one strip: the file's
    own offsets bound what it may be, before a grid or a read is sized from the header."""
    data = bytearray(VALID[".tif"])
    data[31] = 128  # ImageLength 32 -> 32,800
    rows, scans = ingest_bytes(bytes(data), ".tif")
    assert rows == [] and len(scans) == 1
    assert "declares a 32800x32 image of 1,025 strips but lists 1" in scans[0]["reason"]


def test_a_dicom_whole_slide_image_is_quarantined_with_what_to_do(tmp_path):
    """A DICOM WSI is a pyramid of tiled frames, not a CT slice: refused with the way out."""
    import numpy as np
    from pydicom import dcmread

    from tests.corpus import write_dicom

    write_dicom(tmp_path / "wsi.dcm", np.zeros((32, 32), np.uint16))
    ds = dcmread(tmp_path / "wsi.dcm")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
    ds.save_as(tmp_path / "wsi.dcm")
    rows, scans = ingest_bytes((tmp_path / "wsi.dcm").read_bytes(), ".dcm")
    assert rows == [] and "DICOM whole-slide image" in scans[0]["reason"]
    assert "pyramidal TIFF" in scans[0]["reason"]


def test_a_nifti_is_read_a_slab_at_a_time_and_a_short_one_keeps_its_first_slices(
    tmp_path, monkeypatch
):
    import gzip
    import json

    import numpy as np
    import pyarrow.parquet as pq

    from anogan_batch.job.ingest import ingest
    from tests.corpus import nifti_bytes

    volume = np.arange(32 * 48 * 6, dtype=np.uint16).reshape(32, 48, 6) % 4000
    raw = gzip.compress(nifti_bytes(volume))
    reads = []
    real_read = gzip.GzipFile.read

    def counting(self, size=-1):
        reads.append(size)
        return real_read(self, size)

    monkeypatch.setattr(gzip.GzipFile, "read", counting)
    from anogan_batch.io.readers import read_nifti

    slices = [img.values for img in read_nifti(raw, ReadOptions())]
    assert all(np.array_equal(s, volume[:, :, k]) for k, s in enumerate(slices))
    slab = 32 * 48 * 2
    assert all(r == 2**20 or r <= slab for r in reads if r > 0)  # the header's, then slabs
    # cut short after 2.5 slices: slices 0 and 1 are ingested, slice 2 says why, one scan
    src = tmp_path / "src"
    src.mkdir()
    whole = nifti_bytes(volume)
    (src / "ct.nii").write_bytes(whole[: len(whole) - int(3.5 * 32 * 48 * 2)])
    summary = ingest(str(src), str(tmp_path / "out"), IngestConfig(patch_size=16))
    assert summary.patches == 2 * 2 * 3 and summary.scans == 1
    (good,) = {json.loads(s["source"])["axis_codes"].__str__() for s in
               pq.read_table(tmp_path / "out" / "_scans.parquet").to_pylist()}  # fmt: skip
    assert good == "['R', 'A', 'S']"  # nibabel's identity affine, kept with the scan
    (bad,) = pq.read_table(tmp_path / "out" / "_quarantine.parquet").to_pylist()
    assert bad["path"].endswith("ct.nii@0002") and "ends at slice 2" in bad["reason"]


def test_a_multi_frame_dicom_is_one_volume_in_position_order_decoded_frame_by_frame(
    tmp_path, monkeypatch
):
    """An enhanced multi-frame CT whose frames are stored out of position order: the volume
    comes out in position order, one frame decoded at a time."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from anogan_batch.io.readers import read_dicom

    z = [10.0, 0.0, 5.0, 15.0]  # frame k sits at z[k]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames = 16, 16, len(z)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for depth in z:
        position = Dataset()
        position.ImagePositionPatient = [0, 0, depth]
        group = Dataset()
        group.PlanePositionSequence = Sequence([position])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    pixels = np.stack([np.full((16, 16), 100 + int(d), np.uint16) for d in z])
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    decoded = []
    import pydicom.pixels

    real = pydicom.pixels.pixel_array

    def counting(*args, **kwargs):
        decoded.append(kwargs.get("index"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pydicom.pixels, "pixel_array", counting)
    images = read_dicom((tmp_path / "mf.dcm").read_bytes(), ReadOptions())
    assert images.info == {"frames": 4, "ordered_by": "position"} and decoded == []
    values = [int(img.values[0, 0]) for img in images]
    assert values == [100, 105, 110, 115]  # position order
    assert decoded == [1, 2, 0, 3]  # one frame a call, when iterated
