"""Driver crashes outside the scoring phase: SIGKILL during the scan aggregation (heatmaps and
overlays) and during Delta publishing, then the same command again. The final output must be
the output of a run that never crashed: same tables, same heatmaps, same overlay bytes, one
Delta commit per table, nothing twice."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from anogan_batch.job.layout import JobLayout
from tests.conftest import run_cli

REPO = str(Path(__file__).resolve().parents[1])
JOB_ID = "crash-test"
SCANS = 4
FLAGS = ["--iterations", "10", "--no-progress", "--table-format", "delta", "--job-id", JOB_ID]


def make_scans(root: Path, sample) -> Path:
    """Four 56x56 scans of 2x2 real digits, cut into 28x28 patches with stride 14."""
    from anogan_batch.job.ingest import ingest
    from anogan_batch.job.ingest_config import IngestConfig

    zeros = iter(sample["test_images"][sample["test_labels"] == 0])
    for s in range(SCANS):
        tiles = [next(zeros) for _ in range(4)]
        Image.fromarray(np.block([tiles[:2], tiles[2:]])).save(root / f"scan{s}.png")
    ingest(str(root), str(root.parent / "patches"), IngestConfig(patch_size=28, stride=14))
    return root.parent / "patches"


def score_and_die(model: str, patches: Path, out: Path, kill_at: str) -> None:
    """Run `anogan-batch score` as its own process that SIGKILLs itself at `kill_at`."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {
        "PYTHONPATH": os.pathsep.join([REPO, f"{REPO}/tests/fault_site"]),
        "ANOGAN_TEST_KILL": kill_at,
    }
    cmd = [sys.executable, "-m", "anogan_batch", "score", model, str(patches), str(out), *FLAGS]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    _, err = proc.communicate(timeout=600)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of its local Ray
    assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "running"  # died, did not fail


def table(out: Path, name: str, key: str):
    t = pads.dataset(out / name, format="parquet", partitioning="hive").to_table()
    if "overlay" in t.column_names:  # the path names OUT: compare it relative to OUT
        rel = [None if p is None else os.path.relpath(p, out) for p in t["overlay"].to_pylist()]
        t = t.drop_columns(["overlay"]).append_column("overlay", [rel])
    return t.sort_by(key).select(sorted(t.column_names))


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*.png")}


def one_commit_each(out: Path) -> None:
    for name in ("patch_scores", "scan_scores", "heatmaps"):
        log = sorted((out / name / "_delta_log").glob("*.json"))
        assert [p.name for p in log] == ["00000000000000000000.json"], name
        actions = [json.loads(line) for line in log[0].read_text().splitlines()]
        added = [a["add"]["path"] for a in actions if "add" in a]
        on_disk = {str(p.relative_to(out / name)) for p in (out / name).rglob("*.parquet")}
        assert sorted(added) == sorted(on_disk), name  # every file once, no stale one


# over a minute; make test keeps the driver SIGKILL of tests/test_resume.py and the
# warehouse's SIGKILL between tables (tests/test_iceberg.py)
@pytest.mark.slow
def test_sigkill_during_aggregation_and_publishing_then_rerun_gives_the_same_output(
    tmp_path, tiny_model, sample, ray_local
):
    from anogan_batch.core.search_config import SearchConfig
    from anogan_batch.job.runner import run_score_job
    from anogan_batch.job.score_config import ScoreJobConfig

    (tmp_path / "scans").mkdir()
    patches = make_scans(tmp_path / "scans", sample)
    reference = tmp_path / "reference"
    run_score_job(
        ScoreJobConfig(
            tiny_model,
            str(patches),
            str(reference),
            search=SearchConfig(iterations=10),
            progress=False,
            table_format="delta",
            job_id=JOB_ID,
        )
    )

    out = tmp_path / "crashed"
    # 1. dies while rendering the third scan's heatmap: two overlays written, no tables yet
    score_and_die(tiny_model, patches, out, "anogan_batch.job.heatmaps:render_scan:3")
    assert len(files(out / "overlays")) == 2
    assert not (out / "heatmaps").exists() or not list((out / "heatmaps").rglob("*.parquet"))
    # 2. the rerun dies between the Delta commits of patch_scores and scan_scores
    score_and_die(
        tiny_model, patches, out, "anogan_batch.warehouse.delta_in_place:_convert_in_child:2"
    )
    assert (out / "patch_scores" / "_delta_log").exists()
    assert not (out / "scan_scores" / "_delta_log").exists()
    # 3. the same command again finishes
    r = run_cli("score", tiny_model, str(patches), str(out), *FLAGS)
    assert r.returncode == 0, r.stderr
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "succeeded" and job["scored_rows"] == job["input_rows"]
    assert len(job["runs"]) == 3

    for name, key in (("patch_scores", "patch_id"), ("scan_scores", "scan_id")):
        got, want = table(out, name, key), table(reference, name, key)
        assert got.num_rows == len(set(got[key].to_pylist()))  # nothing twice
        assert got.equals(want), name
    assert table(out, "heatmaps", "scan_id").equals(table(reference, "heatmaps", "scan_id"))
    assert files(out / "overlays") == files(reference / "overlays")
    assert len(files(out / "overlays")) == SCANS
    assert JobLayout(str(out)).overlay("scan0") in [
        str(out / p) for p in table(out, "heatmaps", "scan_id")["overlay"].to_pylist()
    ]
    one_commit_each(out)
