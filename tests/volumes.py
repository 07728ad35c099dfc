"""Committed generators of DICOM series for the tests: one file per slice, written by pydicom,
with the geometry a scanner writes (series and frame-of-reference UIDs, orientation, position,
spacing) and the faults archives hold (shuffled names, unreliable InstanceNumber, a scout at
another orientation, gaps, duplicates)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def write_slice(
    path: Path, pixels: np.ndarray, *, series: str, frame: str, position, orientation=AXIAL,
    instance: int | None = None, spacing=(0.7, 0.7),
) -> None:  # fmt: skip
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
    ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series, frame
    ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
    ds.ImagePositionPatient = [f"{v:g}" for v in position]
    ds.PixelSpacing = [f"{v:g}" for v in spacing]
    if instance is not None:
        ds.InstanceNumber = instance
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, 0.0
    ds.PixelData = pixels.astype("<u2").tobytes()
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
