"""Per-scan tables of a finished job: one groupby by scan_id, on the cluster (Ray Data).

One hash-partitioned shuffle by `scan_id` brings together, for every scan: its patch scores,
and (for heatmaps) its patches' heat cells and thumbnails (the scorer's `heat` and `thumb`: a
few hundred bytes a patch, never the residual maps or the input table's pixels) and the scan's
size from the patch table's `_scans.parquet`. Each group yields one row: the scan's score
summary, plus its heat grid and overlay PNG (see heatmaps.py). The driver never holds patch
rows; it only streams the small summary columns from OUT/heatmaps into OUT/scan_scores.

A small job (`LOCAL_ROWS`, `LOCAL_BYTES`) is grouped in the driver instead, by the same
functions: Ray Data's shuffle costs 7-20 s of start-up on any job, which is most of a small
job's aggregation and none of its work.

scan_scores columns: scan_id, n_patches, max_score, mean_score, p95_score, min_score, std_score,
n_above_threshold (null when no threshold is known), max_patch_id / max_x / max_y (where the
most anomalous patch sits), label (the scan's label when all its patches agree, else 'mixed').
"""

from __future__ import annotations

from typing import Any

import numpy as np

from anogan_batch.core.calibration import bonferroni, heat_cell
from anogan_batch.io import storage
from anogan_batch.io.columns import (
    ANOMALY_SCORE,
    DOWNSAMPLE,
    HEAT,
    HEAT_SLICE,
    HEIGHT,
    LABEL,
    MAP_COLUMNS,
    MAX_PATCH_ID,
    MAX_SCORE,
    MAX_SLICE,
    MAX_X,
    MAX_Y,
    MEAN_SCORE,
    MIN_SCORE,
    N_ABOVE_THRESHOLD,
    N_PATCHES,
    P95_SCORE,
    P_VALUE,
    PATCH_ID,
    SCAN_ID,
    SLICE,
    STD_SCORE,
    SUMMARY_COLUMNS,
    THUMB,
    WIDTH,
    X,
    Y,
    scan_schema,
)
from anogan_batch.io.patches import SCANS_FILE
from anogan_batch.job.heatmaps import Cells, HeatmapGeometry, ScanSize, render_scan
from anogan_batch.job.layout import JobLayout

# what each input contributes to the shuffle ("kind" tells them apart)
SCORE, SIZE = "score", "size"
# Jobs up to these sizes are grouped in the driver: its memory holds about twice the bytes,
# and one core groups them faster than a Ray shuffle starts (docs/performance.md).
LOCAL_BYTES = 128 * 2**20
LOCAL_ROWS = 50_000
# The shuffle's input a partition of the Ray groupby gets, about: task memory stays bounded
PARTITION_BYTES = 64 * 2**20
# Scans a row group of scan_scores holds (about 200 bytes each). The groupby yields one row a
# scan, and stored as such every scan cost a row group's footer (about 30 bytes a column):
# 100 MB of footers in the driver that counted a 10 M-patch job's scans. OUT/heatmaps keeps
# one row group a scan: a heatmap is up to MAX_GRID_CELLS x 4 bytes, and `heatmap_for`
# reads one scan's row group.
SCAN_GROUP_ROWS = 65_536


def scan_summary(group: dict[str, np.ndarray], threshold: float | None) -> dict[str, Any]:
    """One scan's patches (numpy columns) -> one summary row (as 1-element columns)."""
    scores = group[ANOMALY_SCORE].astype(np.float64)
    top = int(np.argmax(scores))
    labels = {v for v in group[LABEL].tolist() if v is not None}
    label = labels.pop() if len(labels) == 1 else ("mixed" if labels else None)
    above = None if threshold is None else int((scores > threshold).sum())
    p_value = _scan_p_value(group.get(P_VALUE))
    return {
        SCAN_ID: [group[SCAN_ID][0]],
        N_PATCHES: np.array([len(scores)], dtype=np.int64),
        MAX_SCORE: [float(scores.max())],
        MEAN_SCORE: [float(scores.mean())],
        P95_SCORE: [float(np.quantile(scores, 0.95))],
        MIN_SCORE: [float(scores.min())],
        STD_SCORE: [float(scores.std())],
        N_ABOVE_THRESHOLD: [above],
        MAX_PATCH_ID: [group[PATCH_ID][top]],
        MAX_X: np.array([group[X][top]], dtype=np.int32),
        MAX_Y: np.array([group[Y][top]], dtype=np.int32),
        MAX_SLICE: [_hottest_slice(group, top)],
        LABEL: [label],
        P_VALUE: [p_value],
    }


def _floats(values: np.ndarray) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values.tolist()], dtype=np.float64)


def _hottest_slice(group: dict[str, np.ndarray], top: int) -> int | None:
    """The slice of a volume's most anomalous patch; None for a 2-D scan or a slide."""
    value = group[SLICE][top] if SLICE in group else None
    return int(value) if value is not None and np.isfinite(value) else None


def _scan_p_value(p_values) -> float | None:
    """The scan's p-value (Bonferroni over its patches, core/calibration.py), or None when
    its patches have none (the model has no calibration for the job's search)."""
    if p_values is None:
        return None
    p = np.array([np.nan if v is None else v for v in p_values.tolist()], dtype=np.float64)
    value = bonferroni(p)
    return None if np.isnan(value) else value


def _typed(batch, heatmaps: bool):
    """A batch of scan rows (pyarrow) in `scan_schema`."""
    schema = scan_schema(heatmaps)
    return batch.select(schema.names).cast(schema)


def _union_schema():
    import pyarrow as pa

    return pa.schema(
        [
            (SCAN_ID, pa.string()),
            ("kind", pa.string()),
            (X, pa.int64()),
            (Y, pa.int64()),
            (SLICE, pa.int64()),
            (ANOMALY_SCORE, pa.float64()),
            (PATCH_ID, pa.string()),
            (LABEL, pa.string()),
            (P_VALUE, pa.float64()),
            (HEAT, pa.binary()),  # the patch's heat cells (float16)
            (THUMB, pa.binary()),  # its pixels per cell (uint8)
            (DOWNSAMPLE, pa.float64()),  # a scan's level-0 pixels per pixel read
        ]
    )


def to_union_rows(batch, kind: str):
    """Bring an input's batch (pyarrow) into the shared schema, explicit types throughout."""
    import pyarrow as pa

    n = batch.num_rows
    cols = {SCAN_ID: batch.column(SCAN_ID), "kind": pa.array([kind] * n, pa.string())}
    if kind == SIZE:  # the scan's size rides in x (width) and y (height)
        cols |= {X: batch.column(WIDTH), Y: batch.column(HEIGHT)}
        if DOWNSAMPLE in batch.column_names:
            cols[DOWNSAMPLE] = batch.column(DOWNSAMPLE)
    else:
        cols |= {X: batch.column(X), Y: batch.column(Y)}
    if kind == SCORE:
        for name in (ANOMALY_SCORE, PATCH_ID, LABEL, P_VALUE, SLICE):
            if name in batch.column_names:
                cols[name] = batch.column(name)
        for name in (HEAT, THUMB):
            if name in batch.column_names:
                cols[name] = batch.column(name)
    schema = _union_schema()
    arrays = [cols[f.name].cast(f.type) if f.name in cols else pa.nulls(n, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def scan_row(
    group: dict[str, np.ndarray],
    out: str,
    threshold: float | None,
    heatmaps: tuple | None,
) -> dict[str, Any]:
    """One scan's union rows -> its summary (+ heatmap) row; [] when nothing was scored."""
    # one order for a scan's rows, whatever order the shuffle delivered them in: float sums
    # (mean, std, the stitched heatmap) then come out bit for bit the same on every run
    group[SLICE] = _floats(group[SLICE])  # NaN: no slice (null from Arrow, as None or NaN)
    order = np.lexsort((group[Y], group[X], np.nan_to_num(group[SLICE], nan=-1.0),
                        group["kind"]))  # fmt: skip
    group = {k: v[order] for k, v in group.items()}
    scored = group["kind"] == SCORE
    if not scored.any():  # every patch of this scan was masked or quarantined
        return {k: [] for k in SUMMARY_COLUMNS + (MAP_COLUMNS if heatmaps else ())}
    row = scan_summary({k: v[scored] for k, v in group.items()}, threshold)
    if heatmaps:
        geometry = HeatmapGeometry(*heatmaps)
        hottest = row[MAX_SLICE][0]
        if hottest is not None:  # a volume: the heatmap of its hottest slice
            group = {k: v[(group["kind"] != SCORE) | (group[SLICE] == hottest)]
                     for k, v in group.items()}  # fmt: skip
        cells, recorded = scan_cells(group, geometry)
        overlay = JobLayout(out).overlay(str(group[SCAN_ID][0]))
        row |= render_scan(cells, geometry.size, overlay, recorded, tuple(geometry.heat))
        row[HEAT_SLICE] = [hottest]
    return row


def scan_cells(
    group: dict[str, np.ndarray], geometry: HeatmapGeometry
) -> tuple[Cells, ScanSize | None]:
    """A scan's union rows -> (its patches' heat cells, in pixels as read; its recorded size).

    Heat cells are the job's own output; sizes come from the input table: a patch whose
    position is negative or whose cells do not fit the model's grid is left out of the
    picture (a job of another model wrote it), and so is a size that is not positive. A scan
    read at a downsample (a slide at --mpp) has level-0 positions, brought to pixels as read.
    """
    g = geometry.size // heat_cell(geometry.size)
    recorded = _recorded(group)
    ds = recorded.downsample if recorded else 1.0
    rows = np.flatnonzero(group["kind"] == SCORE)
    x, y = _floats(group[X][rows]), _floats(group[Y][rows])
    heat_len, thumb_len = g * g * 2, g * g * geometry.channels
    heats, thumbs = group[HEAT][rows], group[THUMB][rows]
    fits = np.array([h is not None and len(h) == heat_len for h in heats], dtype=bool)
    keep = fits & np.isfinite(x) & np.isfinite(y) & (x >= 0) & (y >= 0)
    whole = all(t is not None and len(t) == thumb_len for t in thumbs[keep])
    # one buffer each, not an array a patch: a slide has 150,000 patches
    heat = np.frombuffer(b"".join(heats[keep]), "<f2").reshape(-1, g, g)
    thumb = None
    if whole:
        thumb = np.frombuffer(b"".join(thumbs[keep]), np.uint8)
        thumb = thumb.reshape(-1, g, g, geometry.channels)
    return Cells(
        np.rint(x[keep] / ds).astype(np.int64),
        np.rint(y[keep] / ds).astype(np.int64),
        heat,
        thumb,
    ), recorded


def _recorded(group: dict[str, np.ndarray]) -> ScanSize | None:
    """The scan's size as ingest recorded it (level-0 pixels, the downsample it was read at);
    None when unknown or not positive. The size rides in x (width) and y (height)."""
    for i in np.flatnonzero(group["kind"] == SIZE):
        w, h = _position(group[X][i]), _position(group[Y][i])
        ds = group[DOWNSAMPLE][i] if DOWNSAMPLE in group else None
        ds = float(ds) if ds is not None and np.isfinite(ds) and 0 < ds < 2**20 else 1.0
        if w is not None and h is not None and w > 0 and h > 0:
            return ScanSize(h, w, ds)
    return None


def _position(value) -> int | None:
    """An x, y (or size) value of the union rows as an int; None for a null (NaN after numpy)."""
    return int(value) if value is not None and np.isfinite(value) else None


def _partitions(shuffle: int | None) -> int:
    """Shuffle partitions: a few per CPU, not Ray's fixed 200 (each costs a task), and more
    as the job grows, so that a partition (a task's share of the groupby) stays near
    PARTITION_BYTES of `shuffle` bytes whatever the job's size."""
    import math

    import ray

    per_cpu = 2 * int(ray.cluster_resources().get("CPU", 1))
    by_size = math.ceil(shuffle / PARTITION_BYTES) if shuffle else 1
    return max(1, per_cpu, by_size)


def shuffle_bytes(rows: int, heatmaps: tuple | None) -> int:
    """A bound on the shuffle's input for a job of `rows` patches, from its geometry alone
    (no metadata reads): the summary columns, plus with heatmaps a patch's heat cells
    (float16) and thumbnail (a byte a cell and channel)."""
    per_row = 256
    if heatmaps:
        size, channels = heatmaps[:2]
        cells = (size // heat_cell(size)) ** 2
        per_row += cells * (2 + channels)
    return rows * per_row


def groups_in_driver(rows: int, heatmaps: tuple | None) -> bool:
    """Whether a job of `rows` patches is small enough to group in the driver."""
    return rows <= LOCAL_ROWS and shuffle_bytes(rows, heatmaps) <= LOCAL_BYTES


def write_scan_tables(
    out: str,
    patches: str,
    *,
    threshold: float | None = None,
    heatmaps: tuple | None = None,
    io_cpus: float = 0.5,
    rows: int | None = None,
) -> str:
    """Write OUT/scan_scores, and with `heatmaps=(patch_size, channels)` OUT/heatmaps and
    OUT/overlays, from OUT/patch_scores (and the patch table's recorded scan sizes).

    `rows` (the patch table's row count) lets a small job be grouped in the driver; without
    it, or above `LOCAL_ROWS` rows or `LOCAL_BYTES` of `shuffle_bytes`, the groupby runs on
    Ray.
    -> "driver" or "ray", where it ran."""
    inputs = _inputs(out, patches, heatmaps)
    layout = JobLayout(out)
    scan_scores = layout.scan_scores
    target = layout.heatmaps if heatmaps else scan_scores
    for path in {target, scan_scores}:
        storage.delete(path)
    args = (out, threshold, heatmaps)
    if rows is not None and groups_in_driver(rows, heatmaps):
        table = _group_in_driver(inputs, args)
        _write_table(table, target)
        if heatmaps:
            _write_table(table.select(list(SUMMARY_COLUMNS)), scan_scores)
        return "driver"
    shuffle = shuffle_bytes(rows, heatmaps) if rows is not None else None
    _group_on_ray(inputs, target, args, io_cpus, _partitions(shuffle))
    if heatmaps:  # scan_scores = the summary columns of heatmaps, streamed, never all in memory
        import pyarrow.dataset as pads

        from anogan_batch.io.tables import open_dataset

        source = open_dataset(target).scanner(columns=list(SUMMARY_COLUMNS))
        out_fs, out_inner = storage.filesystem_for(scan_scores)
        pads.write_dataset(
            source,
            out_inner,
            filesystem=out_fs,
            format="parquet",
            basename_template="part-{i}.parquet",
            min_rows_per_group=SCAN_GROUP_ROWS,
            max_rows_per_group=SCAN_GROUP_ROWS,
        )
    return "ray"


def _inputs(out: str, patches: str, heatmaps: tuple | None) -> list[tuple[str, list[str], str]]:
    """(path, columns, kind) of each table the groupby brings together."""
    from anogan_batch.io.tables import table_columns

    score_cols = [SCAN_ID, X, Y, ANOMALY_SCORE, PATCH_ID, LABEL]
    stored = table_columns(JobLayout(out).patch_scores)
    wanted = (P_VALUE, SLICE) + ((HEAT, THUMB) if heatmaps else ())
    score_cols += [c for c in wanted if c in stored]
    inputs = [(JobLayout(out).patch_scores, score_cols, SCORE)]
    if heatmaps:
        scans_file = storage.join(patches, SCANS_FILE)
        if storage.exists(scans_file):
            cols = [SCAN_ID, HEIGHT, WIDTH]
            cols += [c for c in (DOWNSAMPLE,) if c in table_columns(scans_file)]
            inputs.append((scans_file, cols, SIZE))
    return inputs


def _group_on_ray(inputs, target: str, args: tuple, io_cpus: float, partitions: int) -> None:
    import ray.data

    from anogan_batch.io.tables import ray_read_parquet

    def read(path: str, columns: list[str], kind: str) -> ray.data.Dataset:
        ds = ray_read_parquet(path, num_cpus=io_cpus, partitioning=None)
        return ds.select_columns(columns).map_batches(
            to_union_rows, fn_args=(kind,), batch_format="pyarrow", num_cpus=io_cpus
        )

    parts = [read(*i) for i in inputs]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    rows = ds.groupby(SCAN_ID, num_partitions=partitions).map_groups(
        scan_row, fn_args=args, batch_format="numpy", num_cpus=io_cpus
    )
    rows = rows.map_batches(
        _typed, fn_args=(bool(args[2]),), batch_format="pyarrow", num_cpus=io_cpus
    )
    fs, inner = storage.filesystem_for(target)
    groups = {} if args[2] else {"row_group_size": SCAN_GROUP_ROWS}  # see SCAN_GROUP_ROWS
    rows.write_parquet(inner, filesystem=fs, ray_remote_args={"num_cpus": io_cpus}, **groups)


def _group_in_driver(inputs, args: tuple):
    """The same groups and `scan_row` calls as `_group_on_ray`, on pyarrow in this process.
    -> the scans' rows (pyarrow), at least one: the caller has scored patches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from anogan_batch.io.tables import open_dataset

    def read(path: str, columns: list[str], kind: str) -> list[pa.Table]:
        if path.endswith(".parquet"):  # _scans.parquet, which a dataset listing skips
            fs, inner = storage.filesystem_for(path)
            return [to_union_rows(pq.read_table(inner, filesystem=fs, columns=columns), kind)]
        # file by file, each in its own schema: an input table's files may disagree on
        # integer widths or optional columns, and the union schema takes them all
        fragments = open_dataset(path).get_fragments()
        return [
            to_union_rows(f.to_table(columns=[c for c in columns if c in _stored(f)]), kind)
            for f in fragments
        ]

    union = pa.concat_tables(
        [table for path, cols, kind in inputs for table in read(path, cols, kind)]
    ).sort_by(SCAN_ID)
    columns = {
        name: union.column(name).to_numpy(zero_copy_only=False) for name in union.column_names
    }
    scan_ids = columns[SCAN_ID]
    starts = np.flatnonzero(np.r_[True, scan_ids[1:] != scan_ids[:-1]])
    schema = scan_schema(bool(args[2]))
    rows: dict[str, list] = {name: [] for name in schema.names}
    for a, b in zip(starts, [*starts[1:], len(scan_ids)], strict=True):
        for k, v in scan_row({k: v[a:b] for k, v in columns.items()}, *args).items():
            rows[k].extend(v)
    return pa.table({k: pa.array(v, schema.field(k).type) for k, v in rows.items()}, schema)


def _stored(fragment) -> list[str]:
    """The columns stored in one Parquet file (hive partition keys are not needed here)."""
    return fragment.physical_schema.names


def _write_table(table, path: str) -> None:
    import pyarrow.parquet as pq

    fs, inner = storage.filesystem_for(path)
    fs.create_dir(inner, recursive=True)
    pq.write_table(table, f"{inner}/part-0.parquet", filesystem=fs)
