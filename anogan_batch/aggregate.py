"""Per-scan aggregation of patch scores, computed on the cluster with Ray Data.

`scan_scores` is a groupby over `patch_scores` by `scan_id` (a distributed hash shuffle): the
driver never holds patch rows, only the small per-scan result written by the workers.

Columns: scan_id, n_patches, max_score, mean_score, p95_score, min_score, std_score,
n_above_threshold (null when no threshold is known), max_patch_id / max_x / max_y (where the
most anomalous patch sits), label (the scan's label when all its patches agree, else 'mixed').
"""

from __future__ import annotations

from typing import Any

import numpy as np

SCAN_COLUMNS = ("scan_id", "anomaly_score", "patch_id", "x", "y", "label")


def scan_summary(group: dict[str, np.ndarray], threshold: float | None) -> dict[str, Any]:
    """One scan's patches (numpy columns) -> one summary row (as 1-element columns)."""
    scores = group["anomaly_score"].astype(np.float64)
    top = int(np.argmax(scores))
    labels = {v for v in group["label"].tolist() if v is not None}
    label = labels.pop() if len(labels) == 1 else ("mixed" if labels else None)
    above = None if threshold is None else int((scores > threshold).sum())
    return {
        "scan_id": [group["scan_id"][0]],
        "n_patches": np.array([len(scores)], dtype=np.int64),
        "max_score": [float(scores.max())],
        "mean_score": [float(scores.mean())],
        "p95_score": [float(np.quantile(scores, 0.95))],
        "min_score": [float(scores.min())],
        "std_score": [float(scores.std())],
        "n_above_threshold": [above],
        "max_patch_id": [group["patch_id"][top]],
        "max_x": np.array([group["x"][top]], dtype=np.int32),
        "max_y": np.array([group["y"][top]], dtype=np.int32),
        "label": [label],
    }


def write_scan_scores(
    patch_scores: str, out: str, *, threshold: float | None = None, io_cpus: float = 0.5
) -> None:
    """Group `patch_scores` by scan on Ray and write `out` (replacing it) as Parquet."""
    import ray.data
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    from anogan_batch import storage

    fs, inner = storage.filesystem_for(patch_scores)
    ds = ray.data.read_parquet(
        inner,
        filesystem=fs,
        columns=list(SCAN_COLUMNS),
        num_cpus=io_cpus,
        # patch_scores is hive-partitioned by job_id; that column is not needed here
        partitioning=None,
    )
    summary = ds.groupby("scan_id").map_groups(
        scan_summary, fn_args=(threshold,), batch_format="numpy", num_cpus=io_cpus
    )
    storage.delete(out)
    out_fs, out_inner = storage.filesystem_for(out)
    ctx = DataContext.get_current()
    previous = ctx.shuffle_strategy
    # A task-based sort shuffle: the hash shuffle's aggregator actors take several seconds
    # to start on a small cluster, longer than the whole aggregation of a typical job.
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        summary.write_parquet(out_inner, filesystem=out_fs, ray_remote_args={"num_cpus": io_cpus})
    finally:
        ctx.shuffle_strategy = previous
