"""Failures on a real multi-node Ray cluster (ray.cluster_utils.Cluster on this machine).

The job's driver is `anogan-batch score` with RAY_ADDRESS set, a process of its own, as users
submit jobs: the test process never joins the cluster, so it never holds a second Ray session
beside the suite's local one (a second session in one process is a crash hazard,
ray-project/ray#31145).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from anogan_batch.job.manifest import JobManifest
from tests.conftest import make_patch_table, run_cli

pytestmark = pytest.mark.cluster
REPO = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def cluster(s3_server, monkeypatch):
    """A head and two worker nodes, each a separate raylet with its own workers.

    Every process of the cluster inherits PYTHONPATH with tests/fault_site, whose
    sitecustomize injects the 'poison' fault (tests/faults.py).
    """
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([REPO, f"{REPO}/tests/fault_site"]))
    monkeypatch.setenv("ANOGAN_TEST_POISON", "1")
    # fast failure detection, so a dead node is noticed in seconds rather than half a minute
    fast = {
        "health_check_initial_delay_ms": 1000,
        "health_check_period_ms": 1000,
        "health_check_failure_threshold": 3,
    }
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "_system_config": fast})
    workers = [c.add_node(num_cpus=2) for _ in range(2)]
    c.wait_for_nodes()
    yield c, workers
    c.shutdown()


def score_on(c, model: str, patches: str, out: str, *flags: str) -> JobManifest:
    """Run `anogan-batch score` as a driver joining cluster `c`; the job's manifest."""
    r = run_cli(
        "score", model, patches, out, *flags, "--no-progress", "--no-heatmaps",
        env={"RAY_ADDRESS": c.address},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = JobManifest.load(out)
    assert manifest is not None
    return manifest


def scored_ids(out: Path) -> list[str]:
    table = pads.dataset(out / "patch_scores", partitioning="hive").to_table(columns=["patch_id"])
    return table.column("patch_id").to_pylist()


def test_killing_a_worker_node_mid_job_loses_and_duplicates_nothing(
    cluster, tmp_path, sample, tiny_model
):
    c, workers = cluster
    table = make_patch_table(tmp_path / "p", sample["train_images"][:150], files=3)
    out = tmp_path / "out"
    killed = threading.Event()

    def kill_when_half_written() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            files = list((out / "patch_scores").rglob("*.parquet")) if out.exists() else []
            if len(files) >= 2:
                c.remove_node(workers[0], allow_graceful=False)
                killed.set()
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_when_half_written, daemon=True)
    killer.start()
    manifest = score_on(
        c,
        tiny_model,
        str(table),
        str(out),
        *("--iterations", "25", "--batch-size", "10", "--actors", "2", "--cpus-per-actor", "1"),
        *("--target-file-mb", "0.05"),
    )
    killer.join(timeout=5)
    assert killed.is_set(), "the job finished before the node could be killed"
    assert manifest.status == "succeeded"
    ids = scored_ids(out)
    assert len(ids) == len(set(ids)) == 150 == manifest.scored_rows
    assert manifest.quarantined_rows == 0


def test_a_batch_that_raises_quarantines_only_the_row_that_fails_alone(
    cluster, tmp_path, sample, tiny_model
):
    ids = [f"scan{i:03d}#28x28+0+0" for i in range(40)]
    ids[13] = "poison-scan#28x28+0+0"
    table = make_patch_table(tmp_path / "p", sample["test_images"][:40], ids=ids)
    out = tmp_path / "out"
    c, _ = cluster
    m = score_on(
        c,
        tiny_model,
        str(table),
        str(out),
        *("--iterations", "3", "--batch-size", "8", "--actors", "2", "--cpus-per-actor", "1"),
    )
    assert m.status == "succeeded" and m.input_rows == 40
    q = pads.dataset(out / "quarantine").to_table().to_pylist()
    # the failing batch is narrowed down to the row whose search fails on its own
    assert m.quarantined_rows == len(q) == 1 and m.scored_rows == 39
    assert q[0]["patch_id"] == "poison-scan#28x28+0+0"
    assert q[0]["reason"] == "scoring failed: RuntimeError: injected fault"
    assert "poison-scan#28x28+0+0" not in set(scored_ids(out))
