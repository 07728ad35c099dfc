"""Ingest: scans -> patch table with the contract's columns, stable ids, labels, bad files."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from anogan_batch.errors import InputError
from anogan_batch.ingest import IngestConfig, grid_positions, ingest
from anogan_batch.patches import PatchSpec, decode_patches


@pytest.fixture
def scans(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "scans"
    (root / "normal").mkdir(parents=True)
    (root / "lesion" / "deep").mkdir(parents=True)
    gray = rng.integers(0, 255, (40, 50), dtype=np.uint8)
    Image.fromarray(gray).save(root / "normal" / "a.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
        root / "lesion" / "b.jpg", quality=95
    )
    Image.fromarray(rng.integers(0, 60000, (20, 20)).astype(np.uint16)).save(
        root / "lesion" / "deep" / "c.png"
    )
    return root, gray


def test_grid_covers_the_border():
    assert grid_positions(40, 16, 16) == [0, 16, 24]
    assert grid_positions(32, 16, 16) == [0, 16]
    assert grid_positions(10, 16, 16) == []
    assert grid_positions(20, 16, 2) == [0, 2, 4]


def test_ingest_png_jpeg_and_16_bit(scans, tmp_path):
    root, gray = scans
    out = tmp_path / "patches"
    summary = ingest(str(root), str(out), IngestConfig(patch_size=16, label_from_parent=True))
    table = pads.dataset(out).to_table().sort_by("patch_id")
    # a.png 40x50 -> 3 x 4 patches, b.jpg 32x32 -> 2 x 2, c.png 20x20 -> 2 x 2
    assert summary.patches == table.num_rows == 12 + 4 + 4
    assert summary.scans == 3
    rows = {r["patch_id"]: r for r in table.to_pylist()}
    a = rows["normal/a#16x16+16+24"]
    assert (a["scan_id"], a["x"], a["y"], a["label"]) == ("normal/a", 16, 24, "normal")
    pixels, _ = decode_patches(
        table.filter(pads.field("patch_id") == a["patch_id"]), PatchSpec(16, 1, "uint8")
    )
    np.testing.assert_array_equal(pixels[0, :, :, 0], gray[24:40, 16:32])  # lossless
    assert rows["lesion/b#16x16+0+0"]["channels"] == 3
    c = rows["lesion/deep/c#16x16+4+4"]
    assert (c["dtype"], c["label"]) == ("uint16", "deep")
    assert set(pq.read_schema(next(out.glob("*.parquet"))).names) >= {
        "patch_id",
        "scan_id",
        "x",
        "y",
        "image",
        "label",
    }


def test_patch_ids_are_stable_across_reingest(scans, tmp_path):
    root, _ = scans
    a = ingest(str(root), str(tmp_path / "a"), IngestConfig(patch_size=16))
    b = ingest(str(root), str(tmp_path / "b"), IngestConfig(patch_size=16))
    ta = pads.dataset(tmp_path / "a").to_table().sort_by("patch_id")
    tb = pads.dataset(tmp_path / "b").to_table().sort_by("patch_id")
    assert a.patches == b.patches
    assert ta.column("patch_id").to_pylist() == tb.column("patch_id").to_pylist()
    assert ta.column("image").equals(tb.column("image"))
    assert len(set(ta.column("patch_id").to_pylist())) == ta.num_rows


def test_bad_files_are_quarantined_not_fatal(scans, tmp_path):
    root, _ = scans
    (root / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "normal" / "empty.png").write_bytes(b"")
    (root / "normal" / "notes.txt").write_text("hello")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "normal" / "tiny.png")
    out = tmp_path / "patches"
    summary = ingest(str(root), str(out), IngestConfig(patch_size=16))
    assert summary.quarantined_files == 4
    q = pq.read_table(out / "_quarantine.parquet").to_pylist()
    reasons = {r["path"].rsplit("/", 1)[1]: r["reason"] for r in q}
    assert "unreadable .png" in reasons["broken.png"]
    assert "0 bytes" in reasons["empty.png"]
    assert reasons["notes.txt"] == "unsupported format '.txt'"
    assert "smaller than the 16px patch" in reasons["tiny.png"]
    # the table itself stays readable: _-prefixed files are not part of the dataset
    assert pads.dataset(out).count_rows() == summary.patches


def test_nothing_readable_is_an_error(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="produced no patches.*x.png"):
        ingest(str(tmp_path / "s"), str(tmp_path / "o"), IngestConfig(patch_size=16))
    with pytest.raises(InputError, match="does not exist"):
        ingest(str(tmp_path / "missing"), str(tmp_path / "o"), IngestConfig(patch_size=16))
