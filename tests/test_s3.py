"""S3 everywhere, against a real S3 endpoint (moto's server): ingest, train, score, eval, report."""

from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import boto3
import numpy as np
import pytest
import tifffile

from anogan_batch.errors import InputError, redact
from anogan_batch.io import storage
from anogan_batch.job.layout import JobLayout
from tests.conftest import S3_SECRET, run_cli

pytestmark = pytest.mark.s3


SESSION_TOKEN = "fAkE-sEsSiOn-ToKeN-9d3e"


def keys(bucket: str, prefix: str) -> list[str]:
    pages = (
        boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    )
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_whole_flow_on_s3_never_shows_the_secret(bucket, sample):
    from anogan_batch.io.plots import png_bytes

    s3 = boto3.client("s3")
    for img, label, idx in zip(
        sample["test_images"][:40],
        sample["test_labels"][:40],
        sample["test_index"][:40],
        strict=True,
    ):
        s3.put_object(Bucket=bucket, Key=f"scans/{label}/{idx:05d}.png", Body=png_bytes(img))
    tif = io.BytesIO()
    tifffile.imwrite(tif, sample["test_images"][40:43], photometric="minisblack")  # 3 pages
    s3.put_object(Bucket=bucket, Key="scans/0/stack.tif", Body=tif.getvalue())
    root = f"s3://{bucket}"
    steps = [
        (
            "ingest",
            f"{root}/scans",
            f"{root}/patches",
            "--patch-size",
            "28",
            "--label-from-parent",
            "--engine",
            "ray",  # files are read from S3 by Ray tasks, not by this process
        ),
        (
            "train",
            f"{root}/patches",
            f"{root}/model",
            "--epochs",
            "1",
            "--g-width",
            "4",
            "--d-width",
            "4",
            "--latent-dim",
            "8",
            "--no-progress",
        ),
        (
            "score",
            f"{root}/model",
            f"{root}/patches",
            f"{root}/job",
            "--iterations",
            "3",
            "--batch-size",
            "16",
            "--no-progress",
            "--table-format",
            "delta",
        ),
        ("eval", f"{root}/job", "--normal-label", "0"),
        ("report", f"{root}/job"),
    ]
    # a session token too (as temporary credentials carry), and Ray's logs in a folder of our
    # own so that every line the job's workers logged is searched (short: socket paths)
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    env = {"AWS_SESSION_TOKEN": SESSION_TOKEN, "RAY_TMPDIR": ray_tmp}
    output = ""
    for args in steps:
        r = run_cli(*args, env=env)
        output += r.stdout + r.stderr
        assert r.returncode == 0, (args[0], r.stderr)
    # a bad run's error message too
    r = run_cli("score", f"{root}/model", f"{root}/no-such-table", f"{root}/job2", env=env)
    assert r.returncode == 2, r.stderr
    output += r.stdout + r.stderr
    for secret in (S3_SECRET, SESSION_TOKEN):
        assert secret not in output
        logs = [p for p in Path(ray_tmp).rglob("*") if p.is_file() and not p.is_socket()]
        assert any(p.suffix in (".out", ".err", ".log") for p in logs)  # Ray did log
        assert not [p for p in logs if secret.encode() in p.read_bytes()]
    shutil.rmtree(ray_tmp, ignore_errors=True)
    job = json.loads(s3.get_object(Bucket=bucket, Key="job/job.json")["Body"].read())
    assert job["status"] == "succeeded" and job["scored_rows"] == job["input_rows"] == 43
    assert any(k.startswith("job/patch_scores/job_id=") for k in keys(bucket, "job/"))
    assert "job/patch_scores/_delta_log/00000000000000000000.json" in keys(bucket, "job/")
    overlay = JobLayout(f"s3://{bucket}/job").overlay("0/stack")  # a TIFF stack: one scan
    assert overlay.removeprefix(f"s3://{bucket}/") in keys(bucket, "job/overlays/")
    assert keys(bucket, "job/heatmaps/")
    assert keys(bucket, "job/scan_scores/")
    assert not keys(bucket, "job/_checkpoint/")
    for key in (
        "model/weights.safetensors",
        "model/samples.png",
        "job/metrics.json",
        "job/report.html",
    ):
        assert key in keys(bucket, key.split("/")[0] + "/"), key
    for key in keys(bucket, ""):  # job.json, the report, every table
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert S3_SECRET.encode() not in body, key
        assert SESSION_TOKEN.encode() not in body, key


def test_large_job_groupby_on_ray_reads_and_writes_s3(bucket, sample, tiny_model, ray_local):
    # a small job groups its scans in the driver; a large one runs the same code as a Ray
    # Data groupby whose tasks read and write S3 themselves
    import pyarrow.parquet as pq

    from anogan_batch.core.modeldir import load_model
    from anogan_batch.core.search_config import SearchConfig
    from anogan_batch.io.tables import open_dataset, write_patch_table
    from anogan_batch.job.aggregate import write_scan_tables
    from anogan_batch.job.scorer import score_table

    root = f"s3://{bucket}"
    # hostile scan ids: on S3 too, nothing may land outside the job's prefix
    names = ["../../escape", "/abs/x", "scan2", "..", "a" * 1100]
    scan_ids = [names[i % 5] for i in range(30)]
    write_patch_table(f"{root}/patches", sample["test_images"][:30], scan_ids=scan_ids)
    model = load_model(tiny_model).for_scoring("cpu")
    rows = open_dataset(f"{root}/patches").to_table()
    scored = score_table(model, rows, SearchConfig(iterations=2), job_id="j", device="cpu")
    fs, inner = storage.filesystem_for(f"{root}/job/patch_scores/part-0.parquet")
    pq.write_table(scored, inner, filesystem=fs)
    assert write_scan_tables(f"{root}/job", f"{root}/patches", heatmaps=(28, 1)) == "ray"
    scans = open_dataset(f"{root}/job/scan_scores").to_table().sort_by("scan_id").to_pylist()
    assert [(r["scan_id"], r["n_patches"]) for r in scans] == [(n, 6) for n in sorted(names)]
    assert len([k for k in keys(bucket, "job/overlays/") if k.endswith(".png")]) == 5
    assert {k.split("/")[0] for k in keys(bucket, "")} == {"patches", "job"}
    assert not [k for k in keys(bucket, "") if ".." in k.split("/")]


def test_generic_endpoint_variable_is_honoured(bucket, s3_server, monkeypatch):
    """AWS_ENDPOINT_URL (all services) works when AWS_ENDPOINT_URL_S3 is not set."""
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    path = f"s3://{bucket}/dir/x.json"
    storage.write_json(path, {"a": 1})
    assert storage.read_json(path) == {"a": 1}
    assert storage.list_files(f"s3://{bucket}/dir") == [path]
    assert storage.is_dir(f"s3://{bucket}/dir") and not storage.exists(f"s3://{bucket}/nope")
    storage.delete(f"s3://{bucket}/dir")
    assert not storage.list_files(f"s3://{bucket}/dir")


def test_s3_patch_table_round_trip_through_tables(bucket, sample):
    from anogan_batch.io.tables import open_patch_table, write_patch_table

    path = f"s3://{bucket}/t"
    write_patch_table(path, sample["test_images"][:10], files=2)
    ds = open_patch_table(path)
    assert ds.count_rows() == 10
    img = ds.to_table(columns=["image"]).column("image")[3].as_py()
    np.testing.assert_array_equal(
        np.frombuffer(img, np.uint8).reshape(28, 28), sample["test_images"][3]
    )


def test_missing_bucket_is_a_clear_error(s3_server, tmp_path):
    r = run_cli("score", "s3://no-such-bucket/model", str(tmp_path), str(tmp_path / "o"))
    assert r.returncode == 2 and "no-such-bucket/model" in r.stderr
    assert "Traceback" not in r.stderr


def test_credentials_in_a_uri_are_refused_without_echoing_them():
    with pytest.raises(InputError) as e:
        storage.filesystem_for("s3://AKIDEXAMPLE:sEcReT-in-uri@bucket/patches")
    assert "sEcReT-in-uri" not in str(e.value) and "bucket/patches" in str(e.value)


def test_redact_hides_every_credential_variable(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "t0ken-value")
    text = redact("GET ?X-Amz-Security-Token=t0ken-value failed (key s3cr3t-value)")
    assert "t0ken-value" not in text and "s3cr3t-value" not in text
    assert "<AWS_SESSION_TOKEN>" in text


def test_a_child_failing_on_s3_runs_again_and_other_failures_do_not(tmp_path, monkeypatch):
    """deltalake's children (Delta conversion, publish) do idempotent work; object_store gives
    up on some transient faults at once, so a child that failed on S3 runs again."""
    from anogan_batch.io.s3 import run_retried_child

    monkeypatch.setenv("ANOGAN_S3_MAX_ATTEMPTS", "4")
    tries = tmp_path / "tries"
    script = (
        "import pathlib, sys; p = pathlib.Path(sys.argv[1]); n = len(p.read_text()) "
        "if p.exists() else 0; p.write_text('x' * (n + 1)); "
        "sys.exit(sys.stderr.write(sys.argv[2]) and 1 if n < 2 else 0)"
    )
    s3_fault = "OSError: Generic S3 error: connection reset"
    done = run_retried_child([sys.executable, "-c", script, str(tries), s3_fault])
    assert done.returncode == 0 and len(tries.read_text()) == 3  # two failures, then done
    tries.unlink()
    done = run_retried_child([sys.executable, "-c", script, str(tries), "ValueError: bad row"])
    assert done.returncode == 1 and len(tries.read_text()) == 1  # not S3: never again


def test_a_slide_on_s3_is_read_by_region_in_units(bucket, tmp_path, monkeypatch):
    """A pyramidal slide in the bucket: tiles fetched by ranged reads, never the whole file,
    cut in several work units, the same rows as from a local copy."""
    import pyarrow.dataset as pads

    from anogan_batch.ingest import plan
    from anogan_batch.job.ingest import ingest
    from anogan_batch.job.ingest_config import IngestConfig
    from tests.slides import slide_pixels, write_pyramid

    local = tmp_path / "src"
    local.mkdir()
    write_pyramid(local / "slide.tif", slide_pixels(900, 1300), mpp=0.25)
    boto3.client("s3").upload_file(str(local / "slide.tif"), bucket, "slides/a/slide.tif")
    monkeypatch.setattr(plan, "UNIT_PATCHES", 10)
    cfg = IngestConfig(patch_size=64, mpp=0.5, min_foreground=0.3, engine="local")
    ingest(f"s3://{bucket}/slides/a", f"s3://{bucket}/slide-patches", cfg)
    ingest(str(local), str(tmp_path / "local-patches"), cfg)
    from_s3 = pads.dataset(f"{bucket}/slide-patches", format="parquet",
                           filesystem=storage.filesystem_for(f"s3://{bucket}/x")[0])  # fmt: skip
    rows = from_s3.to_table().sort_by("patch_id")
    assert rows.num_rows > 20 and len([k for k in keys(bucket, "slide-patches/") if "-u" in k]) > 1
    want = pads.dataset(tmp_path / "local-patches", format="parquet").to_table()
    assert rows.equals(want.sort_by("patch_id"))


def test_read_bytes_holds_no_more_than_its_limit(bucket):
    """A size from data never becomes an allocation: with a limit, one byte past it is all a
    read holds of a larger object (the caller then refuses it), on S3 as on disk."""
    from anogan_batch.io import storage

    body = bytes(range(256)) * 40  # 10,240 bytes
    boto3.client("s3").put_object(Bucket=bucket, Key="big.bin", Body=body)
    path = f"s3://{bucket}/big.bin"
    assert storage.read_bytes(path, 100) == body[:101]
    assert storage.read_bytes(path, len(body)) == body
    assert storage.read_bytes(path) == body
