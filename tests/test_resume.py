"""Exactly once across a driver crash: SIGKILL mid-job, rerun, every patch_id once, same scores."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from anogan_batch.core.search_config import SearchConfig
from anogan_batch.job.pipeline import recover_pending
from anogan_batch.job.runner import run_score_job
from anogan_batch.job.score_config import ScoreJobConfig
from tests.conftest import make_patch_table

ITER = 10


def written_files(out) -> list:
    return sorted((out / "patch_scores").rglob("*.parquet")) if out.exists() else []


def read_scores(out):
    table = pads.dataset(out / "patch_scores", partitioning="hive").to_table()
    return table.sort_by("patch_id")


def test_sigkill_of_the_driver_then_rerun_finishes_exactly_once(
    tmp_path, tiny_model, sample, ray_local
):
    table = make_patch_table(tmp_path / "patches", sample["train_images"][:240], files=4)
    out = tmp_path / "out"
    # small files (about 14 rows) so rows are committed while the job runs
    args = [
        sys.executable,
        "-m",
        "anogan_batch",
        "score",
        tiny_model,
        str(table),
        str(out),
        "--iterations",
        str(ITER),
        "--batch-size",
        "10",
        "--target-file-mb",
        "0.05",
        "--no-progress",
        "--no-heatmaps",  # exactly-once is about patch_scores; heatmaps have their own tests
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 180
    while len(written_files(out)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)  # the driver only
    proc.wait()
    time.sleep(2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of its local Ray is left
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "running"  # the crash left it unfinished
    before = sum(pq.read_metadata(f).num_rows for f in written_files(out))
    assert 0 < before < 240, before

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "succeeded"
    assert job["input_rows"] == job["scored_rows"] == 240
    assert job["runs"][-1]["rows"] == 240 - before  # finished rows were not scored again
    resumed = read_scores(out)
    ids = resumed.column("patch_id").to_pylist()
    assert len(ids) == len(set(ids)) == 240

    # the same job without interruption, for comparison
    clean = tmp_path / "clean"
    run_score_job(
        ScoreJobConfig(
            tiny_model,
            str(table),
            str(clean),
            batch_size=10,
            search=SearchConfig(iterations=ITER),
            progress=False,
            heatmaps=False,
        )
    )
    reference = read_scores(clean)
    assert reference.column("patch_id").to_pylist() == ids
    for col in ("anomaly_score", "residual_score", "discrimination_score"):
        np.testing.assert_allclose(
            resumed.column(col).to_numpy(), reference.column(col).to_numpy(), rtol=1e-5
        )


def test_recover_pending_removes_uncommitted_files_only(tmp_path):
    """A write killed between its pending checkpoint and its commit leaves files to delete."""
    out = tmp_path / "out"
    (out / "_checkpoint").mkdir(parents=True)
    (out / "patch_scores" / "job_id=j").mkdir(parents=True)
    (out / "quarantine").mkdir()
    (out / "_checkpoint" / "aaa_000001.pending.parquet").write_bytes(b"x")
    (out / "_checkpoint" / "aaa_000002.parquet").write_bytes(b"x")  # committed
    uncommitted = [
        out / "patch_scores" / "job_id=j" / "aaa_000001-0.parquet",
        out / "quarantine" / "aaa_000001.parquet",
    ]
    committed = [
        out / "patch_scores" / "job_id=j" / "aaa_000002-0.parquet",
        out / "quarantine" / "aaa_000002.parquet",
    ]
    for f in uncommitted + committed:
        f.write_bytes(b"x")
    assert recover_pending(str(out)) == 1
    assert not any(f.exists() for f in uncommitted)
    assert all(f.exists() for f in committed)
    assert not (out / "_checkpoint" / "aaa_000001.pending.parquet").exists()
    assert (out / "_checkpoint" / "aaa_000002.parquet").exists()
    assert recover_pending(str(out)) == 0
