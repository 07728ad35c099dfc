"""A patch table's patches in memory, for training and calibrating: the rows of the normal
label, decoded, checked and fingerprinted (the fingerprint goes into model.json)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from anogan_batch.core.model_config import TrainConfig
from anogan_batch.errors import InputError
from anogan_batch.io.columns import (
    CHANNELS,
    DTYPE,
    HEIGHT,
    IMAGE,
    LABEL,
    PATCH_ID,
    SCAN_ID,
    SHAPE_COLUMNS,
    WIDTH,
)


@dataclass
class TrainingData:
    pixels: np.ndarray  # (N, S, S, C) of the table's dtype
    dtype: str
    fingerprint: str  # sha256 over (patch_id, image bytes) in patch_id order
    skipped: int  # rows not readable as the first row's shape/dtype
    patch_ids: list[str] = field(default_factory=list)  # of `pixels`, row for row
    scan_ids: list[str] = field(default_factory=list)  # (the patch_id where there is none)


def load_training_patches(path: str, cfg: TrainConfig) -> TrainingData:
    """Read the normal patches of a patch table into memory, checked and fingerprinted."""
    import pyarrow.dataset as pads

    from anogan_batch.io.patches import decode_patches
    from anogan_batch.io.tables import open_patch_table

    ds = open_patch_table(path)
    filt = None
    if cfg.normal_label is not None:
        if LABEL not in ds.schema.names:
            raise InputError(
                f"--normal-label {cfg.normal_label!r} given, but '{path}' has no 'label' column"
            )
        filt = pads.field(LABEL) == cfg.normal_label
    cols = [
        c
        for c in (PATCH_ID, SCAN_ID, IMAGE, HEIGHT, WIDTH, CHANNELS, DTYPE)
        if c in ds.schema.names
    ]
    table = ds.to_table(columns=cols, filter=filt)
    if table.num_rows == 0:
        which = f"with label {cfg.normal_label!r} " if cfg.normal_label is not None else ""
        raise InputError(f"patch table '{path}' has no rows {which}to train on")
    table = table.sort_by(PATCH_ID)
    if cfg.max_patches is not None:
        table = table.slice(0, cfg.max_patches)

    spec = _spec_of_first_row(table, path)
    pixels, reasons = decode_patches(table, spec)
    ok = np.array([r is None for r in reasons])
    if not ok.any():
        raise InputError(f"patch table '{path}': no readable rows; first problem: {reasons[0]}")
    digest = hashlib.sha256()
    ids = table.column(PATCH_ID).to_pylist()
    scans = table.column(SCAN_ID).to_pylist() if SCAN_ID in table.column_names else ids
    for i in np.flatnonzero(ok):
        digest.update(ids[i].encode() + b"\0" + pixels[i].tobytes())
    kept = np.flatnonzero(ok)
    return TrainingData(
        pixels[ok],
        spec.dtype,
        digest.hexdigest(),
        int((~ok).sum()),
        [ids[i] for i in kept],
        [scans[i] if scans[i] is not None else ids[i] for i in kept],
    )


def _spec_of_first_row(table, path: str):
    from anogan_batch.io.patches import DTYPES, PatchSpec

    names = table.column_names
    if all(c in names for c in (*SHAPE_COLUMNS, DTYPE)):
        h, w, c, dt = (table.column(k)[0].as_py() for k in (*SHAPE_COLUMNS, DTYPE))
        if h != w:
            raise InputError(f"patch table '{path}': patches are {h}x{w}; only square patches")
        if dt not in DTYPES:
            raise InputError(f"patch table '{path}': unsupported pixel dtype {dt!r}")
        return PatchSpec(int(h), int(c), dt)
    raise InputError(
        f"patch table '{path}' has no height/width/channels/dtype columns, which training "
        "needs to know the patch shape (anogan-batch ingest writes them)"
    )
