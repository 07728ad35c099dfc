"""`anogan-batch bench --volumes`: a generated 300-slice DICOM series (one file a slice, shuffled
names, unreliable InstanceNumbers, plus a scout) and a 512 x 512 x 300 .nii.gz, each ingested as
its own `anogan-batch ingest` process: whether the series is one volume in position order with
the scout on its own, and every process's peak RSS. Also the generators of DICOM series the
tests use (tests/volumes.py): the geometry a scanner writes and the faults archives hold.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from anogan_batch.io.columns import PATH, SCAN_ID, SLICE
from anogan_batch.io.patches import INGEST_RECORD, SCANS_FILE

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def ct_dataset(
    pixels: np.ndarray, *, slope: float = 1.0, intercept: float = 0.0, bits: int = 12,
    pixel_data: bool = True,
):  # fmt: skip
    """A minimal valid CT-like DICOM dataset of `pixels` (uint16 words), written by pydicom's
    own classes; the caller adds geometry and saves it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if pixel_data:
        ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def write_slice(
    path: Path, pixels: np.ndarray, *, series: str, frame: str, position, orientation=AXIAL,
    instance: int | None = None, spacing=(0.7, 0.7),
) -> None:  # fmt: skip
    ds = ct_dataset(pixels)
    ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series, frame
    ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
    ds.ImagePositionPatient = [f"{v:g}" for v in position]
    ds.PixelSpacing = [f"{v:g}" for v in spacing]
    if instance is not None:
        ds.InstanceNumber = instance
    ds.save_as(path, enforce_file_format=True)


def write_series(
    folder: Path, n: int = 12, *, size: int = 32, spacing: float = 2.5,
    gap_after: int | None = None, duplicate: int | None = None, scout: bool = True,
    seed: int = 0,
) -> dict:  # fmt: skip
    """An axial series of `n` slices in `folder`, file names shuffled and InstanceNumbers
    scrambled; slice k's pixels are all 100 + k (so its place can be read back). Optionally a
    gap after slice `gap_after`, a second file at slice `duplicate`'s position, and a scout
    (one sagittal image of the same series). -> {"series", "order": names in slice order}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    series, frame = f"1.2.826.0.1.3680043.8.498.{seed + 1}", f"1.2.826.0.1.3680043.8.499.{seed}"
    names = [f"IM{v:05d}.dcm" for v in rng.permutation(10_000)[:n]]
    instances = rng.permutation(n) + 1  # unreliable: not the position order
    z = np.arange(n) * spacing
    if gap_after is not None:
        z[gap_after + 1 :] += 3 * spacing
    for k in range(n):
        pixels = np.full((size, size), 100 + k, np.uint16)
        write_slice(folder / names[k], pixels, series=series, frame=frame,
                    position=(-10.0, -10.0, -50.0 + z[k]), instance=int(instances[k]))  # fmt: skip
    if duplicate is not None:
        write_slice(folder / "DUP.dcm", np.full((size, size), 99, np.uint16), series=series,
                    frame=frame, position=(-10.0, -10.0, -50.0 + z[duplicate]))  # fmt: skip
    if scout:
        write_slice(folder / "SCOUT.dcm", np.full((size, size), 7, np.uint16), series=series,
                    frame=frame, position=(0.0, -10.0, 10.0), orientation=SAGITTAL)  # fmt: skip
    return {"series": series, "order": names}


def write_nifti_volume(path: Path, shape=(512, 512, 300), seed: int = 0) -> None:
    """A CT-like int16 volume (HU-ish values, a body ellipse) as .nii.gz, written by nibabel."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    h, w, n = shape
    yy, xx = np.ogrid[:h, :w]
    body = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 < 1
    volume = np.full(shape, -1000, np.int16)
    for k in range(n):
        volume[:, :, k][body] = (40 + rng.normal(0, 20, int(body.sum()))).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))


def run_volume_bench(folder: str | None = None, slices: int = 300) -> dict[str, Any]:
    """The figures of the module's docstring."""
    import pyarrow.parquet as pq

    from anogan_batch.evaluation.scale import _run_sampled

    root = Path(tempfile.mkdtemp(prefix="anogan-volumes-", dir=folder))
    made = write_series(root / "dicom" / "ct", slices, size=512, seed=1)
    (root / "nifti").mkdir()
    write_nifti_volume(root / "nifti" / "ct.nii.gz", (512, 512, slices))
    figures: dict[str, Any] = {"slices": slices}
    for name in ("dicom", "nifti"):
        out = root / f"{name}-patches"
        run = _run_sampled(["ingest", str(root / name), str(out), "--patch-size", "64",
                            "--window", "40,400", "--engine", "local"])  # fmt: skip
        scans = pq.read_table(out / SCANS_FILE).to_pylist()
        with open(out / INGEST_RECORD) as f:
            summary = json.load(f)
        figures[name] = {**run, "scans": summary["scans"], "patches": summary["patches"],
                         "file_mb": round(sum(p.stat().st_size for p in (root / name).rglob("*")
                                                  if p.is_file()) / 2**20, 1)}  # fmt: skip
        if name == "dicom":
            volume = [s for s in scans if s[SLICE] is not None]
            in_order = [os.path.basename(s[PATH]) for s in sorted(volume, key=lambda s: s[SLICE])]
            figures[name]["one_volume_in_position_order"] = in_order == made["order"]
            figures[name]["scout_on_its_own"] = any(s[SCAN_ID].endswith("/SCOUT")
                                                    for s in scans)  # fmt: skip
    return figures
