"""The job's decisions over its written tables (job/decisions.py): streamed, and the same as
Benjamini-Hochberg over every scan at once."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from anogan_batch.core.calibration import benjamini_hochberg
from anogan_batch.job.decisions import flag_scans
from anogan_batch.job.layout import JobLayout

P_VALUES = st.lists(st.one_of(st.floats(0, 1), st.just(float("nan"))), min_size=1, max_size=300)


def write_scan_scores(out: str, p: list[float], files: int) -> None:
    """scan_scores as the scan phase leaves it: several files, no `flagged` yet."""
    path = JobLayout(out).scan_scores
    os.makedirs(path, exist_ok=True)
    ids = [f"scan{i:04d}" for i in range(len(p))]
    for k, part in enumerate(np.array_split(np.arange(len(p)), files)):
        table = pa.table(
            {"scan_id": [ids[i] for i in part], "p_value": pa.array([p[i] for i in part])}
        )
        pq.write_table(table, f"{path}/part-{k}.parquet")


def read_flags(out: str) -> dict[str, bool | None]:
    table = pq.read_table(JobLayout(out).scan_scores)
    return dict(zip(table["scan_id"].to_pylist(), table["flagged"].to_pylist(), strict=True))


@settings(max_examples=25, deadline=None)
@given(p=P_VALUES, files=st.integers(1, 4), fdr=st.floats(0.01, 0.5))
def test_streamed_flags_are_benjamini_hochberg_over_all_scans(tmp_path_factory, p, files, fdr):
    out = str(tmp_path_factory.mktemp("job"))
    write_scan_scores(out, p, files)
    result = flag_scans(out, fdr)
    want, threshold = benjamini_hochberg(np.array(p), fdr)
    got = read_flags(out)
    assert [got[f"scan{i:04d}"] for i in range(len(p))] == want.tolist()
    assert result == {"scans": len(p), "scans_flagged": int(want.sum()),
                      "scan_p_threshold": threshold}  # fmt: skip
    assert not os.path.exists(JobLayout(out).decided)


def test_a_rerun_replaces_the_decision_and_no_fdr_leaves_nulls(tmp_path):
    out = str(tmp_path)
    p = [0.001, 0.002, 0.5, 0.9]
    write_scan_scores(out, p, files=2)
    flag_scans(out, 0.1)
    assert read_flags(out) == {"scan0000": True, "scan0001": True, "scan0002": False,
                               "scan0003": False}  # fmt: skip
    assert flag_scans(out, None) == {"scans": 4}  # the rerun's decision replaces the first
    assert set(read_flags(out).values()) == {None}
    table = pq.read_table(JobLayout(out).scan_scores)
    assert table.column_names == ["scan_id", "p_value", "flagged"]  # one `flagged`, last
