"""The patch table: schema, pixel encoding, and row validation.

Encoding (documented for users in docs/schema.md):

- `image` is `binary`: the patch's raw pixels, row-major (height, width, channels),
  little-endian, of type `dtype` (`uint8`, `uint16` or `float32`). Lossless by construction.
- `height`, `width`, `channels` (int32) and `dtype` (string) describe `image`. They are optional
  when reading: a table without them is read as the model's own shape and dtype, checked
  against the byte length.
- `residual_map` in the job output uses the same layout as float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from anogan_batch.errors import InputError

PATCH_SCHEMA = pa.schema(
    [
        ("patch_id", pa.string()),
        ("scan_id", pa.string()),
        ("x", pa.int32()),
        ("y", pa.int32()),
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int32()),
        ("dtype", pa.string()),
        ("label", pa.string()),
    ]
)
REQUIRED_COLUMNS = ("patch_id", "scan_id", "x", "y", "image")
SHAPE_COLUMNS = ("height", "width", "channels", "dtype")
DTYPES = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2"), "float32": np.dtype("<f4")}
# full scale of each stored dtype: model space is p / PIXEL_MAX * 2 - 1 (docs/schema.md)
PIXEL_MAX = {"uint8": 255.0, "uint16": 65535.0, "float32": 1.0}


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


def patch_id_for(scan_id: str, x: int, y: int, size: int) -> str:
    """Stable id: the scan and the patch's geometry, e.g. 'normal/00012#28x28+0+0'."""
    return f"{scan_id}#{size}x{size}+{x}+{y}"


def encode_pixels(pixels: np.ndarray) -> bytes:
    """(H, W) or (H, W, C) array of a supported dtype -> the `image` column's bytes."""
    name = pixels.dtype.name
    if name not in DTYPES:
        raise InputError(f"pixel dtype {name} is not supported (use one of {', '.join(DTYPES)})")
    return np.ascontiguousarray(pixels, dtype=DTYPES[name]).tobytes()


def check_columns(schema: pa.Schema, where: str) -> None:
    """Raise InputError naming the first required column that is missing or mistyped."""
    names = set(schema.names)
    for col in REQUIRED_COLUMNS:
        if col not in names:
            raise InputError(
                f"patch table '{where}' has no column '{col}'; required columns are "
                f"{', '.join(REQUIRED_COLUMNS)} (found: {', '.join(schema.names) or 'none'})"
            )
    for col in ("patch_id", "scan_id", "label", "dtype"):
        if (
            col in names
            and not pa.types.is_string(schema.field(col).type)
            and not (pa.types.is_large_string(schema.field(col).type))
        ):
            raise InputError(
                f"patch table '{where}': column '{col}' must be string, "
                f"found {schema.field(col).type}"
            )
    image_type = schema.field("image").type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise InputError(
            f"patch table '{where}': column 'image' must be binary (raw pixels), found {image_type}"
        )


def _column(table: pa.Table, name: str) -> np.ndarray | None:
    if name not in table.column_names:
        return None
    return table.column(name).to_numpy(zero_copy_only=False)


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


def decode_patches(table: pa.Table, spec: PatchSpec) -> tuple[np.ndarray, list[str | None]]:
    """Decode the `image` column into pixels (n, S, S, C) and a reason per bad row (else None).

    Bad rows get zeros in `pixels`; the caller must not score them. NaN and inf pixels of
    float32 tables are bad rows, as is a null `patch_id`.
    """
    n = table.num_rows
    reasons: list[str | None] = [None] * n
    pixels = np.zeros((n, spec.size, spec.size, spec.channels), dtype=DTYPES[spec.dtype])
    if n == 0:
        return pixels, reasons

    images = table.column("image").combine_chunks()
    heights, widths, chans = (_column(table, c) for c in ("height", "width", "channels"))
    dtypes = _column(table, "dtype")
    patch_ids = table.column("patch_id")
    id_nulls = patch_ids.is_null().to_numpy(zero_copy_only=False)

    values = images.to_pylist() if images.null_count else None
    offsets = np.frombuffer(images.buffers()[1], dtype=_offset_dtype(images.type))
    offsets = offsets[images.offset : images.offset + n + 1]
    lengths = np.diff(offsets)
    data = images.buffers()[2]
    count = spec.size * spec.size * spec.channels
    for i in range(n):
        if id_nulls[i]:
            reasons[i] = "patch_id is null"
            continue
        null = values is not None and values[i] is None
        shape = None
        if heights is not None and widths is not None and chans is not None:
            shape = (int(heights[i]), int(widths[i]), int(chans[i]))
        dtype = None if dtypes is None or dtypes[i] is None else str(dtypes[i])
        reasons[i] = row_problem(spec, None if null else int(lengths[i]), shape, dtype)
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


def encode_maps(maps: np.ndarray) -> list[bytes]:
    """(B, C, S, S) float32 maps from the search -> `residual_map` bytes in (S, S, C) layout."""
    hwc = np.ascontiguousarray(maps.transpose(0, 2, 3, 1), dtype="<f4")
    return [row.tobytes() for row in hwc]


def decode_map(raw: bytes, height: int, width: int, channels: int) -> np.ndarray:
    """One `residual_map` value -> float32 array (height, width, channels)."""
    return np.frombuffer(raw, dtype="<f4").reshape(height, width, channels)
