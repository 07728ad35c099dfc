"""A GPU group that scales from zero (job/autoscale.py): the job asks Ray's autoscaler for
its GPUs and waits, on a real local cluster with a stand-in autoscaler (a process that reads
the request as Ray's autoscaler does and answers it by adding a node with a fake GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anogan_batch.core.devices import FAULTS_ENV
from anogan_batch.job.manifest import JobManifest
from tests.conftest import make_patch_table

pytestmark = pytest.mark.cluster
REPO = str(Path(__file__).resolve().parents[1])
JOB = ("--iterations", "2", "--batch-size", "8", "--no-progress", "--no-heatmaps")


STAND_IN_AUTOSCALER = """
import json, sys, time
import ray
from ray.experimental.internal_kv import _internal_kv_get
ray.init(address=sys.argv[1], logging_level="ERROR")
deadline = time.time() + 120
while time.time() < deadline:
    raw = _internal_kv_get("autoscaler_resource_request")
    if raw and json.loads(raw):
        print(raw.decode(), flush=True)
        break
    time.sleep(0.2)
"""


def test_past_the_wait_the_job_ends_naming_what_it_asked_for(ray_local, monkeypatch):
    """On the suite's local Ray (no GPU), with an autoscaler that never answers: the request
    is made, withdrawn after the wait, and the error names it (the request's way into Ray's
    autoscaler is the next test's, through a real cluster)."""
    import ray.autoscaler.sdk

    from anogan_batch.errors import MachineError, describe_machine_failure
    from anogan_batch.job.autoscale import wait_for_gpus

    requests = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources",
                        lambda bundles: requests.append(bundles))  # fmt: skip
    with pytest.raises(MachineError) as e:
        wait_for_gpus(0.5, 3, timeout_s=1.0)
    assert requests == [[{"GPU": 0.5, "CPU": 1.0}] * 3, []]  # asked for, then withdrawn
    assert "asked the autoscaler for 3 x 0.5 GPU and waited 1s" in str(e.value)
    assert describe_machine_failure(e.value) == str(e.value)  # exit 1 with this message


def test_a_gpu_group_that_starts_at_zero_is_asked_for_and_waited_on(
    tiny_model, tmp_path, sample, s3_server
):
    from ray.cluster_utils import Cluster

    table = make_patch_table(tmp_path / "p", sample["test_images"][:24])
    env = {FAULTS_ENV: "fake_gpu=1", "PYTHONPATH": REPO}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 0})
    try:
        # a stand-in autoscaler sees the request and adds a GPU node: the job scores on it
        watcher = subprocess.Popen([sys.executable, "-c", STAND_IN_AUTOSCALER, c.address],
                                   stdout=subprocess.PIPE, text=True)  # fmt: skip
        job = subprocess.Popen(
            [sys.executable, "-m", "anogan_batch", "score", tiny_model, str(table),
             str(tmp_path / "out"), *JOB, "--device", "cuda", "--gpu-wait", "120"],
            env={**os.environ, "RAY_ADDRESS": c.address}, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        requested, _ = watcher.communicate(timeout=150)
        assert json.loads(requested) == [{"GPU": 1.0, "CPU": 1.0}]
        gpu_node = c.add_node(num_cpus=4, num_gpus=1)
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err[-3000:]
        m = JobManifest.load(str(tmp_path / "out"))
        assert {a["node_id"] for a in m.runs[-1]["actors"]} == {gpu_node.node_id}
        assert m.scored_rows == 24 and m.status == "succeeded"
    finally:
        c.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
