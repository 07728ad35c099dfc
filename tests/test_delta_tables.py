"""Long-lived Delta tables: many jobs append, exactly once, read back with deltalake."""

from __future__ import annotations

import pytest

from anogan_batch.errors import ConfigError
from tests.conftest import make_patch_table, read_ids, run_cli, run_cli_concurrently
from tests.conftest import read_delta as read

pytest.importorskip("deltalake")


def test_jobs_append_exactly_once(finished_jobs, tmp_path):
    wh = str(tmp_path / "wh")
    first = run_cli("publish", finished_jobs["a"], "--to", "delta", "--warehouse", wh)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "anogan.patch_scores: 24 rows appended" in first.stdout
    again = run_cli("publish", finished_jobs["a"], "--to", "delta", "--warehouse", wh)
    assert again.stdout.count("already published") == 3
    second = run_cli("publish", finished_jobs["b"], "--to", "delta", "--warehouse", wh)
    assert second.returncode == 0, second.stderr[-2000:]
    got = read(f"{wh}/anogan", "patch_scores", "scan_scores", "jobs")
    assert got["patch_scores"]["rows"] == len(got["patch_scores"]["ids"]) == 40
    assert got["scan_scores"]["rows"] == 10 and got["jobs"]["rows"] == 2
    assert len(got["patch_scores"]["jobs"]) == 2
    assert "residual_map" not in got["patch_scores"]["columns"]


def test_concurrent_publishes_all_land_once(finished_jobs, tmp_path):
    """Two jobs, each published twice at once, into a warehouse that has no tables yet."""
    wh = str(tmp_path / "wh")
    publish = ["publish", "--to", "delta", "--warehouse", wh]
    run_cli_concurrently(*([*publish, finished_jobs[n]] for n in ("a", "b", "a", "b")))
    got = read(f"{wh}/anogan", "patch_scores", "jobs")
    assert got["patch_scores"]["rows"] == len(got["patch_scores"]["ids"]) == 40
    assert got["jobs"]["rows"] == 2


def test_table_names_take_a_prefix(finished_jobs, tmp_path):
    wh = str(tmp_path / "wh")
    args = ("publish", finished_jobs["a"], "--to", "delta", "--warehouse", wh)
    r = run_cli(*args, "--table-prefix", "site1_")
    assert r.returncode == 0 and "anogan.site1_patch_scores: 24 rows appended" in r.stdout
    assert read(f"{wh}/anogan", "site1_patch_scores")["site1_patch_scores"]["rows"] == 24
    assert not (tmp_path / "wh" / "anogan" / "patch_scores").exists()


def test_delta_needs_a_warehouse(finished_jobs, tmp_path):
    r = run_cli("publish", finished_jobs["a"], "--to", "delta")
    assert r.returncode == 2 and "--warehouse" in r.stderr
    r = run_cli("publish", finished_jobs["a"], "--to", "csv", "--warehouse", str(tmp_path))
    assert r.returncode == 2 and "--to" in r.stderr


def test_a_growing_archive_pays_for_its_new_patches_only(ray_local, tiny_model, sample, tmp_path):
    """Score into the Delta warehouse; the archive grows; score it with --skip-published (which
    publishes too): every patch once in the tables; a rerun of the finished job adds nothing."""
    from anogan_batch.core.search_config import SearchConfig
    from anogan_batch.job.runner import run_score_job
    from anogan_batch.job.score_config import ScoreJobConfig
    from anogan_batch.warehouse.target import WarehouseTarget

    images = sample["test_images"]
    day1 = make_patch_table(tmp_path / "day1", images[:12], files=2)
    first_ids = read_ids(day1)
    new_ids = [f"grown-{i}" for i in range(12, 20)]
    grown = make_patch_table(tmp_path / "grown", images[:20], ids=first_ids + new_ids, files=3)
    wh = str(tmp_path / "wh")

    def job(patches, out):
        cfg = ScoreJobConfig(tiny_model, str(patches), str(tmp_path / out),
                             search=SearchConfig(iterations=3), progress=False, heatmaps=False,
                             table_format="delta", published=WarehouseTarget(warehouse=wh),
                             skip_published=True)  # fmt: skip
        return run_score_job(cfg), cfg

    first, _ = job(day1, "job1")
    assert (first.scored_rows, first.skipped_rows) == (12, 0)
    second, cfg = job(grown, "job2")
    assert (second.input_rows, second.scored_rows, second.skipped_rows) == (20, 8, 12)
    run_score_job(cfg)  # finished already: publishing again adds nothing
    got = read(f"{wh}/anogan", "patch_scores", "jobs")
    assert got["patch_scores"]["rows"] == 20  # every patch of the archive, once
    assert got["patch_scores"]["ids"] == sorted(first_ids + new_ids)
    assert got["jobs"]["jobs"] == sorted([first.job_id, second.job_id])
    own = read(str(tmp_path / "job2"), "patch_scores")  # the job's own Delta table, as before
    assert own["patch_scores"]["ids"] == sorted(new_ids)


def test_skip_published_needs_tables_to_read(tiny_model, tmp_path):
    from anogan_batch.job.score_config import ScoreJobConfig

    for table_format in ("parquet", "delta"):  # delta without a warehouse: per-job tables only
        with pytest.raises(ConfigError, match="skip_published"):
            ScoreJobConfig(tiny_model, "p", "o", table_format=table_format, skip_published=True)


def test_a_newer_versions_column_joins_the_table_and_a_missing_one_reads_null(
    finished_jobs, tmp_path
):
    """Job b as a newer version would write it (an extra column) and without `p_value` (as an
    older one would): the table gains the column, job a's rows read it null, and b's rows
    read `p_value` null; nothing is rewritten."""
    import shutil
    from pathlib import Path

    import pyarrow.parquet as pq

    newer = tmp_path / "b-newer"
    shutil.copytree(finished_jobs["b"], newer)
    for path in Path(newer, "patch_scores").rglob("*.parquet"):
        table = pq.read_table(path, partitioning=None).drop_columns(["p_value"])
        pq.write_table(table.append_column("newcol", [[1.25] * table.num_rows]), path)
    wh = str(tmp_path / "wh")
    for job in (finished_jobs["a"], str(newer)):
        r = run_cli("publish", job, "--to", "delta", "--warehouse", wh)
        assert r.returncode == 0, r.stderr[-2000:]
    script = f"""
import json, os
from deltalake import DeltaTable
rows = DeltaTable({wh + "/anogan/patch_scores"!r}).to_pyarrow_table().to_pylist()
kinds = {{(r["job_id"], r["newcol"], r["p_value"] is None) for r in rows}}
print(json.dumps(sorted(kinds, key=str)))
os._exit(0)
"""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    got = {tuple(v) for v in json.loads(out.stdout)}
    jobs = sorted({job for job, _, _ in got})
    assert len(jobs) == 2 and len(got) == 2, got  # one kind of row per job
    by_job = {job: (newcol, no_p) for job, newcol, no_p in got}
    assert set(by_job.values()) == {(None, False), (1.25, True)}, by_job
