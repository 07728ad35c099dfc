"""Long-lived Delta tables: many jobs append, exactly once, read back with deltalake."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import run_cli, run_cli_concurrently

pytest.importorskip("deltalake")

READ = """
import json, sys
from deltalake import DeltaTable
out = {}
for name in sys.argv[2:]:
    t = DeltaTable(f"{sys.argv[1]}/{name}").to_pyarrow_table()
    ids = t.column("patch_id").to_pylist() if "patch_id" in t.column_names else []
    out[name] = {"rows": t.num_rows, "columns": t.column_names, "ids": sorted(set(ids)),
                 "jobs": sorted(set(t.column("job_id").to_pylist()))}
print(json.dumps(out), flush=True)
import os; os._exit(0)  # deltalake's runtime may abort at interpreter exit (job/warehouse.py)
"""


def read(folder: str, *tables: str) -> dict:
    cmd = [sys.executable, "-c", READ, folder, *tables]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


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


def test_two_concurrent_publishes_both_land(finished_jobs, tmp_path):
    wh = str(tmp_path / "wh")
    publish = ["publish", "--to", "delta", "--warehouse", wh]
    run_cli_concurrently(*([*publish, finished_jobs[n]] for n in ("a", "b")))
    got = read(f"{wh}/anogan", "patch_scores", "jobs")
    assert got["patch_scores"]["rows"] == len(got["patch_scores"]["ids"]) == 40
    assert got["jobs"]["rows"] == 2


def test_delta_needs_a_warehouse(finished_jobs, tmp_path):
    r = run_cli("publish", finished_jobs["a"], "--to", "delta")
    assert r.returncode == 2 and "--warehouse" in r.stderr
    r = run_cli("publish", finished_jobs["a"], "--to", "csv", "--warehouse", str(tmp_path))
    assert r.returncode == 2 and "--to" in r.stderr
