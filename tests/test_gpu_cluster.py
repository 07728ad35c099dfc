"""The job on a GPU cluster, on this machine: two nodes with fake GPUs and a CPU-only head.

Ray's `Cluster` declares GPUs this machine lacks; the test-only failpoint (core/devices.py,
ANOGAN_BATCH_TEST_FAULTS) lets actors granted one score on the CPU (`fake_gpu`) and injects
out-of-memory errors and sticky CUDA errors into their searches, so the scheduling and the
contract (a fault of the machine never quarantines a row) are tested without a GPU. As in
test_cluster.py, the driver is `anogan-batch score` with RAY_ADDRESS, a process of its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from anogan_batch.core.devices import FAULTS_ENV
from anogan_batch.job.manifest import JobManifest
from tests.conftest import make_patch_table, run_cli

pytestmark = pytest.mark.cluster
REPO = str(Path(__file__).resolve().parents[1])
# every actor scores on the CPU; a third of multi-patch searches run out of memory; a quarter
# of batches meet a sticky CUDA error once; a batch holding 'device-fault' meets one always
FAULTS = "fake_gpu=1,oom=0.34,sticky=0.25,always=device-fault"
JOB = ("--iterations", "2", "--batch-size", "8", "--no-progress", "--no-heatmaps")


@pytest.fixture(scope="module")
def gpu_cluster(s3_server):
    """A CPU-only head and two nodes of 2 fake GPUs each; every process has the failpoint."""
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in (FAULTS_ENV, "PYTHONPATH")}
    os.environ[FAULTS_ENV] = FAULTS
    os.environ["PYTHONPATH"] = REPO
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    # CPUs as a GPU node has them (more than this machine): actors and I/O tasks all fit
    gpu_nodes = [c.add_node(num_cpus=6, num_gpus=2) for _ in range(2)]
    c.wait_for_nodes()
    yield c, c.head_node.node_id, {n.node_id for n in gpu_nodes}
    c.shutdown()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def score(c, model, table, out, *flags):
    return run_cli("score", model, str(table), str(out), *JOB, *flags,
                   env={"RAY_ADDRESS": c.address})  # fmt: skip


def scored_ids(out: Path) -> list[str]:
    return pads.dataset(out / "patch_scores", partitioning="hive").to_table().column(
        "patch_id").to_pylist()  # fmt: skip


@pytest.mark.parametrize(
    ("gpus_per_actor", "actors"), [(None, 4), pytest.param("0.5", 8, marks=pytest.mark.slow)]
)
def test_one_actor_per_gpu_none_on_the_cpu_node_and_faults_retried(
    gpu_cluster, tiny_model, tmp_path, sample, gpus_per_actor, actors
):
    c, head, gpu_nodes = gpu_cluster
    table = make_patch_table(tmp_path / "p", sample["test_images"][:96], files=2)
    flags = ("--gpus-per-actor", gpus_per_actor) if gpus_per_actor else ()
    r = score(c, tiny_model, table, tmp_path / "out", *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    m = JobManifest.load(str(tmp_path / "out"))
    run = m.runs[-1]
    assert run["resources"]["max_actors"] == actors
    placed = {(a["node_id"], tuple(a["gpu_ids"])) for a in run["actors"]}
    assert {node for node, _ in placed} == gpu_nodes  # none on the CPU-only head
    assert head not in {node for node, _ in placed}
    assert {gpus for _, gpus in placed} == {("0",), ("1",)}  # every GPU id of each node
    assert all(len(gpus) == 1 for _, gpus in placed)
    # faults of the machine were met and retried: every row scored once, none quarantined
    assert run["device_faults"] > 0
    ids = scored_ids(tmp_path / "out")
    assert len(ids) == len(set(ids)) == 96
    assert m.status == "succeeded" and m.quarantined_rows == 0


@pytest.mark.slow  # three actor restarts and a rerun: 20-50 s on 2 cores
def test_a_batch_that_fails_on_every_device_fails_the_job_and_a_rerun_finishes_it(
    gpu_cluster, tiny_model, tmp_path, sample
):
    c, _, _ = gpu_cluster
    ids = [f"scan{i:03d}#28x28+0+0" for i in range(48)]
    ids[20] = "device-fault#28x28+0+0"
    table = make_patch_table(tmp_path / "p", sample["test_images"][:48], ids=ids)
    out = tmp_path / "out"
    r = score(c, tiny_model, table, out)
    assert r.returncode == 1, r.stderr[-3000:]
    # the CLI's one paragraph (Ray's workers' lines may still stream in after it)
    message = next(line for line in r.stderr.splitlines() if line.startswith("error: "))
    assert message.startswith("error: a batch of 8 patches"), r.stderr[-3000:]
    assert "failed on 3 devices" in message and "GPU ids ['" in message, message
    assert "Nothing was quarantined" in message
    m = json.loads((out / "job.json").read_text())
    assert m["status"] == "failed"
    assert not (out / "quarantine").exists() or not list((out / "quarantine").rglob("*.parquet"))
    # the same command where the fault is gone (a local Ray without the failpoint) resumes
    env = {FAULTS_ENV: "", "PYTHONPATH": REPO}
    r = run_cli("score", tiny_model, str(table), str(out), *JOB, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = scored_ids(out)
    assert len(got) == len(set(got)) == 48
    assert JobManifest.load(str(out)).status == "succeeded"
