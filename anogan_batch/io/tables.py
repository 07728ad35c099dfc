"""Parquet datasets on local disk or S3: open, check, count, read a few columns.

Everything here streams or reads footers; nothing loads a whole archive unless asked for
specific small columns (eval reads `label` and `anomaly_score`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from anogan_batch.errors import InputError
from anogan_batch.io import storage
from anogan_batch.io.columns import (
    CHANNELS,
    DTYPE,
    HEIGHT,
    IMAGE,
    LABEL,
    NORMALISATION,
    PATCH_ID,
    SCAN_ID,
    WIDTH,
    X,
    Y,
)
from anogan_batch.io.patches import INGEST_RECORD, check_columns

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.dataset as pads


def parquet_files(path: str) -> list[str]:
    """The Parquet files of a dataset (a file, or a folder tree), skipping _/. entries."""
    if not storage.exists(path) and not storage.is_dir(path):
        raise InputError(f"'{path}' does not exist")
    files = storage.list_files(path, suffixes=(".parquet", ".parq", ".pq"))
    if not files:
        raise InputError(f"'{path}' holds no Parquet files (*.parquet)")
    return files


def open_dataset(path: str) -> pads.Dataset:
    """A pyarrow dataset over `path` (hive partitions discovered), or InputError."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    files = parquet_files(path)
    fs, _ = storage.filesystem_for(path)
    inner = [storage.filesystem_for(f)[1] for f in files]
    base = storage.filesystem_for(path)[1]
    try:
        return pads.dataset(
            inner,
            filesystem=fs,
            format="parquet",
            partitioning=pads.HivePartitioning.discover(infer_dictionary=False),
            partition_base_dir=base,
        )
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"cannot read Parquet dataset '{path}': {e}") from e


def open_patch_table(path: str) -> pads.Dataset:
    """Open a patch table and check its required columns; empty tables are an error."""
    ds = open_dataset(path)
    check_columns(ds.schema, path)
    return ds


def count_rows(ds: pads.Dataset, where: str) -> int:
    """Row count from Parquet footers; a corrupt file is named in the error."""
    return sum(meta.num_rows for _, meta, _ in _footers(ds, where))


@dataclass(frozen=True)
class PatchTableInfo:
    rows: int
    columns: tuple[str, ...]  # every column some file of the table has, in first-seen order


def inspect_patch_table(path: str) -> PatchTableInfo:
    """Rows and columns of a patch table from every file's footer, checking each file's own
    schema on the way: files written by different tools may disagree, and a file whose
    columns cannot be read as a patch table is named here, before any row is scored."""
    ds = open_patch_table(path)
    rows, columns = 0, {}
    for fragment, meta, schema in _footers(ds, path):
        check_columns(schema, fragment.path)
        rows += meta.num_rows
        columns |= dict.fromkeys(schema.names)
    return PatchTableInfo(rows, tuple(columns))


def table_columns(path: str) -> tuple[str, ...]:
    """Every column some file of the dataset at `path` has (a dataset's own schema is its
    first file's)."""
    columns: dict[str, None] = {}
    ds = open_dataset(path)
    for _, _, schema in _footers(ds, path):
        columns |= dict.fromkeys(schema.names)
    return tuple(columns)


def _footers(ds: pads.Dataset, where: str):
    """(fragment, Parquet metadata, arrow schema with hive keys) of every file, one footer at
    a time; a file whose footer cannot be read is an InputError naming it.

    Read apart from the fragment: a fragment keeps the footer it read (`metadata`,
    `count_rows()`) as long as its dataset lives, which for a job's output tables was tens of
    MB a million rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    partition_fields = [f for f in ds.schema if f.name not in _file_columns(ds)]
    for fragment in ds.get_fragments():
        try:
            # `schema_arrow`, not `metadata.schema.to_arrow_schema()`: that one leaves the
            # freed footers' memory to the process (46 MB over 3,000 row groups)
            with pq.ParquetFile(fragment.path, filesystem=ds.filesystem) as footer:
                meta, schema = footer.metadata, footer.schema_arrow
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"'{where}': cannot read '{fragment.path}': {e}") from e
        for field in partition_fields:  # hive partition columns live in folder names
            if field.name not in schema.names:
                schema = schema.append(field)
        yield fragment, meta, schema


def _file_columns(ds: pads.Dataset) -> set[str]:
    """Column names stored in the dataset's files (not its hive partition keys)."""
    partitioning = getattr(ds, "partitioning", None)
    keys = set(partitioning.schema.names) if partitioning is not None else set()
    return set(ds.schema.names) - keys


# Tables up to this many rows have their ids checked in the driver (pyarrow's hash groupby,
# ~100 bytes of memory a row); larger ones by a Ray Data groupby across the cluster.
ID_CHECK_DRIVER_ROWS = 2_000_000
SHOWN_IDS = 5
ID_ROWS_PER_PARTITION = 2_000_000  # ids per hash partition of the Ray check (~100 MB of ids)


def id_partitions(ids: int) -> int:
    """Hash partitions of a Ray group-by or join over `ids` ids: one per ID_ROWS_PER_PARTITION.
    Ray's default of 200 starts aggregator actors by the dozen for any table, which a small
    node pays for in seconds."""
    return max(1, -(-ids // ID_ROWS_PER_PARTITION))


def check_patch_ids(
    path: str, rows: int, *, driver_rows: int = ID_CHECK_DRIVER_ROWS, io_cpus: float = 0.5
) -> str:
    """Refuse a patch table whose `patch_id`s are null or repeat (InputError naming how many
    and the first few): exactly-once scoring and resume are keyed on the id. Memory stays
    bounded at any size: above `driver_rows` the count runs on Ray. -> "driver" or "ray"."""
    where = "driver" if rows <= driver_rows else "ray"
    count = _id_counts_in_driver if where == "driver" else _id_counts_on_ray
    nulls, repeated, examples = count(path, io_cpus, rows)
    if nulls:
        raise InputError(
            f"patch table '{path}': {nulls:,} row(s) have a null patch_id; every row needs "
            "a unique id (ingest writes them)"
        )
    if repeated:
        shown = ", ".join(f"{pid!r} ({n} rows)" for pid, n in examples)
        raise InputError(
            f"patch table '{path}': {repeated:,} patch_id(s) appear more than once, e.g. "
            f"{shown}; patch_id must be unique (nothing was scored)"
        )
    return where


def _id_counts_in_driver(path: str, io_cpus: float, rows: int) -> tuple[int, int, list]:
    """(null ids, repeated ids, first few repeated (id, count)) by pyarrow in this process.

    By sorting, not by a hash group-by: the ids, their order and one sorted copy are about 2.5
    times less memory than pyarrow's group-by table (docs/performance.md)."""
    import pyarrow.compute as pc

    ids = open_dataset(path).to_table(columns=[PATCH_ID]).column(PATCH_ID)
    ids = ids.combine_chunks() if ids.num_chunks != 1 else ids.chunk(0)
    nulls = ids.null_count
    ordered = ids.take(pc.array_sort_indices(ids, null_placement="at_end"))
    ordered = ordered[: len(ordered) - nulls]
    # a repeated id is one equal to its predecessor: (count - 1) entries of it here
    extra = ordered[1:].filter(pc.equal(ordered[1:], ordered[:-1]))
    if not len(extra):
        return nulls, 0, []
    counts = pc.value_counts(extra)  # id -> count - 1, in order of first appearance: sorted
    first = counts.slice(0, SHOWN_IDS)
    pairs = zip(first.field("values").to_pylist(), first.field("counts").to_pylist(), strict=True)
    return nulls, len(counts), [(pid, n + 1) for pid, n in pairs]


def _id_counts_on_ray(path: str, io_cpus: float, rows: int) -> tuple[int, int, list]:
    """The same counts by a Ray Data groupby: each node holds only its share of the ids."""
    from ray.data.expressions import col

    ds = ray_read_parquet(
        path, num_cpus=io_cpus, file_extensions=["parquet", "parq", "pq"]
    ).select_columns([PATCH_ID])
    flagged = (
        ds.groupby(PATCH_ID, num_partitions=id_partitions(rows))
        .count()
        .filter(expr=col(PATCH_ID).is_null() | (col("count()") > 1))
        .materialize()
    )
    rows = flagged.take_all() if flagged.count() <= 10_000 else flagged.take(10_000)
    nulls = sum(r["count()"] for r in rows if r[PATCH_ID] is None)
    repeated = [r for r in rows if r[PATCH_ID] is not None]
    n_repeated = flagged.count() - (1 if nulls else 0)
    first = sorted((r[PATCH_ID], r["count()"]) for r in repeated)[:SHOWN_IDS]
    return nulls, n_repeated, first


# Ray 2.60's Parquet reader reads file footers on this many actors, 32 by default whatever the
# table: on a small node their start-up costs seconds a read (docs/performance.md). We size
# the pool to the table (one actor per FOOTERS_PER_ACTOR files) unless the user set it.
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FOOTERS_PER_ACTOR, MAX_FOOTER_ACTORS = 10, 32


def ray_read_parquet(path: str, **kwargs: Any) -> Any:
    """ray.data.read_parquet of the dataset at `path` (local or S3, our filesystem and retry
    policy), its footer readers sized to the number of files."""
    import ray.data

    fs, inner = storage.filesystem_for(path)
    files = len(parquet_files(path)) if storage.is_dir(path) else 1
    actors = -(-files // FOOTERS_PER_ACTOR)
    with _env_default(FOOTER_ACTORS_ENV, str(max(1, min(MAX_FOOTER_ACTORS, actors)))):
        # Ray reads the setting when read_parquet builds the reader, here in this process
        return ray.data.read_parquet(inner, filesystem=fs, **kwargs)


@contextlib.contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """os.environ[name] = value for the block, unless it is set already."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def count_listed_ids(
    path: str,
    ids_path: str,
    rows: int,
    listed: int,
    *,
    io_cpus: float = 0.5,
    driver_rows: int = ID_CHECK_DRIVER_ROWS,
) -> int:
    """How many rows of the table at `path` have a patch_id that the table at `ids_path` (one
    `patch_id` column, `listed` rows, repeats allowed) lists. In the driver when both fit
    (pyarrow, as `check_patch_ids`), else a Ray Data semi-join, memory spread like a shuffle."""
    if rows + listed <= driver_rows:
        import pyarrow.compute as pc

        ids = open_dataset(path).to_table(columns=[PATCH_ID]).column(PATCH_ID)
        listed_ids = open_dataset(ids_path).to_table(columns=[PATCH_ID]).column(PATCH_ID)
        return int(pc.sum(pc.is_in(ids, value_set=pc.unique(listed_ids))).as_py() or 0)
    left = ray_read_parquet(path, columns=[PATCH_ID], num_cpus=io_cpus)
    right = ray_read_parquet(ids_path, columns=[PATCH_ID], num_cpus=io_cpus)
    return left.join(right, join_type="left_semi", num_partitions=id_partitions(rows + listed),
                     on=(PATCH_ID,)).count()  # fmt: skip


def first_rows(ds: pads.Dataset, columns: list[str], n: int = 1) -> pa.Table:
    """The first `n` rows of the first non-empty file: a cheap sample for up-front checks.

    Pulled on this thread (`stream_batches`), never by a dataset scan stopped early
    (`Dataset.head`): such a scan leaves Arrow's readahead running, and its calls into the
    Python S3 handler (io/s3.py) at interpreter exit hang or abort the process
    (docs/reliability.md)."""
    import pyarrow as pa

    cols = [c for c in columns if c in ds.schema.names]
    for batch in stream_batches(ds, cols, batch_size=n):
        if batch.num_rows:
            return pa.Table.from_batches([batch.slice(0, n)])
    return ds.schema.empty_table().select(cols)


STREAM_ROWS = 65_536  # rows `stream_batches` pulls at a time unless told otherwise


def stream_batches(ds: pads.Dataset, columns: list[str], batch_size: int | None = None):
    """The dataset's rows, `batch_size` (STREAM_ROWS) at a time, read on this thread file
    after file as the consumer asks for them. A dataset scan reads ahead of a slow consumer
    without bound (a publish writing what it read grew by 90 bytes a row,
    docs/performance.md); this holds one batch. A file's batches have the `columns` it
    stores (no hive partition keys)."""
    import pyarrow.parquet as pq

    batch_size = batch_size or STREAM_ROWS
    for fragment in ds.get_fragments():
        with ds.filesystem.open_input_file(fragment.path) as f:
            reader = pq.ParquetFile(f, pre_buffer=False)
            names = [c for c in columns if c in reader.schema_arrow.names]
            yield from reader.iter_batches(batch_size=batch_size, columns=names, use_threads=False)


def read_columns(path: str, columns: list[str], filter_expr=None) -> pa.Table:
    """Read some columns of a dataset (optionally filtered); missing optional columns skip."""
    ds = open_dataset(path)
    cols = [c for c in columns if c in ds.schema.names]
    return ds.to_table(columns=cols, filter=filter_expr)


def write_patch_table(
    path: str,
    pixels,
    labels: list[str | None] | None = None,
    *,
    ids: list[str] | None = None,
    scan_ids: list[str] | None = None,
    files: int = 1,
) -> str:
    """Write pixels (N, H, W[, C]) as a patch table (all at (0, 0) of their scan) in `files`
    Parquet files. For arrays already in memory: tests, benchmarks, notebooks."""
    import numpy as np
    import pyarrow.parquet as pq

    table = patch_table(pixels, labels, ids=ids, scan_ids=scan_ids)
    storage.makedirs(path)
    for k, part in enumerate(np.array_split(np.arange(table.num_rows), files)):
        fs, inner = storage.filesystem_for(storage.join(path, f"part-{k:05d}.parquet"))
        with fs.open_output_stream(inner) as f:
            pq.write_table(table.take(part), f, compression="zstd")
    return path


def patch_table(
    pixels,
    labels: list[str | None] | None = None,
    *,
    ids: list[str] | None = None,
    scan_ids: list[str] | None = None,
) -> pa.Table:
    """Pixels (N, H, W[, C]) as patch table rows in memory, each at (0, 0) of its own scan."""
    import numpy as np
    import pyarrow as pa

    from anogan_batch.io.patches import PATCH_SCHEMA, encode_pixels, patch_id_for

    if pixels.ndim == 3:
        pixels = pixels[..., None]
    n, h, w, c = pixels.shape
    scan_ids = scan_ids or [f"scan{i:05d}" for i in range(n)]
    ids = ids or [patch_id_for(s, 0, 0, h) for s in scan_ids]
    return pa.table(
        {
            PATCH_ID: ids,
            SCAN_ID: scan_ids,
            X: pa.array(np.zeros(n), pa.int32()),
            Y: pa.array(np.zeros(n), pa.int32()),
            IMAGE: [encode_pixels(p) for p in pixels],
            HEIGHT: pa.array([h] * n, pa.int32()),
            WIDTH: pa.array([w] * n, pa.int32()),
            CHANNELS: pa.array([c] * n, pa.int32()),
            DTYPE: [pixels.dtype.name] * n,
            LABEL: labels if labels is not None else [None] * n,
        },
        schema=PATCH_SCHEMA,
    )


def table_normalisation(path: str) -> dict | None:
    """The pixel normalisation ingest recorded for a patch table, or None when unrecorded
    (a table not written by `ingest`). A table mixing several is an error: one model can
    only have learned one."""
    record = storage.join(path, INGEST_RECORD)
    if not storage.exists(record):
        return None
    norms = storage.read_json(record).get(NORMALISATION) or []
    if len(norms) > 1:
        raise InputError(
            f"patch table '{path}' mixes pixel normalisations {norms}; ingest scans of each "
            "depth separately, or pass the same --window to all of them"
        )
    return norms[0] if norms else None


def check_normalisation(table: dict | None, model: dict, patches: str, model_dir: str) -> None:
    """InputError when a table's recorded normalisation differs from the model's."""
    if table is None:
        return
    want = {DTYPE: model.get("pixel_dtype"), "window": model.get("window")}
    if table != want:
        raise InputError(
            f"patch table '{patches}' was normalised as {table}, but model '{model_dir}' was "
            f"trained on {want}; re-ingest the scans the way the training scans were "
            "(same bit depth and --window)"
        )
