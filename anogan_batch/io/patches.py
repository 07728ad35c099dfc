"""The patch table: schema, pixel encoding, and row validation.

Encoding (documented for users in docs/schema.md):

- `image` is `binary`: the patch's raw pixels, row-major (height, width, channels),
  little-endian, of type `dtype` (`uint8`, `uint16` or `float32`). Lossless by construction.
- `height`, `width`, `channels` (int32) and `dtype` (string) describe `image`. They are optional
  when reading: a table without them is read as the model's own shape and dtype, checked
  against the byte length.
- `residual_map` in the job output uses the same layout, as float16 (`--residual-maps
  compact`, the default) or float32; the byte length tells which (2 or 4 bytes a value), so a
  table that grew over jobs of both kinds reads as one (`decode_map`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from anogan_batch.errors import InputError
from anogan_batch.io.columns import (
    DTYPE,
    IMAGE,
    INT_COLUMNS,
    PATCH_ID,
    REQUIRED_COLUMNS,
    SCAN_ID,
    SHAPE_COLUMNS,
    STRING_COLUMNS,
    X,
    Y,
    ingest_schema,
    patch_schema,
)

# The patch table's columns (io/columns.py owns them); what ingest writes adds the slice, the
# level and the µm per pixel read
PATCH_SCHEMA = patch_schema()
INGEST_SCHEMA = ingest_schema()
# What ingest writes beside a patch table's part files (docs/schema.md): its counts and pixel
# normalisation (job/ingest.IngestSummary), a row a scan, a row an unreadable file or region
INGEST_RECORD = "_ingest.json"
SCANS_FILE = "_scans.parquet"
QUARANTINE_FILE = "_quarantine.parquet"
DTYPES = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2"), "float32": np.dtype("<f4")}


@dataclass(frozen=True)
class PatchSpec:
    """What a model reads: square patches of `size` x `size` x `channels` of `dtype`."""

    size: int
    channels: int
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.size * self.size * self.channels * DTYPES[self.dtype].itemsize

    def describe(self) -> str:
        return f"{self.size}x{self.size}x{self.channels} {self.dtype}"


def patch_id_for(scan_id: str, x: int, y: int, size: int, slice_: int | None = None) -> str:
    """Stable id: the scan (and the slice of a volume) and the patch's geometry, e.g.
    'normal/00012#28x28+0+0', 'ct01@0007#64x64+0+64'."""
    where = scan_id if slice_ is None else f"{scan_id}@{slice_:04d}"
    return f"{where}#{size}x{size}+{x}+{y}"


def encode_pixels(pixels: np.ndarray) -> bytes:
    """(H, W) or (H, W, C) array of a supported dtype -> the `image` column's bytes."""
    name = pixels.dtype.name
    if name not in DTYPES:
        raise InputError(f"pixel dtype {name} is not supported (use one of {', '.join(DTYPES)})")
    if pixels.dtype == DTYPES[name]:  # native order already: one copy, to bytes
        return pixels.tobytes()
    return np.ascontiguousarray(pixels, dtype=DTYPES[name]).tobytes()


POSITION_MAX = 2**31 - 1  # x and y are int32 in every output table


def check_columns(schema: pa.Schema, where: str) -> None:
    """Raise InputError naming the first required column that is missing or mistyped.

    An optional column whose every value is null (Parquet type `null`, as pandas writes an
    empty column) is accepted; a required one is not.
    """
    names = set(schema.names)
    for col in REQUIRED_COLUMNS:
        if col not in names:
            raise InputError(
                f"patch table '{where}' has no column '{col}'; required columns are "
                f"{', '.join(REQUIRED_COLUMNS)} (found: {', '.join(schema.names) or 'none'})"
            )
    for col in names & set(STRING_COLUMNS + INT_COLUMNS + (IMAGE,)):
        typ = schema.field(col).type
        if pa.types.is_null(typ):
            if col in REQUIRED_COLUMNS:
                raise InputError(
                    f"patch table '{where}': column '{col}' is null in every row (type null); "
                    "it is required"
                )
        elif col == IMAGE and not (pa.types.is_binary(typ) or pa.types.is_large_binary(typ)):
            raise InputError(
                f"patch table '{where}': column 'image' must be binary (raw pixels), found {typ}"
            )
        elif col in STRING_COLUMNS and not (
            pa.types.is_string(typ) or pa.types.is_large_string(typ)
        ):
            raise InputError(f"patch table '{where}': column '{col}' must be string, found {typ}")
        elif col in INT_COLUMNS and not pa.types.is_integer(typ):
            raise InputError(f"patch table '{where}': column '{col}' must be integer, found {typ}")


def int32_or_null(table: pa.Table, name: str) -> pa.Array:
    """An integer column as int32, null where it is null, absent or does not fit int32."""
    if name not in table.column_names:
        return pa.nulls(table.num_rows, pa.int32())
    values = table.column(name).to_pylist()
    return pa.array([v if v is not None and -(2**31) <= v < 2**31 else None for v in values],
                    pa.int32())  # fmt: skip


def identity_problems(table: pa.Table) -> list[str | None]:
    """Why each row cannot be placed (null ids, bad x/y), or None: checked before pixels.
    Columns the caller did not read (training reads no positions) are not checked."""
    n = table.num_rows
    reasons: list[str | None] = [None] * n
    names = [c for c in (PATCH_ID, SCAN_ID, X, Y) if c in table.column_names]
    columns = {c: table.column(c).to_pylist() for c in names}
    for i in range(n):
        for col in names:
            value = columns[col][i]
            if value is None:
                reasons[i] = f"{col} is null"
            elif col in (X, Y) and not 0 <= value <= POSITION_MAX:
                reasons[i] = f"{col} is {value}, outside 0..{POSITION_MAX}"
            else:
                continue
            break
    return reasons


def row_problem(
    spec: PatchSpec,
    nbytes: int | None,
    shape: tuple[int, int, int] | None,
    dtype: str | None,
) -> str | None:
    """Why a row cannot be read as `spec`, or None if it can."""
    if nbytes is None:
        return "image is null"
    if dtype is not None and dtype != spec.dtype:
        return f"pixel dtype {dtype}, model expects {spec.dtype}"
    if shape is not None and shape != (spec.size, spec.size, spec.channels):
        h, w, c = shape
        return f"patch is {h}x{w}x{c}, model expects {spec.size}x{spec.size}x{spec.channels}"
    if nbytes != spec.nbytes:
        return f"image has {nbytes} bytes, {spec.describe()} needs {spec.nbytes}"
    return None


def _shapes(table: pa.Table) -> list[tuple[int, int, int] | None]:
    """Each row's (height, width, channels), or None where the table does not say (columns
    absent, or a null in the row): such a row is checked by its byte length alone."""
    n = table.num_rows
    if not all(c in table.column_names for c in SHAPE_COLUMNS):
        return [None] * n
    h, w, c = (table.column(name).to_pylist() for name in SHAPE_COLUMNS)
    return [None if None in s else s for s in zip(h, w, c, strict=True)]


def decode_patches(table: pa.Table, spec: PatchSpec) -> tuple[np.ndarray, list[str | None]]:
    """Decode the `image` column into pixels (n, S, S, C) and a reason per bad row (else None).

    Bad rows get zeros in `pixels`; the caller must not score them. A row is bad when its
    id, scan or position cannot be recorded (`identity_problems`), when its bytes are not one
    patch of the model's shape and dtype, or when a float32 patch holds NaN or inf.
    """
    n = table.num_rows
    reasons: list[str | None] = [None] * n
    pixels = np.zeros((n, spec.size, spec.size, spec.channels), dtype=DTYPES[spec.dtype])
    if n == 0:
        return pixels, reasons

    images = table.column(IMAGE).combine_chunks()
    if pa.types.is_null(images.type):
        images = pa.nulls(n, pa.binary())
    shapes = _shapes(table)
    dtypes = table.column(DTYPE).to_pylist() if DTYPE in table.column_names else [None] * n
    reasons = identity_problems(table)

    nulls = images.is_null().to_numpy(zero_copy_only=False)
    offsets = np.frombuffer(images.buffers()[1], dtype=_offset_dtype(images.type))
    offsets = offsets[images.offset : images.offset + n + 1]
    lengths = np.diff(offsets)
    data = images.buffers()[2]
    count = spec.size * spec.size * spec.channels
    for i in range(n):
        if reasons[i] is not None:
            continue
        nbytes = None if nulls[i] else int(lengths[i])
        reasons[i] = row_problem(spec, nbytes, shapes[i], dtypes[i])
        if reasons[i] is None:
            start = int(offsets[i])
            row = np.frombuffer(data, dtype=DTYPES[spec.dtype], count=count, offset=start)
            pixels[i] = row.reshape(spec.size, spec.size, spec.channels)
    if spec.dtype == "float32":
        bad = ~np.isfinite(pixels).reshape(n, -1)
        for i in np.flatnonzero(bad.any(axis=1)):
            if reasons[i] is None:
                reasons[i] = f"image has {int(bad[i].sum())} NaN/inf pixels"
                pixels[i] = 0
    return pixels, reasons


def _offset_dtype(t: pa.DataType) -> np.dtype:
    return np.dtype("<i8") if pa.types.is_large_binary(t) else np.dtype("<i4")


# How `residual_map` is stored (score's --residual-maps, job/score_config.RESIDUAL_MAPS; the scorer
# encodes it): float16 keeps a value of the map (0 to 2) within 2^-11 of itself, relative, at
# half the bytes of float32
MAP_DTYPES = {"compact": np.dtype("<f2"), "float32": np.dtype("<f4")}


def decode_map(raw: bytes, height: int, width: int, channels: int) -> np.ndarray:
    """One `residual_map` value (float16 or float32, by its length) -> float32 array
    (height, width, channels). ValueError when the length fits neither."""
    values = height * width * channels
    for dtype in MAP_DTYPES.values():
        if len(raw) == values * dtype.itemsize:
            return (
                np.frombuffer(raw, dtype=dtype).astype(np.float32).reshape(height, width, channels)
            )
    raise ValueError(f"residual_map of {len(raw)} bytes is no {height}x{width}x{channels} map")
