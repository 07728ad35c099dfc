"""S3 that throttles, fails, resets and stalls (tests/s3_faults.py between the product and moto):
the job's output equals a healthy run's; S3 gone for good is a clear exit 1 and a rerun resumes."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time

import boto3
import numpy as np
import pyarrow.dataset as pads
import pytest

from anogan_batch.io import storage
from anogan_batch.io.patches import decode_map
from anogan_batch.job.layout import JobLayout
from tests.conftest import S3_SECRET, read_delta, run_cli
from tests.s3_faults import EVERY_TENTH, FaultProxy, FaultRates

pytestmark = pytest.mark.s3
SEARCH = ("--iterations", "5", "--batch-size", "8", "--no-progress")
SCANS = 12  # scans of the flaky run (one 28x28 patch each)
ROWS = 96  # patches of the outage run


def keys(bucket: str, prefix: str) -> list[str]:
    pages = (
        boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    )
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def read(uri: str, sort: str) -> list[dict]:
    fs, inner = storage.filesystem_for(uri)
    table = pads.dataset(inner, filesystem=fs, format="parquet", partitioning="hive").to_table()
    return table.sort_by(sort).to_pylist()


def assert_same_rows(got: list[dict], want: list[dict], what: str) -> None:
    assert len(got) == len(want), what
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys(), what
        for k in w:
            if k in ("job_id", "overlay"):
                continue
            if isinstance(w[k], float):
                assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-7), (what, k)
            elif isinstance(w[k], bytes) and k == "residual_map":
                np.testing.assert_allclose(
                    decode_map(g[k], g["height"], g["width"], g["channels"]),
                    decode_map(w[k], w["height"], w["width"], w["channels"]),
                    rtol=1e-3, atol=1e-6,
                )  # fmt: skip
            elif isinstance(w[k], bytes) and k in ("latent", "heatmap"):
                np.testing.assert_allclose(
                    np.frombuffer(g[k], "<f4"), np.frombuffer(w[k], "<f4"), rtol=1e-5, atol=1e-6
                )
            else:
                assert g[k] == w[k], (what, k)


# 10 % of requests fail, in a fixed pattern and at random; the random one also resets
# connections and answers late, and every error of a HEAD comes without a body
PATTERNS = {
    "every_tenth": EVERY_TENTH,
    "random": FaultRates(slow_down=0.05, internal=0.025, reset=0.025, delay=0.05),
}


# `random` holds every fault kind (throttling included) and runs in `make test`; the fixed
# pattern, a minute more of the same path, runs with the slow tests (the suite's 15 minutes)
@pytest.mark.parametrize("pattern", [pytest.param("every_tenth", marks=pytest.mark.slow), "random"])
def test_a_flaky_s3_gives_the_output_of_a_healthy_one(
    pattern, bucket, s3_server, sample, tiny_model, ray_local, tmp_path
):
    from anogan_batch.core.search_config import SearchConfig
    from anogan_batch.io.plots import png_bytes
    from anogan_batch.job.ingest import ingest
    from anogan_batch.job.ingest_config import IngestConfig
    from anogan_batch.job.runner import run_score_job
    from anogan_batch.job.score_config import ScoreJobConfig

    s3 = boto3.client("s3")
    for i in range(SCANS):
        key = f"scans/{sample['test_labels'][i]}/{sample['test_index'][i]:05d}.png"
        s3.put_object(Bucket=bucket, Key=key, Body=png_bytes(sample["test_images"][i]))
    root = f"s3://{bucket}"
    # the healthy run: in this process, straight to moto
    ingest(f"{root}/scans", f"{root}/clean/patches", IngestConfig(28, label_from_parent=True))
    run_score_job(
        ScoreJobConfig(tiny_model, f"{root}/clean/patches", f"{root}/clean/job", batch_size=8,
                       search=SearchConfig(iterations=5), progress=False)
    )  # fmt: skip
    # the flaky run: the commands as users run them, through the fault proxy; each must
    # succeed the first time
    proxy = FaultProxy(s3_server, PATTERNS[pattern], seed=7).start()
    env = {"AWS_ENDPOINT_URL_S3": proxy.url}
    r = run_cli("ingest", f"{root}/scans", f"{root}/flaky/patches", "--patch-size", "28",
                "--label-from-parent", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("score", tiny_model, f"{root}/flaky/patches", f"{root}/flaky/job", *SEARCH,
                "--table-format", "delta", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    iceberg = ("--to", "iceberg", "--warehouse", f"{root}/ice", "--catalog-db",
               str(tmp_path / "c.db"))  # fmt: skip
    for target in (("--to", "delta", "--warehouse", f"{root}/delta"), iceberg):
        r = run_cli("publish", f"{root}/flaky/job", *target, env=env)
        assert r.returncode == 0 and f"{SCANS} rows appended" in r.stdout, r.stderr[-3000:]
    runs = {name: JobLayout(f"{root}/{name}/job") for name in ("clean", "flaky")}
    kinds = ("slow_down",) if pattern == "every_tenth" else ("slow_down", "internal", "reset")
    for kind in (*kinds, "delay") if pattern == "random" else kinds:
        assert proxy.counts[kind] > 0, proxy.counts  # every fault struck
    clean, flaky = runs["clean"], runs["flaky"]
    want = read(clean.patch_scores, "patch_id")
    got = read(flaky.patch_scores, "patch_id")
    assert len({r["patch_id"] for r in got}) == len(got) == SCANS  # nothing lost, nothing twice
    assert_same_rows(got, want, "patch_scores")
    assert_same_rows(read(flaky.heatmaps, "scan_id"), read(clean.heatmaps, "scan_id"), "heatmaps")
    assert_same_rows(read(flaky.scan_scores, "scan_id"), read(clean.scan_scores, "scan_id"), "s")
    for layout in (clean, flaky):
        prefix = layout.overlays.removeprefix(root + "/") + "/"
        overlays = {k.rsplit("/", 1)[1] for k in keys(bucket, prefix)}
        assert len(overlays) == SCANS
    assert {k.rsplit("/", 1)[1] for k in keys(bucket, "flaky/job/overlays/")} == {
        k.rsplit("/", 1)[1] for k in keys(bucket, "clean/job/overlays/")
    }
    job = storage.read_json(flaky.manifest)
    assert job["status"] == "succeeded" and job["input_rows"] == job["scored_rows"] == SCANS
    assert keys(bucket, "flaky/job/patch_scores/_delta_log/")
    got = read_delta(f"{root}/delta/anogan", "patch_scores")["patch_scores"]
    assert got["rows"] == len(got["ids"]) == SCANS


def test_the_retry_policy_lasts_a_process_of_throttling(bucket, s3_server, tmp_path, monkeypatch):
    """Every S3 client the product builds retries for as long as the process lives. The AWS
    SDK's "standard" strategy stops retrying after its 100th retry (a quota pyarrow never
    refills): at 10 % throttling, the 1,000th request of a job failed at once. A ranged read
    shorter than the error's body was never retried at all."""
    from anogan_batch.io import storage
    from anogan_batch.warehouse.iceberg_tables import load_catalog
    from anogan_batch.warehouse.target import WarehouseTarget

    data = bytes(range(256)) * 16
    boto3.client("s3").put_object(Bucket=bucket, Key="k", Body=data)
    proxy = FaultProxy(s3_server, FaultRates(0, 0, 0, 0, every=2)).start()  # 1 in 2 is 503
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    fs, _ = storage.filesystem_for(f"s3://{bucket}/k")
    shipped = pickle.loads(pickle.dumps(fs))  # as a Ray worker gets it
    target = WarehouseTarget(warehouse=f"s3://{bucket}/ice", catalog_db=str(tmp_path / "c.db"))
    catalog = load_catalog(target)
    iceberg = catalog._load_file_io(catalog.properties, f"s3://{bucket}/ice")

    def short_read(filesystem) -> bytes:  # shorter than a 503's body: a small column chunk
        with filesystem.open_input_file(f"{bucket}/k") as f:
            return f.read_at(10, 300)

    clients = {
        "driver": lambda: fs.get_file_info(f"{bucket}/k").size == len(data),
        "driver_short_read": lambda: short_read(fs) == data[300:310],
        "worker": lambda: shipped.get_file_info(f"{bucket}/k").size == len(data),
        "worker_short_read": lambda: short_read(shipped) == data[300:310],
        "iceberg": lambda: iceberg.new_input(f"s3://{bucket}/k").open().read() == data,
    }
    for name, request in clients.items():
        # just past the SDK's quota; a short read is retried here, each try a backoff
        for i in range(10 if name.endswith("short_read") else 110):
            assert request(), (name, i)
    assert proxy.counts["slow_down"] >= 3 * 110 + 2 * 10, proxy.counts


# over a minute; make test keeps the same exit-1-then-rerun path through publishing (below)
@pytest.mark.slow
def test_s3_gone_for_good_fails_clearly_and_a_rerun_resumes(bucket, s3_server, sample, tiny_model):
    from anogan_batch.io.tables import write_patch_table

    root = f"s3://{bucket}"
    write_patch_table(f"{root}/patches", sample["test_images"][:ROWS], files=4)
    proxy = FaultProxy(s3_server, FaultRates(0, 0, 0, 0)).start()
    port = proxy.server.server_address[1]
    env = {"AWS_ENDPOINT_URL_S3": proxy.url, "ANOGAN_S3_MAX_ATTEMPTS": "2"}
    args = ("score", tiny_model, f"{root}/patches", f"{root}/job", *SEARCH,
            "--target-file-mb", "0.03", "--no-heatmaps")  # fmt: skip
    cmd = [sys.executable, "-X", "faulthandler", "-m", "anogan_batch", *args]
    proc = subprocess.Popen(
        cmd, env=os.environ | env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while not keys(bucket, "job/patch_scores/") and time.time() < deadline:
        time.sleep(0.2)
    proxy.down()  # mid-job: some rows are written, most are not
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: S3 at " + proxy.url), last
    assert "rerun the same command" in last  # (Ray's own log above it may hold its stack)
    body = boto3.client("s3").get_object(Bucket=bucket, Key="job/job.json")["Body"].read()
    assert json.loads(body)["status"] in ("running", "failed")
    assert S3_SECRET not in stderr and S3_SECRET.encode() not in body  # even in the error

    FaultProxy(s3_server, FaultRates(0, 0, 0, 0), port=port).start()  # S3 is back
    rerun = run_cli(*args, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    job = json.loads(
        boto3.client("s3").get_object(Bucket=bucket, Key="job/job.json")["Body"].read()
    )
    assert job["status"] == "succeeded" and job["input_rows"] == job["scored_rows"] == ROWS
    assert job["runs"][-1]["rows"] < ROWS  # resumed: rows written before the outage stayed
    ids = [r["patch_id"] for r in read(JobLayout(f"{root}/job").patch_scores, "patch_id")]
    assert len(ids) == len(set(ids)) == ROWS


def test_a_flaky_s3_warehouse_gets_every_job_exactly_once(
    finished_jobs, bucket, s3_server, tmp_path
):
    """Publishing through throttling, 500s, resets and stalls, to Iceberg and Delta on S3: what
    fails says so (no traceback) and its rerun lands; job a published twice is in once."""
    from anogan_batch.warehouse.iceberg_tables import load_catalog
    from anogan_batch.warehouse.target import WarehouseTarget

    rates = FaultRates(slow_down=0.05, internal=0.03, reset=0.03, delay=0.05)
    proxy = FaultProxy(s3_server, rates, seed=11).start()
    iceberg = WarehouseTarget(warehouse=f"s3://{bucket}/ice", catalog_db=str(tmp_path / "c.db"))
    targets = {
        "iceberg": ["--warehouse", iceberg.warehouse, "--catalog-db", iceberg.catalog_db],
        "delta": ["--warehouse", f"s3://{bucket}/delta"],
    }
    failed = []
    for to, where in targets.items():
        for name in ("a", "b", "a"):
            for _ in range(4):  # a publish that fails is rerun, as a user or a scheduler would
                r = run_cli("publish", finished_jobs[name], "--to", to, *where,
                            env={"AWS_ENDPOINT_URL_S3": proxy.url})  # fmt: skip
                if r.returncode == 0:
                    break
                failed.append(r.stderr)
                assert "Traceback" not in r.stderr and r.stderr.startswith("error: "), r.stderr
            assert r.returncode == 0, r.stderr[-3000:]
    assert sum(proxy.counts[k] for k in ("slow_down", "internal", "reset")) > 0, proxy.counts
    expected = 40  # 24 patches of job a, 16 of job b
    ids = load_catalog(iceberg).load_table("anogan.patch_scores").scan().to_arrow()["patch_id"]
    assert len(ids) == len(set(ids.to_pylist())) == expected
    got = read_delta(f"s3://{bucket}/delta/anogan", "patch_scores")["patch_scores"]
    assert got["rows"] == len(got["ids"]) == expected


def test_s3_gone_during_publish_fails_clearly_and_a_rerun_lands(
    finished_jobs, bucket, s3_server, tmp_path
):
    proxy = FaultProxy(s3_server, FaultRates(0, 0, 0, 0)).start()
    env = {"AWS_ENDPOINT_URL_S3": proxy.url, "ANOGAN_S3_MAX_ATTEMPTS": "2"}
    port = proxy.server.server_address[1]
    catalog_db = str(tmp_path / "c.db")
    commands = {
        to: ("publish", finished_jobs["a"], "--to", to, "--warehouse", f"s3://{bucket}/{to}")
        for to in ("iceberg", "delta")
    }
    commands["iceberg"] += ("--catalog-db", catalog_db)
    proxy.down()
    for args in commands.values():
        r = run_cli(*args, env=env, timeout=300)
        assert r.returncode == 1, r.stderr[-3000:]
        assert r.stderr.startswith(f"error: S3 at {proxy.url}"), r.stderr[-3000:]
        assert "rerun the same command" in r.stderr and S3_SECRET not in r.stderr
    FaultProxy(s3_server, FaultRates(0, 0, 0, 0), port=port).start()  # S3 is back
    for args in commands.values():
        r = run_cli(*args, env=env, timeout=300)
        assert r.returncode == 0 and "24 rows appended" in r.stdout, r.stderr[-3000:]


def test_concurrent_delta_publishes_on_s3_all_land_once(finished_jobs, bucket):
    """Two jobs, each published twice at once, into Delta tables on S3 that do not exist yet:
    deltalake commits with a conditional put, and the same job's second commit conflicts."""
    from tests.conftest import run_cli_concurrently

    wh = f"s3://{bucket}/delta"
    run_cli_concurrently(*(["publish", finished_jobs[n], "--to", "delta", "--warehouse", wh]
                           for n in ("a", "b", "a", "b")))  # fmt: skip
    got = read_delta(f"{wh}/anogan", "patch_scores")["patch_scores"]
    assert got["rows"] == len(got["ids"]) == 40
