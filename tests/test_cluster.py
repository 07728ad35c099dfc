"""Failures on a real multi-node Ray cluster (ray.cluster_utils.Cluster on this machine)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from anogan_batch.pipeline import ScoreJobConfig
from anogan_batch.runner import run_score_job
from anogan_batch.search import SearchConfig
from tests.conftest import make_patch_table

pytestmark = pytest.mark.cluster
REPO = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def cluster(s3_server, monkeypatch):
    """A head and two worker nodes, each a separate raylet with its own workers.

    Every process of the cluster inherits PYTHONPATH with tests/fault_site, whose
    sitecustomize injects the 'poison' fault (tests/faults.py).
    """
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
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
    ray.init(address=c.address)
    yield c, workers
    ray.shutdown()
    c.shutdown()


def scored_ids(out: Path) -> list[str]:
    table = pads.dataset(out / "patch_scores", partitioning="hive").to_table(columns=["patch_id"])
    return table.column("patch_id").to_pylist()


def test_killing_a_worker_node_mid_job_loses_and_duplicates_nothing(
    cluster, tmp_path, sample, tiny_model
):
    c, workers = cluster
    table = make_patch_table(tmp_path / "p", sample["train_images"][:150], files=3)
    out = tmp_path / "out"
    cfg = ScoreJobConfig(
        tiny_model,
        str(table),
        str(out),
        search=SearchConfig(iterations=25),
        batch_size=10,
        actors=(2, 2),
        cpus_per_actor=1,
        target_file_mb=0.05,
        progress=False,
        heatmaps=False,
    )
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
    manifest = run_score_job(cfg)
    killer.join(timeout=5)
    assert killed.is_set(), "the job finished before the node could be killed"
    assert manifest.status == "succeeded"
    ids = scored_ids(out)
    assert len(ids) == len(set(ids)) == 150 == manifest.scored_rows
    assert manifest.quarantined_rows == 0


def test_a_batch_that_raises_is_quarantined_and_the_job_completes(
    cluster, tmp_path, sample, tiny_model
):
    ids = [f"scan{i:03d}#28x28+0+0" for i in range(40)]
    ids[13] = "poison-scan#28x28+0+0"
    table = make_patch_table(tmp_path / "p", sample["test_images"][:40], ids=ids)
    out = tmp_path / "out"
    m = run_score_job(
        ScoreJobConfig(
            tiny_model,
            str(table),
            str(out),
            search=SearchConfig(iterations=3),
            batch_size=8,
            actors=(2, 2),
            cpus_per_actor=1,
            progress=False,
            heatmaps=False,
        )
    )
    assert m.status == "succeeded" and m.input_rows == 40
    q = pads.dataset(out / "quarantine").to_table().to_pylist()
    # the poisoned row's whole batch (8 rows, batches are cut in input order) is quarantined
    assert m.quarantined_rows == len(q) == 8 and m.scored_rows == 32
    assert {r["reason"] for r in q} == {"scoring failed: RuntimeError: injected fault"}
    assert "poison-scan#28x28+0+0" in {r["patch_id"] for r in q}
    assert not set(scored_ids(out)) & {r["patch_id"] for r in q}
