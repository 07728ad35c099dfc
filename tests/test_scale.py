"""`anogan-batch bench --scale`: its synthetic patch table and its flags (the benchmark itself
is run by hand, docs/performance.md; a figure, never a timing check)."""

from __future__ import annotations

import pyarrow.dataset as pads

from anogan_batch.evaluation import scale
from anogan_batch.io.tables import check_patch_ids, inspect_patch_table
from tests.conftest import run_cli


def test_the_synthetic_table_is_a_valid_patch_table_in_scan_grids(tmp_path, monkeypatch):
    monkeypatch.setattr(scale, "FILE_ROWS", 1_000)
    rows = 2_500  # three files, the last one short; three scans, the last one partial
    path = scale.write_synthetic_table(str(tmp_path / "p"), rows)
    assert inspect_patch_table(path).rows == rows
    check_patch_ids(path, rows)  # unique, non-null: exit 2 otherwise
    table = pads.dataset(path).to_table(columns=["scan_id", "x", "y", "image"])
    assert table.num_rows == rows
    scans = table["scan_id"].to_pylist()
    assert scans.count("scan0000000") == scale.SCAN_PATCHES and len(set(scans)) == 3
    cells = {(x, y) for s, x, y in zip(scans, table["x"].to_pylist(), table["y"].to_pylist(),
                                       strict=True) if s == "scan0000000"}  # fmt: skip
    assert len(cells) == scale.SCAN_PATCHES  # a grid: no patch of a scan at one place twice
    assert {len(b) for b in table["image"].to_pylist()} == {scale.SIZE**2}


def test_bad_scale_values_are_exit_2_naming_the_flag():
    for value in ("0", "-5", "1e6", "", "10,x"):
        r = run_cli("bench", "--scale", value)
        assert r.returncode == 2 and "--scale" in r.stderr, (value, r.stderr[-500:])
