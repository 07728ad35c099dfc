"""Heatmaps, overlays, the Delta output and the report, on a real job over mosaic scans."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from anogan_batch.core.calibration import cell_means, heat_cell
from anogan_batch.io.patches import decode_map
from anogan_batch.job.heatmaps import Cells, grid_shape, heat_grid_for, heatmap_for, stitch_cells
from anogan_batch.job.layout import JobLayout
from tests.conftest import run_cli

P, STRIDE = 28, 14  # overlapping patches: every inner pixel is covered by up to 4 of them


def test_stitch_averages_overlapping_cells():
    # patches of 16 pixels, cells of 2 (8 x 8 a patch): two patches overlapping by 8 pixels
    assert heat_cell(16) == 2
    a, b = np.full((8, 8), 1.0, np.float32), np.full((8, 8), 3.0, np.float32)
    cells = Cells(np.array([0, 8]), np.array([0, 0]), np.stack([a, b]), None)
    heat, thumb = stitch_cells(cells, 16, grid_shape(16, 32, 2))
    assert heat.shape == (8, 16) and thumb is None
    np.testing.assert_array_equal(heat[0], [1] * 4 + [2] * 4 + [3] * 4 + [0] * 4)
    # off the cell grid (x = 3): the nearest cell; outside the scan: left out
    cells = Cells(np.array([3, 30]), np.array([0, 0]), np.stack([a, b]), None)
    heat, _ = stitch_cells(cells, 16, grid_shape(16, 32, 2))
    np.testing.assert_array_equal(heat[0], [0, 0] + [1] * 8 + [0] * 5 + [3])


@settings(max_examples=25, deadline=None)
@given(
    side=st.sampled_from([16, 28, 31, 64]),
    channels=st.sampled_from([1, 3]),
    dtype=st.sampled_from(["uint8", "uint16", "float32"]),
    seed=st.integers(0, 2**16),
)
def test_a_patch_s_cells_are_its_map_and_pixels_averaged_per_cell(side, channels, dtype, seed):
    from anogan_batch.fields import PIXEL_MAX
    from anogan_batch.job.heatmaps import patch_cells, patch_thumbs

    rng = np.random.default_rng(seed)
    maps = rng.random((3, channels, side, side), dtype=np.float32) * 2
    full = PIXEL_MAX[dtype]
    pixels = (rng.random((3, side, side, channels)) * full).astype(dtype)
    cell = heat_cell(side)
    g = side // cell
    heat = patch_cells(maps, side).view("<f2").reshape(3, g, g).astype(np.float32)
    np.testing.assert_allclose(heat, cell_means(maps, cell), rtol=2**-10, atol=1e-6)
    thumb = patch_thumbs(pixels, side, full).reshape(3, g, g, channels).astype(np.float64)
    want = pixels.astype(np.float64).reshape(3, g, cell, g, cell, channels).mean(axis=(2, 4))
    np.testing.assert_allclose(thumb, want / full * 255, atol=0.5 + 1e-3)


def test_a_scan_too_large_for_a_fine_grid_gets_coarser_cells():
    from anogan_batch.job.heatmaps import MAX_GRID_CELLS

    h, w, cell = grid_shape(100_000, 100_000, 8)  # a slide of 10^10 pixels
    assert h * w <= MAX_GRID_CELLS and cell % 8 == 0 and h == -(-100_000 // cell)
    assert grid_shape(2_000, 3_000, 8) == (250, 375, 8)  # small scans keep the patch cells
    h, w, cell = grid_shape(28, 2**31 - 1, 2)  # a hostile size: the grid stays bounded
    assert h * w <= MAX_GRID_CELLS


@pytest.fixture(scope="module")
def mosaic_job(ray_local, tiny_model, sample, tmp_path_factory):
    """Four 56x56 scans of 2x2 real zeros; in two of them one tile is a 'lesion' instead, a
    small bright spot on black: plainly abnormal even to the tiny model, so the test is about
    where the heat lands, not about how good that model is (a real digit there is not always
    the hottest tile)."""
    from anogan_batch.core.search_config import SearchConfig
    from anogan_batch.job.ingest import ingest
    from anogan_batch.job.ingest_config import IngestConfig
    from anogan_batch.job.runner import run_score_job
    from anogan_batch.job.score_config import ScoreJobConfig

    root = tmp_path_factory.mktemp("mosaic")
    images, labels = sample["test_images"], sample["test_labels"]
    zeros = iter(images[labels == 0])
    spot = np.zeros((P, P), dtype=np.uint8)
    spot[12:16, 12:16] = 255

    lesions = {"lesion/a": 1, "lesion/b": 2}  # scan -> lesion tile index (row-major)
    for name in ("normal/a", "normal/b", *lesions):
        tiles = [spot if lesions.get(name) == t else next(zeros) for t in range(4)]
        scan = np.block([[tiles[0], tiles[1]], [tiles[2], tiles[3]]])
        (root / "scans" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scan).save(root / "scans" / f"{name}.png")
    ingest(
        str(root / "scans"),
        str(root / "patches"),
        IngestConfig(patch_size=P, stride=STRIDE, label_from_parent=True),
    )
    out = root / "job"
    cfg = ScoreJobConfig(
        tiny_model,
        str(root / "patches"),
        str(out),
        search=SearchConfig(iterations=20),
        progress=False,
        table_format="delta",
    )
    return run_score_job(cfg), out, lesions


def test_heatmap_is_the_stitched_cells_of_the_residual_maps(mosaic_job):
    manifest, out, _ = mosaic_job
    scores = pads.dataset(out / "patch_scores", partitioning="hive").to_table()
    assert manifest.scored_rows == scores.num_rows == 4 * 9
    cell = heat_cell(P)
    g = P // cell
    for scan_id in ("normal/a", "lesion/b"):
        rows = [r for r in scores.to_pylist() if r["scan_id"] == scan_id]
        # the same stitching done by hand, from the float16 residual maps (compact)
        total, count = np.zeros((56 // cell,) * 2), np.zeros((56 // cell,) * 2)
        for r in rows:
            m = decode_map(r["residual_map"], P, P, 1).transpose(2, 0, 1)[None]
            y, x = r["y"] // cell, r["x"] // cell
            total[y : y + g, x : x + g] += cell_means(m, cell)[0]
            count[y : y + g, x : x + g] += 1
        got, got_cell = heat_grid_for(str(out), scan_id)
        assert got.shape == (28, 28) and got_cell == float(cell)
        # cells from float32 maps in the scorer, stored as float16: float16's rounding
        np.testing.assert_allclose(got, total / np.maximum(count, 1), rtol=2e-3, atol=1e-4)
        overlay = Image.open(JobLayout(str(out)).overlay(scan_id))
        assert overlay.size == (56, 56) and overlay.mode == "RGB"  # the grid, enlarged x2
    table = pads.dataset(out / "heatmaps").to_table(columns=["scan_id", "overlay", "max_score"])
    assert sorted(table.column("scan_id").to_pylist()) == [
        "lesion/a",
        "lesion/b",
        "normal/a",
        "normal/b",
    ]


def test_scan_phase_reads_no_input_pixels(mosaic_job, tmp_path):
    """The heatmaps come from the job's own heat cells: with the patch table's pixels gone,
    the scan tables are written all the same."""
    from anogan_batch.job.aggregate import write_scan_tables

    manifest, out, _ = mosaic_job
    copy = tmp_path / "out"
    shutil.copytree(out / "patch_scores", copy / "patch_scores")
    patches = tmp_path / "patches"
    patches.mkdir()
    shutil.copy(out.parent / "patches" / "_scans.parquet", patches / "_scans.parquet")
    write_scan_tables(str(copy), str(patches), heatmaps=(P, 1), rows=manifest.input_rows)
    for scan_id in ("normal/a", "lesion/a"):
        np.testing.assert_array_equal(
            heatmap_for(str(copy), scan_id), heatmap_for(str(out), scan_id)
        )


def test_lesions_light_up(mosaic_job):
    _, out, lesions = mosaic_job
    for scan_id, tile in lesions.items():
        heat, cell = heat_grid_for(str(out), scan_id)
        g = P // int(cell)
        tile_heat = [heat[y : y + g, x : x + g].mean() for y in (0, g) for x in (0, g)]
        assert int(np.argmax(tile_heat)) == tile, (scan_id, tile_heat)


def test_heatmap_cli_fetches_one_scan(mosaic_job, tmp_path):
    _, out, _ = mosaic_job
    r = run_cli("heatmap", str(out), "lesion/a", "--npy", str(tmp_path / "h.npy"))
    assert r.returncode == 0, r.stderr
    assert "lesion/a: 28x28 heat grid of 2x2-pixel cells" in r.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "h.npy"), heatmap_for(str(out), "lesion/a"))
    r = run_cli("heatmap", str(out), "no/such/scan")
    assert r.returncode == 2 and "no heatmap for scan_id 'no/such/scan'" in r.stderr


def test_delta_tables_are_committed_once(mosaic_job):
    manifest, out, _ = mosaic_job
    log = sorted((out / "patch_scores" / "_delta_log").glob("*.json"))
    assert [p.name for p in log] == ["00000000000000000000.json"]  # one atomic commit
    adds = [json.loads(line) for line in log[0].read_text().splitlines()]
    adds = [a["add"] for a in adds if "add" in a]
    assert {a["partitionValues"]["job_id"] for a in adds} == {manifest.job_id}
    # read back by a separate consumer process, as a warehouse would
    code = (
        "import sys; from deltalake import DeltaTable; "
        "t = DeltaTable(sys.argv[1]).to_pyarrow_table(columns=[sys.argv[2]]); "
        "print(t.num_rows, len(set(t.column(0).to_pylist())), flush=True); "
        # deltalake's native runtime may abort at interpreter exit (see warehouse.py)
        "import os; os._exit(0)"
    )
    for table, key, rows in (("patch_scores", "patch_id", 36), ("scan_scores", "scan_id", 4)):
        r = subprocess.run(
            [sys.executable, "-c", code, str(out / table), key], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [str(rows), str(rows)]


def test_only_small_jobs_group_in_the_driver():
    from anogan_batch.job.aggregate import LOCAL_ROWS, groups_in_driver

    assert groups_in_driver(36, (28, 1)) and groups_in_driver(LOCAL_ROWS, None)
    assert not groups_in_driver(LOCAL_ROWS + 1, None)
    # heat cells are a few hundred bytes a patch: rows decide for usual patch sides
    assert groups_in_driver(LOCAL_ROWS, (64, 1)) and groups_in_driver(LOCAL_ROWS, (256, 3))
    # a prime side has one-pixel cells: 63,001 cells x 5 bytes a patch pass 128 MiB
    assert not groups_in_driver(1_000, (251, 3))


@pytest.mark.parametrize("with_threshold", [False, True])
def test_a_small_job_groups_its_scans_in_the_driver_exactly_as_ray_does(
    mosaic_job, tmp_path, with_threshold
):
    from anogan_batch.job.aggregate import write_scan_tables

    manifest, out, _ = mosaic_job
    patches = str(out.parent / "patches")
    scores = pads.dataset(out / "patch_scores", partitioning="hive").to_table()
    cut = float(np.median(scores.column("anomaly_score"))) if with_threshold else None
    tables, overlays = {}, {}
    for rows in (None, manifest.input_rows):  # None: the Ray groupby, whatever the size
        copy = tmp_path / f"out-{rows}"
        shutil.copytree(out / "patch_scores", copy / "patch_scores")
        where = write_scan_tables(str(copy), patches, threshold=cut, heatmaps=(P, 1), rows=rows)
        assert where == ("ray" if rows is None else "driver")
        for name in ("heatmaps", "scan_scores"):
            t = pads.dataset(copy / name).to_table()
            listed = t.sort_by("scan_id").to_pylist()
            for r in listed:  # the overlay's path, relative to its job
                if "overlay" in r:
                    r["overlay"] = r["overlay"].replace(str(copy), "OUT")
            tables[rows, name] = (t.schema, listed)
        overlays[rows] = {
            str(f.relative_to(copy)): f.read_bytes() for f in (copy / "overlays").rglob("*.png")
        }
    for name in ("heatmaps", "scan_scores"):
        assert tables[None, name] == tables[manifest.input_rows, name], name
    assert len(tables[None, "scan_scores"][1]) == 4
    above = {r["n_above_threshold"] for r in tables[None, "scan_scores"][1]}
    assert above == {None} if cut is None else above <= set(range(10)) and sum(above) > 0
    assert len(overlays[None]) == 4 and overlays[None] == overlays[manifest.input_rows]


@pytest.mark.parametrize("heatmaps", [False, True])
def test_scan_scores_from_the_ray_groupby_hold_few_row_groups(
    mosaic_job, tmp_path, monkeypatch, heatmaps
):
    """The groupby yields one row a scan; stored one row group each, a 10 M-patch job's
    scan_scores footers alone grew the driver by 100 MB when they were counted."""
    import pyarrow.parquet as pq

    from anogan_batch.job import aggregate

    _, out, _ = mosaic_job
    monkeypatch.setattr(aggregate, "_partitions", lambda shuffle: 1)  # all 4 scans in one
    copy = tmp_path / "out"
    shutil.copytree(out / "patch_scores", copy / "patch_scores")
    geometry = (P, 1) if heatmaps else None
    assert aggregate.write_scan_tables(str(copy), str(out.parent / "patches"),
                                       heatmaps=geometry) == "ray"  # fmt: skip
    files = list((copy / "scan_scores").glob("*.parquet"))
    assert sum(pq.read_metadata(f).num_rows for f in files) == 4
    assert [pq.read_metadata(f).num_row_groups for f in files] == [1] * len(files)


CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const pre = document.createElement("pre");
  pre.id = "render-check";
  pre.textContent = JSON.stringify({
    images: imgs.length,
    rendered: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    overlays: [...document.querySelectorAll("#top-scans img")]
      .filter(i => i.naturalWidth > 0).length,
    svgs: [...document.querySelectorAll("svg")].filter(s => s.getBBox().width > 0).length,
  });
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str | None:
    found = (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome"))
    return next((path for path in found if path), None)


@pytest.mark.skipif(_chromium() is None, reason="no chromium (apt install chromium)")
def test_report_renders_in_a_real_browser(mosaic_job, tmp_path):
    from anogan_batch.evaluation.evaluate import evaluate_job
    from anogan_batch.evaluation.report import write_report

    _, out, _ = mosaic_job
    evaluate_job(str(out), "normal")
    html = write_report(str(out), str(tmp_path / "report.html"))
    # the report stays untouched; the check runs on an instrumented copy
    probe = tmp_path / "probe.html"
    probe.write_text(Path(html).read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    r = subprocess.run(
        [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    marker = '<pre id="render-check">'
    assert marker in r.stdout, r.stderr[-2000:]
    check = json.loads(r.stdout.split(marker)[1].split("</pre>")[0])
    assert check["images"] >= 3 * 16 + 4 and check["rendered"] == check["images"]
    assert check["overlays"] == 4 and check["svgs"] == 2


def test_a_slide_read_at_a_downsample_gets_its_grid_in_pixels_as_read(tmp_path):
    """Patch rows carry level-0 positions; a slide read at 4 level-0 pixels a pixel has its
    heat grid in pixels as read, and says how many level-0 pixels a cell covers."""
    from anogan_batch.job.aggregate import SCORE, SIZE, scan_cells
    from anogan_batch.job.heatmaps import HeatmapGeometry, render_scan

    g = 16 // heat_cell(16)
    heat = np.full((g, g), 0.5, "<f2").tobytes()
    kinds = [SCORE, SCORE, SIZE]
    group = {
        "kind": np.array(kinds, object),
        "x": np.array([0.0, 64.0 * 4, 160.0 * 4]),  # level 0; the size row: width
        "y": np.array([0.0, 0.0, 32.0 * 4]),
        "heat": np.array([heat, heat, None], object),
        "thumb": np.array([bytes(g * g), bytes(g * g), None], object),
        "downsample": np.array([np.nan, np.nan, 4.0]),
    }
    cells, recorded = scan_cells(group, HeatmapGeometry(16, 1))
    assert cells.x.tolist() == [0, 64] and recorded == (128, 640, 4.0)
    row = render_scan(cells, 16, str(tmp_path / "o.png"), recorded)
    assert (row["height"][0], row["width"][0]) == (128, 640)  # level 0
    assert row["cell"][0] == 2 * 4.0  # a 2-pixel cell as read covers 8 level-0 pixels
    grid = np.frombuffer(row["heatmap"][0], "<f4").reshape(row["grid_height"][0], -1)
    assert grid.shape == (16, 80) and grid[:8, :8].min() == grid[:8, 32:40].min() > 0.49
    assert grid[:, 8:32].max() == 0  # between the two patches: nothing


def test_an_overlay_exports_as_an_ome_tiff_pyramid_viewers_open(mosaic_job, tmp_path):
    import tifffile

    from anogan_batch.job.heatmaps import EXPORT_TILE, export_tiff

    _, out, _ = mosaic_job
    r = run_cli("heatmap", str(out), "lesion/a", "--tiff", str(tmp_path / "a.ome.tif"))
    assert r.returncode == 0 and "OME-TIFF pyramid" in r.stdout, r.stderr
    with tifffile.TiffFile(tmp_path / "a.ome.tif") as tif:
        assert tif.is_ome and tif.pages[0].is_tiled
        level0 = tif.series[0].levels[0].asarray()
    png = np.asarray(Image.open(JobLayout(str(out)).overlay("lesion/a")).convert("RGB"))
    np.testing.assert_array_equal(level0, png)
    # a large overlay gets levels down to a tile (a copy of the job, a fake 1,000-pixel one)
    copy = tmp_path / "job"
    shutil.copytree(out, copy)
    Image.fromarray(np.zeros((1000, 1200, 3), np.uint8)).save(
        JobLayout(str(copy)).overlay("lesion/b")
    )
    made = export_tiff(str(copy), "lesion/b", str(tmp_path / "b.ome.tif"))
    with tifffile.TiffFile(tmp_path / "b.ome.tif") as tif:
        shapes = [lv.shape[:2] for lv in tif.series[0].levels]
    assert made["levels"] == len(shapes) == 3 and min(shapes[-1]) <= EXPORT_TILE
