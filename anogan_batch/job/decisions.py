"""The job's calibrated decisions after its tables are written (the math: core/calibration.py).

Patches are flagged as they are scored (`p_value <= --fpr`, job/scorer.py). Scans need every
scan's p-value first: Benjamini-Hochberg at `--fdr` over them, then scan_scores is rewritten
with `flagged`. scan_scores has one row per scan, so it is read whole; patch_scores is only
streamed, for the flag count and the drift of its p-values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from anogan_batch.core.calibration import benjamini_hochberg, drift, p_value_counts
from anogan_batch.io import storage
from anogan_batch.job.layout import JobLayout


def patch_p_values(out: str, n_calibration: int) -> tuple[int, dict[str, Any]]:
    """(patches flagged, drift of the patch p-values), streamed over OUT/patch_scores."""
    from anogan_batch.io.tables import open_dataset

    counts = np.zeros(n_calibration + 1, dtype=np.int64)
    flagged = 0
    path = JobLayout(out).patch_scores
    if not storage.list_files(path, suffixes=(".parquet",)):
        return 0, drift(counts)
    for batch in open_dataset(path).to_batches(columns=["p_value", "flagged"]):
        p = batch.column("p_value").to_numpy(zero_copy_only=False).astype(np.float64)
        counts += p_value_counts(p, n_calibration)
        flagged += int(np.sum(batch.column("flagged").to_numpy(zero_copy_only=False) == True))  # noqa: E712
    return flagged, drift(counts)


def flag_scans(out: str, fdr: float | None) -> dict[str, Any]:
    """Rewrite OUT/scan_scores with `flagged` (BH at `fdr` over the scans' p-values; null
    without `fdr`). -> counts and the p-value threshold for job.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from anogan_batch.io.tables import open_dataset

    path = JobLayout(out).scan_scores
    if not storage.list_files(path, suffixes=(".parquet",)):
        return {}
    table = open_dataset(path).to_table()
    if "flagged" in table.column_names:  # a rerun's decision replaces the last one
        table = table.drop_columns(["flagged"])
    result: dict[str, Any] = {"scans": table.num_rows}
    if fdr is None:
        column = pa.nulls(table.num_rows, pa.bool_())
    else:
        p = table.column("p_value").to_numpy(zero_copy_only=False).astype(np.float64)
        flags, threshold = benjamini_hochberg(p, fdr)
        column = pa.array(flags, pa.bool_())
        result |= {"scans_flagged": int(flags.sum()), "scan_p_threshold": threshold}
    table = table.append_column("flagged", column)
    storage.delete(path)
    storage.makedirs(path)
    fs, inner = storage.filesystem_for(storage.join(path, "part-0.parquet"))
    with fs.open_output_stream(inner) as f:
        pq.write_table(table, f, compression="zstd")
    return result
