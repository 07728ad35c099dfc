"""The malformed input corpus (tests/corpus.py) through the real commands.

Every case must end in exit 2 with a message naming the file, column or value, or in
quarantine with a reason: never exit 1, a traceback, a hang, or a row missing or counted twice.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from anogan_batch.job.layout import JobLayout
from tests.conftest import run_cli
from tests.corpus import HOSTILE_SCAN_IDS, ingest_corpus, quarantine_table, refused_tables


def without_root_privileges() -> list[str]:
    """A command prefix under which root cannot read what its permissions forbid (root
    otherwise reads any file, and the unreadable-file cases would prove nothing)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "tests run as root need util-linux's setpriv to drop read capabilities"
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_every_bad_scan_file_is_quarantined_with_its_reason(tmp_path, engine):
    src, out = tmp_path / "src", tmp_path / "out"
    cases = ingest_corpus(src)
    r = run_cli(
        "ingest", str(src), str(out), "--patch-size", "16", "--engine", engine,
        prefix=without_root_privileges(), timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    found: dict[str, list[str | None]] = {}
    for name in ("_scans.parquet", "_quarantine.parquet"):
        for row in pq.read_table(out / name).to_pylist():
            rel = row["path"][len(str(src)) + 1 :]
            found.setdefault(rel, []).append(row["reason"])
    assert sorted(found) == sorted(cases)  # every file accounted for, nothing else listed
    for name, case in cases.items():
        reasons = found[name]
        assert len(reasons) == 1, (name, reasons)  # never counted twice
        if case.either and reasons[0] is None:
            continue
        if case.reason is None:
            assert reasons[0] is None, (name, reasons[0])
        else:
            assert reasons[0] and re.search(case.reason, reasons[0]), (name, reasons[0])
    table = pads.dataset(out).to_table(columns=["patch_id", "scan_id"])
    ids = table.column("patch_id").to_pylist()
    assert len(ids) == len(set(ids)) > 0
    assert "names/latin1-\\xe9t\\xe9" in set(table.column("scan_id").to_pylist())


def cli(*args: str) -> tuple[int, str]:
    """The real command line in this process (the suite's Ray session): (exit code, stderr)."""
    from anogan_batch.cli import run

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run(list(args))
    return code, err.getvalue()


@pytest.fixture(scope="module")
def images(sample) -> list[bytes]:
    return [img.tobytes() for img in sample["test_images"][:12]]


def test_bad_patch_tables_are_refused_with_a_message_naming_the_problem(
    tmp_path, tiny_model, images, ray_local
):
    for name, (table, regex) in refused_tables(tmp_path / "tables", images).items():
        out = tmp_path / "out" / name
        code, err = cli("score", tiny_model, str(table), str(out), "--iterations", "2",
                        "--no-progress", "--no-heatmaps")  # fmt: skip
        assert code == 2, (name, err[-2000:])
        assert err.startswith("error: ") and "Traceback" not in err, (name, err)
        assert re.search(regex, err), (name, err)
        assert not (out / "patch_scores").exists(), name  # refused before any row is scored


def test_bad_rows_are_quarantined_and_hostile_names_stay_inside_out(
    tmp_path, tiny_model, images, ray_local
):
    table, expected = quarantine_table(tmp_path / "in", images, 28)
    out = tmp_path / "deep" / "down" / "here" / "out"
    code, err = cli("score", tiny_model, str(table), str(out), "--iterations", "2",
                    "--no-progress")  # fmt: skip
    assert code == 0, err[-3000:]
    layout = JobLayout(str(out))
    scored = pads.dataset(layout.patch_scores, partitioning="hive").to_table()
    quarantined = pq.read_table(layout.quarantine).to_pylist()
    reasons = {r["patch_id"]: r["reason"] for r in quarantined}
    ids = scored.column("patch_id").to_pylist()
    assert len(ids) == len(set(ids)) and not set(ids) & set(reasons)
    assert sorted(ids + list(reasons)) == sorted(expected)  # nothing lost, nothing twice
    for pid, regex in expected.items():
        if regex is None:
            assert pid in ids, (pid, reasons.get(pid))
        else:
            assert pid in reasons and re.search(regex, reasons[pid]), (pid, reasons.get(pid))

    # names from data: every overlay inside OUT/overlays, nothing written outside OUT
    heat = pads.dataset(layout.heatmaps).to_table().to_pylist()
    by_scan = {r["scan_id"]: r for r in heat}
    for scan_id in HOSTILE_SCAN_IDS:
        row = by_scan[scan_id]
        assert row["overlay"] == layout.overlay(scan_id)
        assert os.path.dirname(row["overlay"]) == layout.overlays and Path(row["overlay"]).is_file()
    huge = by_scan["scan-huge"]  # a patch 2^31 pixels out: a coarse grid, bounded memory
    from anogan_batch.job.heatmaps import MAX_GRID_CELLS

    assert huge["grid_height"] * huge["grid_width"] <= MAX_GRID_CELLS and huge["cell"] > 28
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert all(out in p.parents or table in p.parents for p in written), sorted(written)
    assert not Path("/anogan-corpus-absolute").exists()
    assert not list(Path("/tmp").glob("anogan-corpus-escape*"))
    # the report renders every hostile id escaped, and one scan's heatmap is fetched by id
    code, err = cli("report", str(out))
    assert code == 0, err
    html = Path(layout.report).read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html
    code, err = cli("heatmap", str(out), HOSTILE_SCAN_IDS[0])
    assert code == 0, err
    job = np.asarray([r["n_patches"] for r in pq.read_table(layout.scan_scores).to_pylist()])
    assert job.sum() == len(ids)


if sys.platform != "linux":  # FIFOs, setpriv and the non-UTF-8 file name are Linux's
    pytestmark = pytest.mark.skip(reason="Linux only")
