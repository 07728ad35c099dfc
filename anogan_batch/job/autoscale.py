"""GPU worker groups that start at zero: ask Ray's autoscaler for the job's GPUs, then wait.

A cluster whose GPU group scales from zero (cluster/aws-gpu.yaml `min_workers: 0`, KubeRay
`minReplicas: 0`) has no GPU when the job starts. Planning the actor pool from what the
cluster has now would plan CPU actors and never ask for a GPU, so a job that wants GPUs
(`--device cuda`, or `--gpus-per-actor G`) asks the autoscaler for them
(`ray.autoscaler.sdk.request_resources`) and waits up to `--gpu-wait` seconds. The request
is withdrawn once the GPUs are there (the actors then hold them) or the wait is over, so the
group can scale down again when the job ends.
"""

from __future__ import annotations

import logging
import time

from anogan_batch.errors import MachineError

log = logging.getLogger(__name__)

POLL_S = 2.0


def wait_for_gpus(gpus_per_actor: float, actors: int, timeout_s: float) -> dict[str, float]:
    """Ask for `actors` bundles of `gpus_per_actor` GPUs (and one CPU each) and wait until
    the cluster has at least one actor's worth; -> the cluster's resources then. MachineError
    past `timeout_s`, naming what was asked for."""
    import ray
    from ray.autoscaler.sdk import request_resources

    have = ray.cluster_resources().get("GPU", 0.0)
    if have >= gpus_per_actor:
        return ray.cluster_resources()
    bundles = [{"GPU": gpus_per_actor, "CPU": 1.0}] * max(1, actors)
    asked = f"{len(bundles)} x {gpus_per_actor:g} GPU"
    log.warning("the cluster has %g GPUs: asking the autoscaler for %s (waiting up to %gs)",
                have, asked, timeout_s)  # fmt: skip
    request_resources(bundles=bundles)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            resources = ray.cluster_resources()
            if resources.get("GPU", 0.0) >= gpus_per_actor:
                log.warning("%g GPU(s) joined the cluster", resources["GPU"])
                return resources
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
    finally:
        request_resources(bundles=[])  # withdrawn: the actors hold what they got
    raise MachineError(
        f"the job wants GPU actors but the Ray cluster has "
        f"{ray.cluster_resources().get('GPU', 0.0):g} GPUs: asked the autoscaler for {asked} "
        f"and waited {timeout_s:g}s. Check the cluster's GPU worker group (max workers, "
        "quotas, instance availability), raise --gpu-wait, or score with --device cpu"
    )
