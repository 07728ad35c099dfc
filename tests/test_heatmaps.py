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
from PIL import Image

from anogan_batch.io.patches import decode_map
from anogan_batch.job.heatmaps import heatmap_for, stitch
from anogan_batch.job.layout import JobLayout
from tests.conftest import run_cli

P, STRIDE = 28, 14  # overlapping patches: every inner pixel is covered by up to 4 of them


def test_stitch_averages_overlaps():
    a, b = np.full((2, 2, 1), 1.0), np.full((2, 2, 1), 3.0)
    mean, count = stitch([(0, 0, a), (1, 0, b)], height=2, width=4)
    np.testing.assert_array_equal(mean[:, :, 0], [[1, 2, 3, 0], [1, 2, 3, 0]])
    np.testing.assert_array_equal(count, [[1, 2, 1, 0], [1, 2, 1, 0]])


@pytest.fixture(scope="module")
def mosaic_job(ray_local, tiny_model, sample, tmp_path_factory):
    """Four 56x56 scans of 2x2 real zeros; in two of them one tile is a 'lesion' instead, a
    small bright spot on black: plainly abnormal even to the tiny model, so the test is about
    where the heat lands, not about how good that model is (a real digit there is not always
    the hottest tile)."""
    from anogan_batch.core.configs import SearchConfig
    from anogan_batch.job.configs import IngestConfig, ScoreJobConfig
    from anogan_batch.job.ingest import ingest
    from anogan_batch.job.runner import run_score_job

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


def test_heatmap_is_the_stitched_residual_maps(mosaic_job):
    manifest, out, _ = mosaic_job
    scores = pads.dataset(out / "patch_scores", partitioning="hive").to_table()
    assert manifest.scored_rows == scores.num_rows == 4 * 9
    for scan_id in ("normal/a", "lesion/b"):
        rows = [r for r in scores.to_pylist() if r["scan_id"] == scan_id]
        tiles = [(r["x"], r["y"], decode_map(r["residual_map"], P, P, 1)) for r in rows]
        want = stitch(tiles, 56, 56)[0][:, :, 0]
        got = heatmap_for(str(out), scan_id)
        assert got.shape == (56, 56)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        overlay = Image.open(JobLayout(str(out)).overlay(scan_id))
        assert overlay.size == (56, 56) and overlay.mode == "RGB"
    table = pads.dataset(out / "heatmaps").to_table(columns=["scan_id", "overlay", "max_score"])
    assert sorted(table.column("scan_id").to_pylist()) == [
        "lesion/a",
        "lesion/b",
        "normal/a",
        "normal/b",
    ]


def test_lesions_light_up(mosaic_job):
    _, out, lesions = mosaic_job
    for scan_id, tile in lesions.items():
        heat = heatmap_for(str(out), scan_id)
        tile_heat = [heat[y : y + P, x : x + P].mean() for y in (0, P) for x in (0, P)]
        assert int(np.argmax(tile_heat)) == tile, (scan_id, tile_heat)


def test_heatmap_cli_fetches_one_scan(mosaic_job, tmp_path):
    _, out, _ = mosaic_job
    r = run_cli("heatmap", str(out), "lesion/a", "--npy", str(tmp_path / "h.npy"))
    assert r.returncode == 0, r.stderr
    assert "lesion/a: 56x56 heatmap" in r.stdout
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
    # 64x64 grey patches with heatmaps: maps and pixels pass 128 MiB past ~4,000
    assert groups_in_driver(4_000, (64, 1)) and not groups_in_driver(4_100, (64, 1))
    assert not groups_in_driver(1_000, (256, 3))  # large colour patches: bytes, not rows


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
