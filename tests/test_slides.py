"""Slides read by region (ingest/): sources, resolution by pixel size, masks at low resolution,
work units, and a slide ingested end to end, from files the generators in tests/slides.py
write with tifffile."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from anogan_batch.ingest import levels, plan
from anogan_batch.ingest.sources import Level, TiffSource, open_tiff
from anogan_batch.job.ingest import ingest
from anogan_batch.job.ingest_config import IngestConfig
from tests.slides import slide_pixels, tissue_mask, write_pyramid, write_untiled

H, W = 1200, 1800  # a small slide: 3 levels of 256-pixel tiles


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    pixels = slide_pixels(H, W)
    (root / "src").mkdir()
    write_pyramid(root / "src" / "slide.tif", pixels, mpp=0.25)
    return root, pixels


def _levels(path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [lv.asarray() for lv in tif.series[0].levels]


@settings(max_examples=40, deadline=None)
@given(
    level=st.integers(0, 2),
    x=st.integers(-300, W),
    y=st.integers(-300, H),
    w=st.integers(1, 700),
    h=st.integers(1, 700),
)
def test_a_region_is_the_level_s_pixels_there(slide, level, x, y, w, h):
    root, _ = slide
    path = root / "src" / "slide.tif"
    want = _levels(path)[level]
    with open(path, "rb") as fh:
        source = open_tiff(fh)
        got = source.read_region(x, y, w, h, level)
    ds = 2**level
    lx, ly = x // ds, y // ds
    expected = np.zeros((h, w, 3), np.uint8)
    y0, y1, x0, x1 = max(0, ly), min(want.shape[0], ly + h), max(0, lx), min(want.shape[1], lx + w)
    if y0 < y1 and x0 < x1:
        expected[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = want[y0:y1, x0:x1]
    np.testing.assert_array_equal(got, expected)


def test_strips_read_by_region_and_a_huge_strip_is_refused_unread(tmp_path):
    pixels = (np.random.default_rng(1).random((300, 500)) * 65535).astype(np.uint16)
    write_untiled(tmp_path / "strips.tif", pixels, rows_per_strip=7)
    with open(tmp_path / "strips.tif", "rb") as fh:
        source = open_tiff(fh)
        assert source.mpp is None and source.dtype == np.uint16
        np.testing.assert_array_equal(source.read_region(13, 20, 50, 61)[:, :, 0],
                                      pixels[20:81, 13:63])  # fmt: skip
        fh.seek(0)
        with pytest.raises(ValueError, match="over the budget"):
            TiffSource(fh, budget=4000).read_region(0, 0, 100, 100)
    # one strip of 40 M values: its header is enough to refuse it
    write_untiled(tmp_path / "one-strip.tif", np.zeros((4000, 10_000), np.uint8))
    with open(tmp_path / "one-strip.tif", "rb") as fh, pytest.raises(ValueError, match="refused"):
        TiffSource(fh, budget=2**24)


def test_pixel_size_from_resolution_tags_and_ome(tmp_path):
    pixels = slide_pixels(300, 400)
    write_pyramid(tmp_path / "generic.tif", pixels, mpp=0.5)
    write_pyramid(tmp_path / "ome.ome.tif", pixels, mpp=0.25, ome=True)
    write_pyramid(tmp_path / "none.tif", pixels, mpp=None)
    found = {}
    for name in ("generic.tif", "ome.ome.tif", "none.tif"):
        with open(tmp_path / name, "rb") as fh:
            s = open_tiff(fh)
            found[name] = (s.mpp, s.describe()["pyramid"], [lv.downsample for lv in s.levels])
    assert found["generic.tif"] == (pytest.approx(0.5), "tiff", [1.0, 2.0, 4.0])
    assert found["ome.ome.tif"][:2] == (pytest.approx(0.25), "ome")
    assert found["none.tif"][0] is None


class _Fake:
    def __init__(self, downsamples, mpp):
        self.levels = tuple(Level(1000, 1000, d) for d in downsamples)
        self.mpp = mpp


def test_resolution_by_pixel_size():
    src = _Fake([1.0, 4.0, 16.0], 0.25)
    assert levels.choose(src) == levels.Resolution(0, 1.0, 1.0, 0.25, None)
    assert levels.choose(src, mpp=1.02).level == 1  # within 5 % of level 1's 1.0 µm
    r = levels.choose(src, mpp=2.0)  # between levels 1 and 2: level 1, downsampled 2x
    assert (r.level, r.factor, r.downsample, r.mpp) == (1, 2.0, 8.0, 2.0)
    assert levels.choose(src, level=2).downsample == 16.0
    with pytest.raises(ValueError, match="--level 3 does not exist"):
        levels.choose(src, level=3)
    r = levels.choose(_Fake([1.0, 2.0], None), mpp=1.0)  # no pixel size: level 0, said so
    assert r.level == 0 and "no pixel size" in r.warning


def test_area_downsampling_averages_what_each_pixel_covers():
    a = np.random.default_rng(0).integers(0, 256, (12, 18, 3)).astype(np.uint8)
    out = levels.area_downsample(a, 4, 6)  # 3x exactly
    want = a.reshape(4, 3, 6, 3, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(out - want).max() <= 1.0  # within a grey level
    assert levels.area_downsample(a, 5, 7).shape == (5, 7, 3)  # any factor


def test_the_mask_comes_from_a_low_resolution_level(slide, monkeypatch):
    root, _ = slide
    reads = []
    real = TiffSource.read_region

    def recording(self, x, y, w, h, level=0, **kwargs):
        reads.append((level, w * h))
        return real(self, x, y, w, h, level, **kwargs)

    monkeypatch.setattr(TiffSource, "read_region", recording)
    with open(root / "src" / "slide.tif", "rb") as fh:
        view, scale = plan.overview(open_tiff(fh))
    # the coarsest level with a short side of at least 500 pixels: level 1 (600 x 900)
    assert view.shape[:2] == (600, 900) and scale == 2.0 and reads == [(1, 600 * 900)]


def test_a_slide_ingests_its_tissue_at_the_asked_resolution(slide, tmp_path):
    root, _ = slide
    cfg = IngestConfig(patch_size=64, min_foreground=0.5, mpp=0.5, engine="local")
    summary = ingest(str(root / "src"), str(tmp_path / "out"), cfg)
    (scan,) = pq.read_table(tmp_path / "out" / "_scans.parquet").to_pylist()
    assert (scan["level"], scan["downsample"], scan["mpp"]) == (1, 2.0, 0.5)
    assert (scan["height"], scan["width"]) == (H, W)  # level 0
    assert json.loads(scan["source"])["levels"] == [[H, W, 1.0], [600, 900, 2.0], [300, 450, 4.0]]
    rows = pads.dataset(tmp_path / "out", format="parquet").to_table().to_pylist()
    assert summary.patches == len(rows) == scan["n_patches"] > 0
    level1 = _levels(root / "src" / "slide.tif")[1]
    tissue = tissue_mask(H, W)
    for r in rows[:: max(1, len(rows) // 25)]:
        x, y = r["x"] // 2, r["y"] // 2  # level-0 positions, read at level 1
        got = np.frombuffer(r["image"], np.uint8).reshape(64, 64, 3)
        np.testing.assert_array_equal(got, level1[y : y + 64, x : x + 64])
        assert tissue[r["y"] : r["y"] + 128, r["x"] : r["x"] + 128].mean() >= 0.4
        assert (r["level"], r["mpp"]) == (1, 0.5)
    # every patch mostly tissue: all of the slide's kept patches lie over the ellipses
    assert scan["n_skipped"] > 0


def test_work_units_cut_the_same_rows_as_one_piece(slide, tmp_path, monkeypatch):
    root, _ = slide
    cfg = IngestConfig(patch_size=64, stride=48, min_foreground=0.3, engine="local")
    ingest(str(root / "src"), str(tmp_path / "whole"), cfg)
    monkeypatch.setattr(plan, "UNIT_PATCHES", 50)
    ingest(str(root / "src"), str(tmp_path / "units"), cfg)
    tables = {k: pads.dataset(tmp_path / k, format="parquet").to_table().sort_by("patch_id")
              for k in ("whole", "units")}  # fmt: skip
    assert tables["whole"].num_rows > 200
    assert tables["whole"].equals(tables["units"])
    parts = sorted(p.name for p in (tmp_path / "units").glob("part-*-u*.parquet"))
    assert len(parts) == -(-tables["units"].num_rows // 50)  # one file a unit, all written
    (scan,) = pq.read_table(tmp_path / "units" / "_scans.parquet").to_pylist()
    assert scan["n_patches"] == tables["units"].num_rows


def test_an_unreadable_tile_quarantines_its_patches_and_the_rest_is_cut(tmp_path):
    pixels = slide_pixels(512, 768)
    src = tmp_path / "src"
    src.mkdir()
    write_pyramid(src / "broken.tif", pixels, levels=1)
    with tifffile.TiffFile(src / "broken.tif") as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[4], page.databytecounts[4]  # tile row 1, column 1
    raw = bytearray((src / "broken.tif").read_bytes())
    raw[offset : offset + count] = b"\xff" * count  # not zlib any more
    (src / "broken.tif").write_bytes(bytes(raw))
    summary = ingest(str(src), str(tmp_path / "out"), IngestConfig(patch_size=128, engine="local"))
    bad = pq.read_table(tmp_path / "out" / "_quarantine.parquet").to_pylist()
    assert {r["path"].rsplit("@", 1)[1] for r in bad} == {
        f"x={x},y={y}" for y in (256, 384) for x in (256, 384)
    }  # the four patches of the 256-pixel tile
    assert all("region unreadable" in r["reason"] for r in bad)
    assert summary.patches == 4 * 6 - 4  # the rest of the slide


def test_a_slide_s_units_run_on_ray_as_they_do_here(slide, tmp_path, ray_local):
    """8,400 patches of 16 pixels: three units (plan.UNIT_PATCHES), one Ray task each."""
    root, _ = slide
    tables = {}
    for engine in ("local", "ray"):
        summary = ingest(str(root / "src"), str(tmp_path / engine),
                         IngestConfig(patch_size=16, engine=engine))  # fmt: skip
        assert summary.engine == engine
        tables[engine] = pads.dataset(tmp_path / engine, format="parquet").to_table()
        assert len(list((tmp_path / engine).glob("part-*-u*.parquet"))) == 3
    assert tables["local"].num_rows == 75 * 113  # 1800 / 16 = 112.5: one more, flush right
    assert tables["local"].sort_by("patch_id").equals(tables["ray"].sort_by("patch_id"))


def test_a_user_s_mask_decides_which_patches_are_cut(slide, tmp_path):
    """--mask FOLDER: <scan_id>.png at any size; a scan without one is quarantined."""
    from PIL import Image

    root, _ = slide
    src = tmp_path / "src"
    src.mkdir()
    (src / "slide.tif").symlink_to(root / "src" / "slide.tif")
    Image.fromarray(np.zeros((200, 200), np.uint8)).save(src / "plain.png")  # no mask for it
    masks = tmp_path / "masks"
    masks.mkdir()
    small = np.zeros((60, 90), np.uint8)  # 1/20 of the slide: its top-left quarter
    small[:30, :45] = 255
    Image.fromarray(small).save(masks / "slide.png")
    cfg = IngestConfig(patch_size=100, mask=str(masks), engine="local")
    summary = ingest(str(src), str(tmp_path / "out"), cfg)
    rows = pads.dataset(tmp_path / "out", format="parquet").to_table(columns=["x", "y"])
    xs, ys = rows.column("x").to_pylist(), rows.column("y").to_pylist()
    assert summary.patches == len(xs) == 6 * 9  # 600 x 900 of 100-pixel patches
    assert max(xs) + 100 <= W // 2 and max(ys) + 100 <= H // 2
    (bad,) = pq.read_table(tmp_path / "out" / "_quarantine.parquet").to_pylist()
    assert bad["path"].endswith("plain.png") and "no mask for scan_id 'plain'" in bad["reason"]


def test_an_interrupted_ingest_resumes_its_unfinished_units(slide, tmp_path, monkeypatch):
    """A rerun of the same ingest into the OUT of one that died keeps the work units it
    finished (their records) and cuts only the others; the table is the same."""
    from anogan_batch.job import ingest as ingest_module

    root, _ = slide
    monkeypatch.setattr(plan, "UNIT_PATCHES", 40)
    cfg = IngestConfig(patch_size=64, min_foreground=0.3, engine="local")
    out = tmp_path / "out"
    ingest(str(root / "src"), str(out), cfg)
    whole = pads.dataset(out, format="parquet").to_table().sort_by("patch_id")
    records = sorted((out / "_units").glob("*-u*.json"))
    assert len(records) > 2
    # as a run that died before its last unit and before the end: no _ingest.json
    (out / "_ingest.json").unlink()
    (out / "_scans.parquet").unlink()
    records[-1].unlink()
    part = out / f"part-{records[-1].name.rsplit('-', 1)[0]}-{records[-1].stem.rsplit('-', 1)[1]}"
    (part.with_suffix(".parquet")).write_bytes(b"half a file")
    calls = []
    real = ingest_module.run_unit
    monkeypatch.setattr(ingest_module, "run_unit", lambda *a: calls.append(1) or real(*a))
    summary = ingest(str(root / "src"), str(out), cfg)
    assert len(calls) == 1  # only the unfinished unit
    again = pads.dataset(out, format="parquet").to_table().sort_by("patch_id")
    assert again.equals(whole) and summary.patches == whole.num_rows
    # other parameters into that OUT: a new ingest, not a resume
    calls.clear()
    ingest(str(root / "src"), str(out), IngestConfig(patch_size=32, min_foreground=0.3,
                                                      engine="local"))  # fmt: skip
    assert len(calls) > 1


def test_a_scan_id_from_data_never_leaves_the_mask_folder(tmp_path):
    from anogan_batch.job.ingest import user_mask

    cfg = IngestConfig(patch_size=16, mask=str(tmp_path / "masks"))
    (tmp_path / "masks").mkdir()
    (tmp_path / "secret.png").write_bytes(b"not yours")
    for hostile in ("../secret", "a/../../secret", "/etc/passwd", "", "a\0b", "a//b"):
        with pytest.raises(ValueError, match="cannot name a mask file"):
            user_mask(cfg, hostile)
    with pytest.raises(ValueError, match="no mask for scan_id 'fine/one'"):
        user_mask(cfg, "fine/one")


def test_a_storage_fault_is_raised_never_quarantined(slide, monkeypatch):
    """A tile whose bytes cannot be fetched (S3, a disk) is the machine's fault: it is raised
    (Ray retries the task, or ingest exits 1), unlike a tile that cannot be decoded."""
    root, _ = slide
    with open(root / "src" / "slide.tif", "rb") as fh:
        source = open_tiff(fh)
        res = levels.choose(source)
        grid = plan.patch_grid(source, res, 64, 64, None, 1.0, 0.0)

        def failing(self, offset, count):
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation")

        monkeypatch.setattr(TiffSource, "_read", failing)
        with pytest.raises(OSError, match="NETWORK_CONNECTION"):
            list(plan.cut_rows(source, res, grid.rows[:1], 64))
