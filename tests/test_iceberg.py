"""Iceberg publishing: long-lived tables that many jobs append to, exactly once, on a real
pyiceberg SQL catalog (SQLite) read back with pyiceberg and DuckDB."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from anogan_batch.errors import ConfigError, InputError
from anogan_batch.warehouse.target import WarehouseTarget
from tests.conftest import make_patch_table, read_ids, run_cli, run_cli_concurrently

pytest.importorskip("pyiceberg")


def read(target: WarehouseTarget, table: str):
    from anogan_batch.warehouse.iceberg_tables import load_catalog

    return load_catalog(target).load_table(f"{target.namespace}.{table}").scan().to_arrow()


def test_jobs_append_exactly_once_and_duckdb_reads_them(finished_jobs, tmp_path):
    import duckdb

    from anogan_batch.warehouse.iceberg_tables import append_job_to_iceberg

    target = WarehouseTarget(warehouse=str(tmp_path / "wh"))
    first = append_job_to_iceberg(finished_jobs["a"], target)
    assert first == {"patch_scores": 24, "scan_scores": 6, "jobs": 1}  # no quarantine
    assert set(append_job_to_iceberg(finished_jobs["a"], target).values()) == {"already published"}
    append_job_to_iceberg(finished_jobs["b"], target)

    patch_scores = read(target, "patch_scores")  # DuckDB reads it by name
    job_rows = read(target, "jobs")  # noqa: F841
    rows = duckdb.sql(
        "select j.job_id, count(*), count(distinct p.patch_id), count(p.p_value) "
        "from patch_scores p join job_rows j using (job_id) group by all order by 2"
    ).fetchall()
    assert [r[1:] for r in rows] == [(16, 16, 16), (24, 24, 24)]
    assert "residual_map" not in patch_scores.column_names  # stays in the job's own files
    lineage = read(target, "jobs").to_pylist()
    assert {r["out"] for r in lineage} == {os.path.abspath(p) for p in finished_jobs.values()}
    assert all(json.loads(r["params"])["fdr"] == 0.1 for r in lineage)


def test_the_sql_of_docs_warehouse_runs_on_a_multi_job_table(finished_jobs, tmp_path):
    import re

    import duckdb
    import pyarrow.dataset as pads

    from anogan_batch.warehouse.iceberg_tables import append_job_to_iceberg

    target = WarehouseTarget(warehouse=str(tmp_path / "wh"))
    for out in finished_jobs.values():
        append_job_to_iceberg(out, target)
    con = duckdb.connect()
    for name in ("patch_scores", "scan_scores", "jobs"):
        con.register(name, read(target, name))
    doc = (Path(__file__).parents[1] / "docs" / "warehouse.md").read_text()
    complete, flagged, by_model = re.findall(r"```sql\n(.*?)```", doc, re.S)
    assert len(con.sql(complete).fetchall()) == 40
    own = [pads.dataset(Path(out) / "scan_scores").to_table() for out in finished_jobs.values()]
    expected = sorted(r["scan_id"] for t in own for r in t.to_pylist() if r["flagged"])
    assert expected  # job b's scans hold mostly non-zero digits: BH flags them
    assert sorted(r[0] for r in con.sql(flagged).fetchall()) == expected
    (row,) = con.sql(by_model).fetchall()  # one model, both jobs
    assert row[2] == 40 and 0 <= row[5] <= 1 and row[3] <= row[4]


@pytest.mark.s3
def test_a_warehouse_on_s3(finished_jobs, bucket, tmp_path):
    import boto3

    from anogan_batch.warehouse.iceberg_tables import append_job_to_iceberg

    target = WarehouseTarget(warehouse=f"s3://{bucket}/wh", catalog_db=str(tmp_path / "c.sqlite"))
    assert append_job_to_iceberg(finished_jobs["a"], target)["patch_scores"] == 24
    assert set(append_job_to_iceberg(finished_jobs["a"], target).values()) == {"already published"}
    assert read(target, "patch_scores").num_rows == 24
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="wh/")["Contents"]
    keys = [o["Key"] for o in listed]
    assert any(k.endswith(".parquet") and "patch_scores" in k for k in keys)
    assert any(k.endswith(".metadata.json") for k in keys)
    with pytest.raises(ConfigError, match="--catalog-db"):
        append_job_to_iceberg(finished_jobs["a"], WarehouseTarget(warehouse=f"s3://{bucket}/wh"))


def test_a_column_added_by_a_newer_version_appends_without_rewriting(
    finished_jobs, tmp_path, monkeypatch
):
    import pyarrow as pa

    from anogan_batch.warehouse import iceberg_tables as iceberg
    from anogan_batch.warehouse.job_rows import JobRows

    target = WarehouseTarget(warehouse=str(tmp_path / "wh"))
    rows_of = iceberg.job_rows

    def older_version(out, manifest, name):  # a version that wrote no p-values yet
        rows = rows_of(out, manifest, name)
        if name != "patch_scores":
            return rows
        keep = [c for c in rows.schema.names if c not in ("p_value", "flagged")]
        schema = pa.schema([rows.schema.field(c) for c in keep])
        return JobRows(schema, rows.rows, lambda: (b.select(keep) for b in rows.batches()))

    monkeypatch.setattr(iceberg, "job_rows", older_version)
    iceberg.append_job_to_iceberg(finished_jobs["a"], target)
    monkeypatch.setattr(iceberg, "job_rows", rows_of)
    iceberg.append_job_to_iceberg(finished_jobs["b"], target)
    got = read(target, "patch_scores").to_pylist()
    by_job = {}
    for r in got:
        by_job.setdefault(r["job_id"].split("-")[-1], []).append(r["p_value"])
    assert sorted(len(v) for v in by_job.values()) == [16, 24]
    nulls = sorted(sum(p is None for p in v) for v in by_job.values())
    assert nulls == [0, 24]  # the older job's rows read null, the newer one's have values


def test_a_failed_commit_then_rerun_leaves_one_copy(finished_jobs, tmp_path, monkeypatch):
    """The data files are written, the commit fails (a crash would stop there too): the rerun
    writes them again and commits once; the first try's files are never referenced."""
    from pyiceberg.table import Transaction
    from pyiceberg.table.update import AddSnapshotUpdate

    from anogan_batch.warehouse.iceberg_tables import append_job_to_iceberg

    target = WarehouseTarget(warehouse=str(tmp_path / "wh"))
    commit = Transaction.commit_transaction

    def crash_in_scan_scores_append(self):
        # data files written, snapshot staged: patch_scores is committed already
        appending = any(isinstance(u, AddSnapshotUpdate) for u in self._updates)
        if appending and self._table.name()[-1] == "scan_scores":
            raise RuntimeError("driver lost before the commit")
        return commit(self)

    monkeypatch.setattr(Transaction, "commit_transaction", crash_in_scan_scores_append)
    with pytest.raises(RuntimeError, match="before the commit"):
        append_job_to_iceberg(finished_jobs["a"], target)
    monkeypatch.setattr(Transaction, "commit_transaction", commit)
    again = append_job_to_iceberg(finished_jobs["a"], target)
    assert again["patch_scores"] == "already published" and again["scan_scores"] == 6
    assert read(target, "patch_scores").num_rows == 24
    assert read(target, "scan_scores").num_rows == 6


def test_sigkill_between_tables_then_rerun_converges(finished_jobs, tmp_path):
    repo = Path(__file__).parents[1]
    wh = str(tmp_path / "wh")
    env = {
        "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests" / "fault_site")]),
        "ANOGAN_TEST_KILL": "anogan_batch.warehouse.iceberg_tables:_append_once:2",
    }
    killed = run_cli("publish", finished_jobs["b"], "--warehouse", wh, env=env)
    assert killed.returncode == -9, killed.stderr[-2000:]
    rerun = run_cli("publish", finished_jobs["b"], "--warehouse", wh)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "anogan.patch_scores: already published" in rerun.stdout
    target = WarehouseTarget(warehouse=wh)
    assert read(target, "patch_scores").num_rows == 16
    assert read(target, "jobs").num_rows == 1


def test_concurrent_publishes_all_land_once(finished_jobs, tmp_path):
    """Two jobs, each published twice at once, into a warehouse that has no tables yet."""
    wh = str(tmp_path / "wh")
    jobs = ("a", "b", "a", "b")
    run_cli_concurrently(*(["publish", finished_jobs[n], "--warehouse", wh] for n in jobs))
    target = WarehouseTarget(warehouse=wh)
    ids = read(target, "patch_scores").column("patch_id").to_pylist()
    assert len(ids) == len(set(ids)) == 40
    assert read(target, "jobs").num_rows == 2


def test_bad_targets_are_clear_errors(finished_jobs, tmp_path):
    from anogan_batch.warehouse.iceberg_tables import append_job_to_iceberg

    with pytest.raises(ConfigError, match="namespace"):
        WarehouseTarget(namespace="a.b; drop")
    with pytest.raises(ConfigError, match="--warehouse"):
        append_job_to_iceberg(finished_jobs["a"], WarehouseTarget(catalog="nowhere"))
    with pytest.raises(InputError, match="no job"):
        append_job_to_iceberg(str(tmp_path), WarehouseTarget(warehouse=str(tmp_path / "wh")))
    r = run_cli("publish", str(tmp_path / "nothing"), "--warehouse", str(tmp_path / "wh"))
    assert r.returncode == 2 and "no job" in r.stderr


def test_score_publishes_and_a_rerun_of_the_finished_job_adds_nothing(
    ray_local, tiny_model, sample, tmp_path
):
    from anogan_batch.core.search_config import SearchConfig
    from anogan_batch.job.runner import run_score_job
    from anogan_batch.job.score_config import ScoreJobConfig

    table = make_patch_table(tmp_path / "patches", sample["test_images"][40:52])
    target = WarehouseTarget(namespace="site_1", warehouse=str(tmp_path / "wh"))
    cfg = ScoreJobConfig(tiny_model, str(table), str(tmp_path / "out"),
                         search=SearchConfig(iterations=2), progress=False, heatmaps=False,
                         table_format="iceberg", published=target)  # fmt: skip
    run_score_job(cfg)
    run_score_job(cfg)  # finished already: publishing again is a no-op
    rows = read(target, "patch_scores")
    assert rows.num_rows == 12
    assert np.all(np.isfinite(rows.column("anomaly_score").to_numpy()))


def test_a_growing_archive_pays_for_its_new_patches_only(ray_local, tiny_model, sample, tmp_path):
    """Score, publish; the archive grows; score it with --skip-published, publish: every patch
    once in the tables. Another search is another key: nothing of it is skipped."""
    import duckdb

    from anogan_batch.core.search_config import SearchConfig
    from anogan_batch.job.runner import run_score_job
    from anogan_batch.job.score_config import ScoreJobConfig

    images = sample["test_images"]
    day1 = make_patch_table(tmp_path / "day1", images[:12], files=2)
    ids = [f"grown-{i}" for i in range(12, 20)]
    first_ids = read_ids(day1)
    grown = make_patch_table(tmp_path / "grown", images[:20], ids=first_ids + ids, files=3)
    target = WarehouseTarget(warehouse=str(tmp_path / "wh"))

    def job(patches, out, search=None, skip=False):
        return run_score_job(
            ScoreJobConfig(tiny_model, str(patches), str(tmp_path / out),
                           search=search or SearchConfig(), progress=False, heatmaps=False,
                           table_format="iceberg", published=target, skip_published=skip)
        )  # fmt: skip

    first = job(day1, "job1", skip=True)  # nothing published yet: nothing skipped
    assert (first.scored_rows, first.skipped_rows) == (12, 0)
    second = job(grown, "job2", skip=True)
    assert (second.input_rows, second.scored_rows, second.skipped_rows) == (20, 8, 12)
    other = job(grown, "job3", search=SearchConfig(iterations=3), skip=True)
    assert (other.scored_rows, other.skipped_rows) == (20, 0)

    patch_scores = read(target, "patch_scores")  # DuckDB reads it by name
    per_job = duckdb.sql(
        "select job_id, count(*), count(distinct patch_id) from patch_scores group by 1"
    ).fetchall()
    counts = {job_id: (n, distinct) for job_id, n, distinct in per_job}
    assert counts[first.job_id] == (12, 12) and counts[second.job_id] == (8, 8)
    assert counts[other.job_id] == (20, 20)
    default_search = {first.job_id, second.job_id}
    ids_default = [r["patch_id"] for r in patch_scores.to_pylist() if r["job_id"] in default_search]
    assert sorted(ids_default) == sorted(first_ids + ids)  # every patch of the archive, once
    skipped = json.loads((tmp_path / "job2" / "job.json").read_text())["skipped_rows"]
    assert skipped == 12
    assert not (tmp_path / "job2" / "_published_ids").exists()  # cleaned up with the job


def test_table_names_take_a_prefix(finished_jobs, tmp_path):
    from anogan_batch.warehouse.iceberg_tables import load_catalog

    wh = str(tmp_path / "wh")
    r = run_cli("publish", finished_jobs["a"], "--warehouse", wh, "--table-prefix", "site1_")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "anogan.site1_patch_scores: 24 rows appended" in r.stdout
    target = WarehouseTarget(warehouse=wh)
    assert read(target, "site1_patch_scores").num_rows == 24
    assert read(target, "site1_jobs").num_rows == 1
    assert not load_catalog(target).table_exists("anogan.patch_scores")
    for bad in ("../x", "a.b", "x" * 65, "ü"):
        with pytest.raises(ConfigError, match="table_prefix"):
            WarehouseTarget(table_prefix=bad)
    r = run_cli("publish", finished_jobs["a"], "--warehouse", wh, "--table-prefix", "a/b")
    assert r.returncode == 2 and "table_prefix" in r.stderr


def test_losing_the_race_to_create_the_namespace_is_not_an_error(tmp_path):
    """The SQL catalog reports the second of two simultaneous namespace creations as an
    integrity error (seen once in the suite's concurrent-publish test), not "already exists"."""
    from sqlalchemy.exc import IntegrityError

    from anogan_batch.warehouse.iceberg_tables import _ensure_namespace, load_catalog

    catalog = load_catalog(WarehouseTarget(warehouse=str(tmp_path / "wh")))

    def lost_the_race(namespace, properties=None):
        raise IntegrityError("insert", {}, Exception("UNIQUE constraint failed"))

    catalog.create_namespace_if_not_exists = lost_the_race
    with pytest.raises(IntegrityError):  # the namespace is not there: a real error
        _ensure_namespace(catalog, "site_2")
    catalog.create_namespace("site_2")  # the winner's
    _ensure_namespace(catalog, "site_2")
    assert catalog.namespace_exists("site_2")


def test_a_job_is_written_a_batch_at_a_time_and_committed_once(
    finished_jobs, tmp_path, monkeypatch
):
    """Memory stays bounded however large the job: its rows are read and written a batch at
    a time (here 5 rows, files of 10), yet they land in one snapshot, each row once."""
    from anogan_batch.io import tables
    from anogan_batch.warehouse import job_rows as published
    from anogan_batch.warehouse.iceberg_tables import (
        JOB_ID_PROPERTY,
        append_job_to_iceberg,
        load_catalog,
    )

    monkeypatch.setattr(tables, "STREAM_ROWS", 5)
    monkeypatch.setattr(published, "DATA_FILE_ROWS", 10)
    target = WarehouseTarget(warehouse=str(tmp_path / "wh"))
    append_job_to_iceberg(finished_jobs["a"], target)
    table = load_catalog(target).load_table("anogan.patch_scores")
    ids = table.scan().to_arrow()["patch_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 24
    jobs = [s.summary.additional_properties.get(JOB_ID_PROPERTY) for s in table.snapshots()]
    assert len(jobs) == 1 and jobs[0] is not None  # one commit for the whole job
    assert sorted(table.inspect.files()["record_count"].to_pylist()) == [4, 10, 10]
