"""A finished job's rows for the long-lived warehouse tables, which both formats share
(Iceberg: warehouse/iceberg_tables.py, Delta: warehouse/delta_tables.py): which tables, in
which order, which columns, and the `jobs` lineage row.

The tables are `patch_scores`, `scan_scores`, `quarantine` (each with the lineage columns
`job_id`, `model_id`, `job_started_at`) and `jobs`, published in that order: a job is complete
in the warehouse once its `jobs` row exists. `residual_map`, `latent`, `heat` and `thumb`
(per-patch arrays) stay in the job's own Parquet files under `jobs.out`, keyed by `patch_id`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from anogan_batch.errors import InputError
from anogan_batch.io import storage
from anogan_batch.io.columns import ARRAY_COLUMNS, JOB_ID, JOB_STARTED_AT, MODEL_ID, PATCH_ID
from anogan_batch.job.layout import JobLayout
from anogan_batch.job.manifest import SEARCH_KEYS, JobManifest

if TYPE_CHECKING:
    import pyarrow as pa

# Published in this order; `jobs` last marks the job complete in the warehouse.
JOBS = "jobs"  # the warehouse's own table: one row per job
TABLE_ORDER = (JobLayout.PATCH_SCORES, JobLayout.SCAN_SCORES, JobLayout.QUARANTINE, JOBS)
# The columns both formats partition by (when a table has them): a day of jobs, a model.
PARTITION_DAY, PARTITION_MODEL = JOB_STARTED_AT, MODEL_ID


def finished_job(out: str) -> JobManifest:
    manifest = JobManifest.load(out)
    if manifest is None:
        raise InputError(f"'{out}' holds no job (no job.json)")
    if manifest.status != "succeeded":
        raise InputError(
            f"job {manifest.job_id} in '{out}' is {manifest.status}, not succeeded: rerun "
            "`score` with the same command first"
        )
    return manifest


@dataclass(frozen=True)
class JobRows:
    """The rows a job adds to one warehouse table, streamed: each `batches()` call is a new
    pass over the job's files, a batch of `io/tables.STREAM_ROWS` rows at a time, so a publish
    holds one batch whatever the job's size, and a commit that lost a race can write its
    rows again."""

    schema: pa.Schema
    rows: int
    batches: Callable[[], Iterator[pa.RecordBatch]]


def job_rows(out: str, manifest: JobManifest, name: str) -> JobRows | None:
    """The rows the job adds to table `name`, with the lineage columns (a batch may hold them
    in another order, or lack a column a newer version added: `conform` puts them in the
    table's); None when none."""
    import pyarrow as pa

    if name == JOBS:
        table = pa.Table.from_pylist([_jobs_row(out, manifest)], schema=jobs_schema())
        return JobRows(table.schema, 1, lambda: iter(table.to_batches()))
    path = getattr(JobLayout(out), name)
    if not storage.list_files(path, suffixes=(".parquet",)):
        return None
    from anogan_batch.io.tables import count_rows, open_dataset, stream_batches

    ds = open_dataset(path)
    rows = count_rows(ds, path)
    if rows == 0:
        return None
    columns = [c for c in ds.schema.names if c not in ARRAY_COLUMNS]
    # constants as Arrow scalars repeated, never as Python lists of a batch's length: those
    # leave the interpreter's memory larger after every batch (docs/performance.md)
    lineage_columns = {
        JOB_ID: pa.scalar(manifest.job_id, pa.string()),
        MODEL_ID: pa.scalar(manifest.model_id, pa.string()),
    }
    started = pa.scalar(_timestamp(manifest.started_at), pa.timestamp("us", tz="UTC"))

    def lineage(batch: pa.RecordBatch) -> pa.RecordBatch:
        n = batch.num_rows
        for column, value in lineage_columns.items():
            if column not in batch.schema.names:
                batch = batch.append_column(column, pa.repeat(value, n))
        return _plain_types(batch.append_column(JOB_STARTED_AT, pa.repeat(started, n)))

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in stream_batches(ds, columns):  # pulled: one batch in memory
            if batch.num_rows:
                yield lineage(batch)

    schema = lineage(
        pa.RecordBatch.from_pylist([], schema=pa.schema([ds.schema.field(c) for c in columns]))
    ).schema
    return JobRows(schema, rows, batches)


DATA_FILE_ROWS = 1_000_000  # rows of one data file a publish writes (Iceberg, Delta)


@dataclass(frozen=True)
class DataFileWritten:
    uri: str  # local path or s3:// URI
    size: int  # bytes
    rows: int


def write_data_files(
    rows: JobRows, folder: str, schema: pa.Schema, stem: str
) -> list[DataFileWritten]:
    """The job's rows as Parquet files `<stem>-<k>.parquet` under `folder` (local or s3://),
    DATA_FILE_ROWS rows a file, written a batch at a time in `schema` (a column the job lacks
    is null, a column `schema` lacks is left out). The warehouse formats then commit these
    files whole, in one transaction: their own writers held a job's rows in memory (Delta)
    or several 64 MB chunks of them at once (Iceberg), measured in docs/performance.md."""
    import pyarrow.parquet as pq

    written: list[DataFileWritten] = []
    storage.makedirs(folder)
    batches = rows.batches()
    for k in itertools.count():
        uri = storage.join(folder, f"{stem}-{k:05d}.parquet")
        fs, inner = storage.filesystem_for(uri)
        count = 0
        for batch in batches:
            if count == 0:
                stream = fs.open_output_stream(inner)
                writer = pq.ParquetWriter(stream, schema, compression="zstd")
            writer.write_batch(conform(batch, schema))
            count += batch.num_rows
            if count >= DATA_FILE_ROWS:
                break
        if count == 0:
            return written
        writer.close()
        stream.close()
        written.append(DataFileWritten(uri, fs.get_file_info(inner).size, count))
    raise AssertionError("unreachable")


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """`batch` in `schema`'s columns and types: a column it lacks is null."""
    import pyarrow as pa

    names = batch.schema.names
    columns = [
        batch.column(f.name).cast(f.type) if f.name in names else pa.nulls(batch.num_rows, f.type)
        for f in schema
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _jobs_row(out: str, manifest: JobManifest) -> dict[str, Any]:
    return {
        JOB_ID: manifest.job_id, "status": manifest.status,
        "started_at": _timestamp(manifest.started_at),
        "finished_at": _timestamp(manifest.finished_at),
        MODEL_ID: manifest.model_id,
        "calibration_id": (manifest.calibration or {}).get("calibration_id"),
        "input_rows": manifest.input_rows, "scored_rows": manifest.scored_rows,
        "quarantined_rows": manifest.quarantined_rows,
        "patches_per_second": manifest.patches_per_second,
        "params": json.dumps(manifest.params, sort_keys=True),
        "out": storage.absolute(out),
        "manifest": json.dumps(manifest.__dict__, sort_keys=True, default=str),
    }  # fmt: skip


def jobs_schema() -> pa.Schema:
    """The `jobs` table: one row per published job, its lineage (job.json in full too)."""
    import pyarrow as pa

    utc = pa.timestamp("us", tz="UTC")
    return pa.schema([
        (JOB_ID, pa.string()), ("status", pa.string()),
        ("started_at", utc), ("finished_at", utc),
        (MODEL_ID, pa.string()), ("calibration_id", pa.string()),
        ("input_rows", pa.int64()), ("scored_rows", pa.int64()),
        ("quarantined_rows", pa.int64()), ("patches_per_second", pa.float64()),
        ("params", pa.string()), ("out", pa.string()), ("manifest", pa.string()),
    ])  # fmt: skip


# Commits of one table (Iceberg, Delta) tried before a publish gives up: each attempt reads
# the table, checks for the job and commits; a lost race waits commit_pause(attempt) first.
COMMIT_ATTEMPTS = 8


def commit_pause(attempt: int) -> None:
    """Exponential backoff with full jitter, so that racing publishers drift apart."""
    import random
    import time

    time.sleep(random.uniform(0, 0.1 * 2**attempt))


IDS_PER_FILE = 1_000_000  # --skip-published: ids per Parquet file under OUT/_published_ids


def same_search_jobs(jobs: pa.Table, params: dict[str, Any]) -> list[str]:
    """The job_ids among `jobs` rows (job_id, params) that scored with this job's model and
    search parameters (SEARCH_KEYS): their patch ids are what --skip-published skips."""
    want = _search_of(params)
    return [
        row[JOB_ID]
        for row in jobs.select([JOB_ID, "params"]).to_pylist()
        if _search_of(json.loads(row["params"])) == want
    ]


def _search_of(params: dict[str, Any]) -> dict[str, Any]:
    return {k: params.get(k) for k in (MODEL_ID, *SEARCH_KEYS)}


def write_id_files(batches: Iterable[pa.RecordBatch], dest: str) -> int:
    """Stream the `patch_id` column of batches into Parquet files of IDS_PER_FILE ids under
    dest, one file's worth in memory at a time. -> how many ids."""
    total, pending = 0, []
    for batch in batches:
        pending.append(batch)
        if sum(b.num_rows for b in pending) >= IDS_PER_FILE:
            total += _write_ids(pending, storage.join(dest, f"ids-{total:012d}.parquet"))
            pending = []
    if pending:
        total += _write_ids(pending, storage.join(dest, f"ids-{total:012d}.parquet"))
    return total


def _write_ids(batches: list, path: str) -> int:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_batches(batches).select([PATCH_ID])
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(path, buffer.getvalue())
    return table.num_rows


def _timestamp(text: str | None):
    from datetime import datetime

    return None if text is None else datetime.fromisoformat(text)


def _plain_types(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Hive partition columns may come back dictionary-encoded; Iceberg wants plain strings."""
    import pyarrow as pa

    if not any(pa.types.is_dictionary(f.type) for f in batch.schema):
        return batch
    fields = [
        pa.field(f.name, f.type.value_type) if pa.types.is_dictionary(f.type) else f
        for f in batch.schema
    ]
    return batch.cast(pa.schema(fields))
