"""Per-scan tables of a finished job, computed on the cluster in one Ray Data groupby.

One hash-partitioned shuffle by `scan_id` brings together, for every scan: its patch scores,
and (for heatmaps) its patches' residual maps and pixels and the scan's size from the patch
table's `_scans.parquet`. Each group yields one row: the scan's score summary, plus its stitched
heatmap and overlay PNG (see heatmaps.py). The driver never holds patch rows; it only streams
the small summary columns from OUT/heatmaps into OUT/scan_scores.

scan_scores columns: scan_id, n_patches, max_score, mean_score, p95_score, min_score, std_score,
n_above_threshold (null when no threshold is known), max_patch_id / max_x / max_y (where the
most anomalous patch sits), label (the scan's label when all its patches agree, else 'mixed').
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from anogan_batch import storage

SUMMARY_COLUMNS = (
    "scan_id", "n_patches", "max_score", "mean_score", "p95_score", "min_score", "std_score",
    "n_above_threshold", "max_patch_id", "max_x", "max_y", "label",
)  # fmt: skip
# what each input contributes to the shuffle ("kind" tells them apart)
SCORE, IMAGE, SIZE = "score", "image", "size"


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


def _union_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("scan_id", pa.string()),
            ("kind", pa.string()),
            ("x", pa.int64()),
            ("y", pa.int64()),
            ("anomaly_score", pa.float64()),
            ("patch_id", pa.string()),
            ("label", pa.string()),
            ("data", pa.binary()),  # residual map (float32) or pixels (of `dtype`)
            ("dtype", pa.string()),
        ]
    )


def to_union_rows(batch, kind: str):
    """Bring an input's batch (pyarrow) into the shared schema, explicit types throughout."""
    import pyarrow as pa

    n = batch.num_rows
    cols = {"scan_id": batch.column("scan_id"), "kind": pa.array([kind] * n, pa.string())}
    if kind == SIZE:  # the scan's size rides in x (width) and y (height)
        cols |= {"x": batch.column("width"), "y": batch.column("height")}
    else:
        cols |= {"x": batch.column("x"), "y": batch.column("y")}
    if kind == SCORE:
        for name in ("anomaly_score", "patch_id", "label"):
            if name in batch.column_names:
                cols[name] = batch.column(name)
        if "residual_map" in batch.column_names:
            cols |= {"data": batch.column("residual_map"), "dtype": pa.array(["float32"] * n)}
    elif kind == IMAGE:
        cols["data"] = batch.column("image")
        if "dtype" in batch.column_names:
            cols["dtype"] = batch.column("dtype")
    schema = _union_schema()
    arrays = [cols[f.name].cast(f.type) if f.name in cols else pa.nulls(n, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def scan_row(
    group: dict[str, np.ndarray],
    out: str,
    threshold: float | None,
    heatmaps: tuple[int, int] | None,
) -> dict[str, Any]:
    """One scan's union rows -> its summary (+ heatmap) row; [] when nothing was scored."""
    from anogan_batch.heatmaps import MAP_COLUMNS, render_scan

    kind = group["kind"]
    scored = kind == SCORE
    if not scored.any():  # every patch of this scan was masked or quarantined
        return {k: [] for k in SUMMARY_COLUMNS + (MAP_COLUMNS if heatmaps else ())}
    row = scan_summary({k: v[scored] for k, v in group.items()}, threshold)
    if heatmaps:
        row |= render_scan(group, out, *heatmaps)
    return row


def _partitions(ds) -> int:
    """Shuffle partitions: a few per CPU, not Ray's fixed 200 (each costs a task)."""
    import ray

    return max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))


@contextmanager
def task_shuffle() -> Iterator[None]:
    """Run groupbys inside with a task-based sort shuffle: the hash shuffle's aggregator
    actors take several seconds to start on a small cluster, longer than the whole
    aggregation of a typical job."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    ctx = DataContext.get_current()
    previous = ctx.shuffle_strategy
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        ctx.shuffle_strategy = previous


def write_scan_tables(
    out: str,
    patches: str,
    *,
    threshold: float | None = None,
    heatmaps: tuple[int, int] | None = None,
    io_cpus: float = 0.5,
) -> None:
    """Write OUT/scan_scores, and with `heatmaps=(patch_size, channels)` OUT/heatmaps and
    OUT/overlays, from OUT/patch_scores (and the patch table's pixels)."""
    import pyarrow.dataset as pads
    import ray.data

    def read(path: str, columns: list[str], kind: str) -> ray.data.Dataset:
        fs, inner = storage.filesystem_for(path)
        ds = ray.data.read_parquet(inner, filesystem=fs, num_cpus=io_cpus, partitioning=None)
        return ds.select_columns(columns).map_batches(
            to_union_rows, fn_args=(kind,), batch_format="pyarrow", num_cpus=io_cpus
        )

    score_cols = ["scan_id", "x", "y", "anomaly_score", "patch_id", "label"]
    if heatmaps:
        score_cols.append("residual_map")
    parts = [read(storage.join(out, "patch_scores"), score_cols, SCORE)]
    if heatmaps:
        from anogan_batch.tables import open_dataset

        names = open_dataset(patches).schema.names
        cols = [c for c in ("scan_id", "x", "y", "image", "dtype") if c in names]
        parts.append(read(patches, cols, IMAGE))
        scans_file = storage.join(patches, "_scans.parquet")
        if storage.exists(scans_file):
            parts.append(read(scans_file, ["scan_id", "height", "width"], SIZE))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    rows = ds.groupby("scan_id", num_partitions=_partitions(ds)).map_groups(
        scan_row, fn_args=(out, threshold, heatmaps), batch_format="numpy", num_cpus=io_cpus
    )
    scan_scores = storage.join(out, "scan_scores")
    target = storage.join(out, "heatmaps") if heatmaps else scan_scores
    for path in {target, scan_scores}:
        storage.delete(path)
    fs, inner = storage.filesystem_for(target)
    with task_shuffle():
        rows.write_parquet(inner, filesystem=fs, ray_remote_args={"num_cpus": io_cpus})
    if heatmaps:  # scan_scores = the summary columns of heatmaps, streamed, never all in memory
        from anogan_batch.tables import open_dataset

        source = open_dataset(target).scanner(columns=list(SUMMARY_COLUMNS))
        out_fs, out_inner = storage.filesystem_for(scan_scores)
        pads.write_dataset(
            source,
            out_inner,
            filesystem=out_fs,
            format="parquet",
            basename_template="part-{i}.parquet",
        )
