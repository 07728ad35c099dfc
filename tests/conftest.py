"""Shared fixtures: real data (MNIST sample), a tiny trained model, patch tables, local Ray."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anogan_batch.io.patches import patch_id_for

# Small enough to train in ~3 s on 2 cores, good enough that the search matters (AUROC ~0.94
# on the demo task with 40 search steps, measured).
TINY_TRAIN = {
    "epochs": 4, "g_width": 16, "d_width": 16, "latent_dim": 32, "lr": 5e-4, "seed": 0,
    "encoder_epochs": 3,
}  # fmt: skip


@pytest.fixture(scope="session")
def sample() -> dict[str, np.ndarray]:
    """The demo's bundled MNIST sample: 4,000 training zeros, 300 held-out digits."""
    from anogan_batch.evaluation.demo import load_sample

    return load_sample()


def make_patch_table(path: Path, pixels: np.ndarray, labels=None, *, ids=None, files=1) -> Path:
    """A patch table from arrays (scan_id = the part of the id before '#')."""
    from anogan_batch.io.tables import write_patch_table

    n = len(pixels)
    ids = ids or [patch_id_for(f"scan{i:05d}", 0, 0, pixels.shape[1]) for i in range(n)]
    scans = [i.split("#")[0] if i is not None else None for i in ids]
    write_patch_table(str(path), pixels, labels, ids=ids, scan_ids=scans, files=files)
    return path


def read_ids(table: Path | str) -> list[str]:
    """The patch_ids of a patch table, in file order."""
    import pyarrow.dataset as pads

    return pads.dataset(str(table)).to_table(columns=["patch_id"]).column("patch_id").to_pylist()


READ_DELTA = """
import json, sys
from deltalake import DeltaTable
from anogan_batch.io.s3 import object_store_options
out = {}
for name in sys.argv[2:]:
    uri = f"{sys.argv[1]}/{name}"
    t = DeltaTable(uri, storage_options=object_store_options(uri)).to_pyarrow_table()
    ids = t.column("patch_id").to_pylist() if "patch_id" in t.column_names else []
    out[name] = {"rows": t.num_rows, "columns": t.column_names, "ids": sorted(set(ids)),
                 "jobs": sorted(set(t.column("job_id").to_pylist()))}
print(json.dumps(out), flush=True)
import os; os._exit(0)  # deltalake's runtime may abort at exit (warehouse/delta_in_place.py)
"""


def read_delta(folder: str, *tables: str) -> dict:
    """Delta tables under folder (local or s3://), read by deltalake in a child process:
    {table: rows, columns, distinct patch ids, distinct job ids}."""
    r = subprocess.run([sys.executable, "-c", READ_DELTA, folder, *tables], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, sample) -> str:
    """A very small GAN trained on 2,048 real zeros (seconds on CPU); BN statistics are real."""
    from anogan_batch.core.model_config import TrainConfig
    from anogan_batch.core.training import train_gan

    root = tmp_path_factory.mktemp("tiny")
    table = make_patch_table(root / "train", sample["train_images"][:2048])
    model_dir = root / "model"
    train_gan(str(table), str(model_dir), TrainConfig(**TINY_TRAIN), progress=False)
    return str(model_dir)


@pytest.fixture(scope="session")
def loaded_tiny(tiny_model):
    from anogan_batch.core.modeldir import load_model

    return load_model(tiny_model)  # frozen


@pytest.fixture(scope="session")
def test_table(tmp_path_factory, sample) -> str:
    """60 held-out digits (labels '0'..'9') as a patch table in 3 files."""
    root = tmp_path_factory.mktemp("table")
    labels = [str(v) for v in sample["test_labels"][:60]]
    ids = [patch_id_for(f"digits/{i:05d}", 0, 0, 28) for i in sample["test_index"][:60]]
    return str(
        make_patch_table(root / "patches", sample["test_images"][:60], labels, ids=ids, files=3)
    )


@pytest.fixture(scope="session")
def finished_jobs(ray_local, tiny_model, sample, tmp_path_factory) -> dict[str, str]:
    """Two finished jobs over different patches (OUT folders by name 'a', 'b') for the
    warehouse tests: 24 and 16 patches, 6 and 4 scans, calibrated p-values, BH flags."""
    from anogan_batch.core.search_config import SearchConfig
    from anogan_batch.job.runner import run_score_job
    from anogan_batch.job.score_config import ScoreJobConfig

    root = tmp_path_factory.mktemp("iceberg-jobs")
    images = sample["test_images"]
    outs = {}
    for name, lo, hi in (("a", 0, 24), ("b", 24, 40)):
        ids = [patch_id_for(f"{name}/scan{i // 4}", 28 * (i % 4), 0, 28) for i in range(lo, hi)]
        table = make_patch_table(root / f"patches-{name}", images[lo:hi], ids=ids, files=2)
        out = str(root / f"job-{name}")
        run_score_job(
            ScoreJobConfig(
                tiny_model,
                str(table),
                out,
                search=SearchConfig(),  # the calibrated one: p-values
                progress=False,
                heatmaps=False,
                fdr=0.1,
            )
        )
        outs[name] = out
    return outs


# A distinctive secret: tests assert it never shows up in output, logs or written files.
S3_SECRET = "tEsT-sEcReT-4f1c9e2b7a"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint: moto's server in its own process on 127.0.0.1.

    The AWS variables are set for the whole session (before Ray starts, so Ray workers inherit
    them, as they would inherit an instance profile on a cluster).
    """
    import time
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    env = {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(s3_server, request) -> str:
    """A fresh bucket per test, named after it (a hash of its whole id keeps the cases of a
    parametrized test apart)."""
    import hashlib
    import re

    import boto3

    slug = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") or "b"
    name = f"{slug}-{hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the session's in-process pipeline tests (started like the CLI does).

    Depends on s3_server so that the workers inherit the S3 endpoint and credentials.
    """
    import ray

    from anogan_batch.job.raykit import connect_ray

    os.environ.pop("RAY_ADDRESS", None)
    connect_ray()
    yield ray
    ray.shutdown()


# an error-level line: Ray's C++ ("[time E pid tid]"), Python's logging, or a traceback
ERROR_LINE = re.compile(r"^\[[^\]]* E \d+ \d+\]|^ERROR|^Traceback|\bE\d{4} ", re.M)


def run_cli_concurrently(*commands: list[str], timeout: int = 300) -> None:
    """Start the `anogan-batch` commands at once, each its own process; all must exit 0."""
    procs = [
        subprocess.Popen([sys.executable, "-m", "anogan_batch", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for args in commands
    ]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-2000:]


def run_cli(
    *args: str, env: dict | None = None, timeout: int = 600, prefix: list[str] | None = None
) -> subprocess.CompletedProcess:
    """Run the real `anogan-batch` entry point in a subprocess (`prefix`: a wrapper command)."""
    # a stray RAY_ADDRESS would send the job to some other cluster
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (env or {})
    return subprocess.run(
        # -X faulthandler: a crash in native code (Ray, torch) leaves its Python stack in stderr
        [*(prefix or []), sys.executable, "-X", "faulthandler", "-m", "anogan_batch", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


# In CI (.ci/run sets ANOGAN_STRICT_SKIPS) a skip hides a test that never ran: it fails, unless
# the test needs what CI cannot have (a GPU, data outside the clone).
EXCUSED_SKIPS = ("gpu", "data")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    strict = os.environ.get("ANOGAN_STRICT_SKIPS")
    if strict and report.skipped and not any(item.get_closest_marker(m) for m in EXCUSED_SKIPS):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (ANOGAN_STRICT_SKIPS): {report.longrepr}"
