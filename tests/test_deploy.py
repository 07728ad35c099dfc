"""jobs/ and cluster/: specs parse, entrypoints are real CLI calls, GPU numbers agree, and a
job submitted through the Jobs API of a real `ray start --head` succeeds."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from anogan_batch.cli import app
from anogan_batch.job.score_config import parse_actors
from anogan_batch.job.submit import load_spec

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted([*ROOT.glob("jobs/*.yaml"), *ROOT.glob("cluster/*.yaml")])
GPUS_PER_INSTANCE = {"g5.xlarge": 1, "g5.12xlarge": 4, "p4d.24xlarge": 8, "m6i.2xlarge": 0}


def parse_cli(argv: list[str]) -> dict:
    """Parse an entrypoint with the real CLI (no execution); returns the command's params."""
    import typer.main

    assert argv[0] == "anogan-batch", argv
    group = typer.main.get_command(app)
    command = group.commands[argv[1]]
    return command.make_context(argv[1], list(argv[2:])).params


def worker_gpus(spec: dict) -> list[tuple[int, int, int]]:
    """(gpus per pod, max pods, ray num-gpus) of every KubeRay worker group; checks agreement."""
    groups = []
    for group in spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limit = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        request = int(container["resources"]["requests"].get("nvidia.com/gpu", 0))
        ray_gpus = int(group["rayStartParams"].get("num-gpus", 0))
        assert limit == request == ray_gpus, group["groupName"]
        groups.append((limit, group.get("maxReplicas", group["replicas"]), ray_gpus))
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    (container,) = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    return groups


def gpu_demand(params: dict) -> float:
    _, hi = parse_actors(params["actors"])
    return hi * (params["gpus_per_actor"] or 1.0)


def flags_off_default(argv: list[str]) -> dict[str, tuple[str, ...]]:
    """The options of a `score` entrypoint whose values are not score's defaults: its first
    name -> all its names (--progress/--no-progress)."""
    import typer.main

    command = typer.main.get_command(app).commands["score"]
    values = parse_cli(argv)
    return {
        p.opts[0]: (*p.opts, *p.secondary_opts)
        for p in command.params
        if p.param_type_name == "option" and values[p.name] != p.default
    }


def comments(path: Path) -> str:
    return "\n".join(line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line)


SCORE_SPECS = {  # the spec file -> its score entrypoint
    "jobs/score.yaml": lambda path: load_spec(str(path)).argv,
    "cluster/kuberay-rayjob.yaml": lambda path: shlex.split(
        yaml.safe_load(path.read_text())["spec"]["entrypoint"]
    ),
}


@pytest.mark.parametrize("name", SCORE_SPECS)
def test_score_specs_keep_score_defaults_but_the_flags_they_comment_on(name):
    path = ROOT / name
    off = flags_off_default(SCORE_SPECS[name](path))
    assert "--device" in off  # GPU specs ask for GPUs
    assert not set(off) & {"--iterations", "--batch-size", "--precision", "--start"}
    said = comments(path)
    assert not [flag for flag, names in off.items() if not any(n in said for n in names)]


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


JOB_SPECS = [p for p in sorted(ROOT.glob("jobs/*.yaml")) if p.name != "runtime_env.yaml"]


@pytest.mark.parametrize("path", JOB_SPECS, ids=lambda p: p.name)
def test_job_spec_entrypoints_are_real_cli_calls(path):
    spec = load_spec(str(path))
    params = parse_cli(spec.argv)
    for key, value in params.items():
        if isinstance(value, str):
            assert "${" not in value, key


def test_rayjob_entrypoint_is_a_real_cli_call_and_fits_its_gpus():
    doc = yaml.safe_load((ROOT / "cluster/kuberay-rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    params = parse_cli(shlex.split(doc["spec"]["entrypoint"]))
    assert params["model_dir"].startswith("s3://") and params["out"].startswith("s3://")
    groups = worker_gpus(doc["spec"]["rayClusterSpec"])
    assert gpu_demand(params) <= sum(g * n for g, n, _ in groups)


def test_raycluster_gpus_fit_the_score_job_spec():
    doc = yaml.safe_load((ROOT / "cluster/kuberay-raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    groups = worker_gpus(doc["spec"])
    params = parse_cli(load_spec(str(ROOT / "jobs/score.yaml")).argv)
    assert gpu_demand(params) <= sum(g * n for g, n, _ in groups)


def test_cluster_launcher_gpu_resources_match_instances():
    doc = yaml.safe_load((ROOT / "cluster/aws-gpu.yaml").read_text())
    total = 0
    for name, node in doc["available_node_types"].items():
        gpus = GPUS_PER_INSTANCE[node["node_config"]["InstanceType"]]
        assert node["resources"].get("GPU", 0) == gpus, name
        assert "instance-profile" in node["node_config"]["IamInstanceProfile"]["Arn"], name
        total += gpus * node.get("max_workers", 1 if name == doc["head_node_type"] else 0)
    params = parse_cli(load_spec(str(ROOT / "jobs/score.yaml")).argv)
    assert gpu_demand(params) <= total


def test_set_overrides_and_unknown_variables(tmp_path):
    from anogan_batch.errors import ConfigError

    spec = load_spec(str(ROOT / "jobs/score.yaml"), {"OUT": "s3://b/o", "ACTORS": "3"})
    assert "s3://b/o" in spec.argv and spec.argv[spec.argv.index("--actors") + 1] == "3"
    with pytest.raises(ConfigError, match="NOPE"):
        load_spec(str(ROOT / "jobs/score.yaml"), {"NOPE": "1"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("entrypoint: anogan-batch score ${MISSING} a b\n")
    with pytest.raises(ConfigError, match="MISSING"):
        load_spec(str(bad))


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` with token auth, the Jobs API on a free port. A head that
    exits before its dashboard answers (a free port taken in between, on a busy machine) is
    started again on new ports; its own output says why."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": os.urandom(16).hex(),
        # the job's entrypoint must find this venv's anogan-batch
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    }
    log = tmp_path / "ray-head.log"
    for _ in range(3):
        proc, address = _start_head(env, log)
        if _dashboard_up(proc, address, deadline=time.time() + 60):
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    else:
        pytest.fail(f"the Ray head never served its dashboard: {log.read_text()[-3000:]}")
    yield address, env
    os.killpg(proc.pid, signal.SIGKILL)  # the head and everything it started
    proc.wait(timeout=30)


def _start_head(env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    from tests.conftest import _free_port

    port, dash = _free_port(), _free_port()
    with open(log, "a") as out:
        proc = subprocess.Popen(
            [
                "ray",
                "start",
                "--head",
                "--block",
                f"--port={port}",
                f"--dashboard-port={dash}",
                # ports of its own: the suite's local Ray (ray_local) already holds the agent's
                # default ports, and a head whose agent cannot bind answers "No available agent"
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--dashboard-agent-grpc-port={_free_port()}",
                f"--metrics-export-port={_free_port()}",
                f"--runtime-env-agent-port={_free_port()}",
                "--include-dashboard=true",
                "--num-cpus=4",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, f"http://127.0.0.1:{dash}"


def _dashboard_up(proc: subprocess.Popen, address: str, deadline: float) -> bool:
    while time.time() < deadline and proc.poll() is None:
        try:  # the dashboard comes up a few seconds after the head
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return True
        except urllib.error.HTTPError:  # 401 without the token: it is up
            return True
        except OSError:
            time.sleep(1)
    return False


def test_submit_a_score_job_through_the_jobs_api(ray_head, tmp_path, tiny_model, test_table):
    address, env = ray_head
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "anogan_batch",
        "submit",
        str(ROOT / "jobs/score.yaml"),
        "--address",
        address,
        "--set",
        f"MODEL_DIR={tiny_model}",
        "--set",
        f"PATCHES={test_table}",
        "--set",
        f"OUT={out}",
        "--set",
        "ACTORS=1",
        "--set",
        "DEVICE=cpu",
        "--timeout",
        "400",
    ]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUCCEEDED" in r.stdout
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "succeeded" and job["scored_rows"] == job["input_rows"] == 60


def test_submit_waits_for_the_job_agent_of_a_fresh_head(monkeypatch):
    # a head that has just started answers 500 "No available agent" for a few seconds
    from anogan_batch.job import submit

    class Client:
        calls = 0

        def submit_job(self, **kwargs):
            Client.calls += 1
            if Client.calls < 3:
                raise RuntimeError("Request failed with status code 500: No available agent")
            return "raysubmit_1"

    monkeypatch.setattr(submit.time, "sleep", lambda s: None)
    assert submit._submit_when_ready(Client(), submit.JobSpec("true")) == "raysubmit_1"
    assert Client.calls == 3

    class Broken:
        def submit_job(self, **kwargs):
            raise RuntimeError("Request failed with status code 400: bad runtime_env")

    with pytest.raises(RuntimeError, match="bad runtime_env"):
        submit._submit_when_ready(Broken(), submit.JobSpec("true"))
