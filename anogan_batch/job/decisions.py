"""The job's calibrated decisions after its tables are written (the math: core/calibration.py).

Patches are flagged as they are scored (`p_value <= --fpr`, job/scorer.py). Scans need every
scan's p-value first: Benjamini-Hochberg at `--fdr` over them, then scan_scores is rewritten
with `flagged`. Both tables are streamed: the driver holds one float per scan (for BH's
threshold) and a batch of rows, never a table.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from anogan_batch.core.calibration import benjamini_hochberg, bh_flags, drift, p_value_counts
from anogan_batch.io import storage
from anogan_batch.io.columns import FLAGGED, P_VALUE
from anogan_batch.job.layout import JobLayout


def patch_p_values(out: str, n_calibration: int) -> tuple[int, dict[str, Any]]:
    """(patches flagged, drift of the patch p-values), streamed over OUT/patch_scores."""
    from anogan_batch.io.tables import open_dataset, stream_batches

    counts = np.zeros(n_calibration + 1, dtype=np.int64)
    flagged = 0
    path = JobLayout(out).patch_scores
    if not storage.list_files(path, suffixes=(".parquet",)):
        return 0, drift(counts)
    for batch in stream_batches(open_dataset(path), [P_VALUE, FLAGGED]):
        p = batch.column(P_VALUE).to_numpy(zero_copy_only=False).astype(np.float64)
        counts += p_value_counts(p, n_calibration)
        flagged += int(np.sum(batch.column(FLAGGED).to_numpy(zero_copy_only=False) == True))  # noqa: E712
    return flagged, drift(counts)


def flag_scans(out: str, fdr: float | None) -> dict[str, Any]:
    """Rewrite OUT/scan_scores with `flagged` (BH at `fdr` over the scans' p-values; null
    without `fdr`). -> counts and the p-value threshold for job.json.

    Streamed: one pass reads the p-values alone (8 bytes a scan) for BH's threshold, a second
    rewrites the rows a batch at a time into OUT/_decided, which then replaces scan_scores."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from anogan_batch.io.tables import count_rows, open_dataset, stream_batches

    layout = JobLayout(out)
    path, staged = layout.scan_scores, layout.decided
    if not storage.list_files(path, suffixes=(".parquet",)):
        return {}
    ds = open_dataset(path)
    result: dict[str, Any] = {"scans": count_rows(ds, path)}
    threshold = None
    if fdr is not None:
        p = _column(ds, P_VALUE)
        flags, threshold = benjamini_hochberg(p, fdr)
        result |= {"scans_flagged": int(flags.sum()), "scan_p_threshold": threshold}
    columns = [c for c in ds.schema.names if c != FLAGGED]  # a rerun's decision replaces it
    schema = pa.schema([ds.schema.field(c) for c in columns]).append(pa.field(FLAGGED, pa.bool_()))
    storage.delete(staged)
    storage.makedirs(staged)
    fs, inner = storage.filesystem_for(storage.join(staged, "part-0.parquet"))
    with fs.open_output_stream(inner) as f, pq.ParquetWriter(f, schema, compression="zstd") as w:
        for batch in stream_batches(ds, columns):
            if threshold is None:
                column = pa.nulls(batch.num_rows, pa.bool_())
            else:
                column = pa.array(bh_flags(_floats(batch.column(P_VALUE)), threshold))
            w.write_batch(pa.RecordBatch.from_arrays([*batch.columns, column], schema=schema))
    storage.delete(path)
    storage.move(storage.join(staged, "part-0.parquet"), storage.join(path, "part-0.parquet"))
    storage.delete(staged)
    return result


def _column(ds, name: str) -> np.ndarray:
    """One float column of a dataset as float64, streamed (NaN for nulls)."""
    from anogan_batch.io.tables import stream_batches

    parts = [_floats(b.column(name)) for b in stream_batches(ds, [name])]
    return np.concatenate(parts) if parts else np.zeros(0)


def _floats(array) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False).astype(np.float64)
