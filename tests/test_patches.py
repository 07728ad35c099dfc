"""Patch table encoding: lossless round trips and a reason for every bad row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anogan_batch.errors import InputError
from anogan_batch.io.patches import (
    PATCH_SCHEMA,
    PatchSpec,
    check_columns,
    decode_map,
    decode_patches,
    encode_pixels,
)


def table_of(images, shapes=None, dtype="uint8", ids=None):
    n = len(images)
    shapes = shapes or [(8, 8, 1)] * n
    return pa.table(
        {
            "patch_id": ids or [f"p{i}" for i in range(n)],
            "scan_id": ["s"] * n,
            "x": pa.array([0] * n, pa.int32()),
            "y": pa.array([0] * n, pa.int32()),
            "image": pa.array(images, pa.binary()),
            "height": pa.array([s[0] for s in shapes], pa.int32()),
            "width": pa.array([s[1] for s in shapes], pa.int32()),
            "channels": pa.array([s[2] for s in shapes], pa.int32()),
            "dtype": [dtype] * n,
            "label": [None] * n,
        },
        schema=PATCH_SCHEMA,
    )


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_is_lossless(dtype, channels):
    rng = np.random.default_rng(0)
    if dtype == "float32":
        pixels = rng.random((5, 8, 8, channels), dtype=np.float32)
    else:
        pixels = rng.integers(0, np.iinfo(dtype).max, (5, 8, 8, channels)).astype(dtype)
    table = table_of([encode_pixels(p) for p in pixels], [(8, 8, channels)] * 5, dtype)
    decoded, reasons = decode_patches(table, PatchSpec(8, channels, dtype))
    assert reasons == [None] * 5
    np.testing.assert_array_equal(decoded, pixels)


def test_bad_rows_get_reasons():
    good = np.zeros((8, 8, 1), np.float32)
    nan = good.copy()
    nan[0, 0, 0] = np.nan
    inf = good.copy()
    inf[1, 1, 0] = np.inf
    table = table_of(
        [
            encode_pixels(good),
            encode_pixels(nan),
            encode_pixels(inf),
            None,
            encode_pixels(np.zeros((4, 4, 1), np.float32)),
            b"\x00" * 7,
        ],
        [(8, 8, 1), (8, 8, 1), (8, 8, 1), (8, 8, 1), (4, 4, 1), (8, 8, 1)],
        "float32",
    )
    _, reasons = decode_patches(table, PatchSpec(8, 1, "float32"))
    assert reasons[0] is None
    assert reasons[1] == "image has 1 NaN/inf pixels"
    assert reasons[2] == "image has 1 NaN/inf pixels"
    assert reasons[3] == "image is null"
    assert reasons[4] == "patch is 4x4x1, model expects 8x8x1"
    assert reasons[5] == "image has 7 bytes, 8x8x1 float32 needs 256"


def test_wrong_channels_and_dtype():
    rgb = encode_pixels(np.zeros((8, 8, 3), np.uint8))
    table = table_of([rgb], [(8, 8, 3)])
    _, reasons = decode_patches(table, PatchSpec(8, 1, "uint8"))
    assert reasons == ["patch is 8x8x3, model expects 8x8x1"]
    _, reasons = decode_patches(table_of([rgb], [(8, 8, 3)]), PatchSpec(8, 3, "uint16"))
    assert reasons == ["pixel dtype uint8, model expects uint16"]


def test_null_patch_id_is_a_bad_row():
    table = table_of([encode_pixels(np.zeros((8, 8, 1), np.uint8))], ids=[None])
    assert decode_patches(table, PatchSpec(8, 1, "uint8"))[1] == ["patch_id is null"]


def test_missing_shape_columns_fall_back_to_byte_length():
    table = table_of([encode_pixels(np.ones((8, 8, 1), np.uint8)), b"\x01" * 10])
    table = table.drop_columns(["height", "width", "channels", "dtype"])
    pixels, reasons = decode_patches(table, PatchSpec(8, 1, "uint8"))
    assert reasons == [None, "image has 10 bytes, 8x8x1 uint8 needs 64"]
    assert pixels[0].sum() == 64


def test_check_columns_names_the_missing_column():
    with pytest.raises(InputError, match="no column 'image'"):
        check_columns(PATCH_SCHEMA.remove(PATCH_SCHEMA.get_field_index("image")), "t")
    bad = pa.schema([(f.name, pa.int64() if f.name == "image" else f.type) for f in PATCH_SCHEMA])
    with pytest.raises(InputError, match="'image' must be binary"):
        check_columns(bad, "t")


def test_residual_map_layout():
    from anogan_batch.job.scorer import encode_maps

    maps = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)  # (B, C, H, W)
    for encoding in ("float32", "compact"):  # integers up to 95: exact in float16 too
        raw = encode_maps(maps, encoding)
        back = decode_map(raw[1], 4, 4, 3)  # (H, W, C)
        np.testing.assert_array_equal(back, maps[1].transpose(1, 2, 0))
    assert encode_maps(maps, "none") == [None, None]
    with pytest.raises(ValueError, match="no 4x4x3 map"):
        decode_map(b"\0" * 10, 4, 4, 3)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_compact_maps_stay_within_their_documented_error(channels, side, seed):
    """A residual map's values lie in [0, 2] (pixels in [-1, 1]); float16 keeps each within
    2^-11 of itself, relative, and within 2^-25 absolute near zero (docs/schema.md)."""
    from anogan_batch.job.scorer import encode_maps

    rng = np.random.default_rng(seed)
    maps = (rng.random((3, channels, side, side)) ** rng.uniform(1, 8) * 2).astype(np.float32)
    for raw, want in zip(encode_maps(maps, "compact"), maps, strict=True):
        assert len(raw) == 2 * channels * side * side  # half of float32's bytes
        got = decode_map(raw, side, side, channels)
        exact = want.transpose(1, 2, 0)
        assert np.all(np.abs(got - exact) <= np.maximum(2**-11 * exact, 2**-25))


# ---- property: any table, any row ------------------------------------------------------------

SPEC = PatchSpec(4, 1, "uint8")
maybe_int = st.one_of(st.none(), st.integers(-(2**40), 2**40), st.sampled_from([0, 4, 2**31 - 1]))
row = st.fixed_dictionaries(
    {
        "patch_id": st.one_of(st.none(), st.text(max_size=20)),
        "scan_id": st.one_of(st.none(), st.text(max_size=20)),
        "x": maybe_int,
        "y": maybe_int,
        "image": st.one_of(st.none(), st.binary(min_size=16, max_size=16), st.binary(max_size=40)),
        "height": st.one_of(st.none(), st.just(4), st.integers(-5, 2**31 - 1)),
        "width": st.one_of(st.none(), st.just(4), st.integers(-5, 50)),
        "channels": st.one_of(st.none(), st.just(1), st.integers(-1, 4)),
        "dtype": st.one_of(st.none(), st.sampled_from(["uint8", "uint16", "float32", "O", ""])),
    }
)


def expected_reason(r: dict) -> str | None:
    """An independent statement of which rows can be scored as SPEC."""
    for col in ("patch_id", "scan_id", "x", "y"):
        if r[col] is None:
            return f"{col} is null"
        if col in ("x", "y") and not 0 <= r[col] < 2**31:
            return "outside"
    if r["image"] is None:
        return "image is null"
    if r["dtype"] is not None and r["dtype"] != "uint8":
        return "pixel dtype"
    shape = (r["height"], r["width"], r["channels"])
    if None not in shape and shape != (4, 4, 1):
        return "patch is"
    if len(r["image"]) != 16:
        return "bytes"
    return None


@settings(max_examples=300, deadline=None)
@given(st.lists(row, max_size=12))
def test_any_rows_decode_or_get_the_right_reason(rows):
    table = pa.table(
        {
            "patch_id": pa.array([r["patch_id"] for r in rows], pa.string()),
            "scan_id": pa.array([r["scan_id"] for r in rows], pa.large_string()),
            "x": pa.array([r["x"] for r in rows], pa.int64()),
            "y": pa.array([r["y"] for r in rows], pa.int64()),
            "image": pa.array([r["image"] for r in rows], pa.large_binary()),
            "height": pa.array([r["height"] for r in rows], pa.int64()),
            "width": pa.array([r["width"] for r in rows], pa.int64()),
            "channels": pa.array([r["channels"] for r in rows], pa.int64()),
            "dtype": pa.array([r["dtype"] for r in rows], pa.string()),
        }
    )
    pixels, reasons = decode_patches(table, SPEC)
    assert pixels.shape == (len(rows), 4, 4, 1) and len(reasons) == len(rows)
    for r, got, p in zip(rows, reasons, pixels, strict=True):
        want = expected_reason(r)
        if want is None:
            assert got is None
            assert p.tobytes() == r["image"]  # lossless
        else:
            assert got is not None and want in got, (r, got)
            assert not p.any()  # a bad row is never handed to the search with data
