"""Publishing finished jobs into long-lived Delta Lake tables (docs/warehouse.md).

The same four tables as Iceberg's (warehouse/job_rows.py), at `<warehouse>/<namespace>/<table>`,
local or `s3://`. Exactly once by Delta's own idempotent-write record: each append commits an
application transaction `anogan:<job_id>`, and a table whose log already holds it is skipped;
the same job published twice at once conflicts on that transaction and the loser finds it
published. Appends from two jobs never conflict; deltalake retries the commit when another
writer got there first (on S3 its commits are conditional puts, so none overwrites another).
A job's rows are written as Parquet files a batch at a time and committed as add actions in
one transaction (deltalake's own writer holds its whole input); a newer version's columns join
the table first (`alter.add_columns`).

--skip-published reads the ids back: the `jobs` rows of this model and search, then their
`patch_id`s from `patch_scores`, streamed through a pyarrow dataset with the filter pushed down.

deltalake's native runtime can abort the interpreter at exit (see
warehouse/delta_in_place.py), so the work runs in a child process that leaves with os._exit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import sys
from typing import TYPE_CHECKING, Any

from anogan_batch.errors import ConfigError, InputError
from anogan_batch.io import storage
from anogan_batch.io.columns import JOB_ID, MODEL_ID, PATCH_ID
from anogan_batch.io.s3 import is_s3_failure, run_retried_child
from anogan_batch.job.layout import JobLayout
from anogan_batch.warehouse.job_rows import (
    COMMIT_ATTEMPTS,
    JOBS,
    PARTITION_MODEL,
    TABLE_ORDER,
    JobRows,
    commit_pause,
    finished_job,
    job_rows,
    same_search_jobs,
    write_data_files,
    write_id_files,
)
from anogan_batch.warehouse.target import WarehouseTarget

if TYPE_CHECKING:
    import pyarrow as pa

APP_PREFIX = "anogan:"  # Delta application transaction id of a published job: anogan:<job_id>


def append_job_to_delta(out: str, target: WarehouseTarget) -> dict[str, Any]:
    """Append the finished job in OUT to the Delta tables of target, exactly once.
    -> {table: rows appended, or "already published"}."""
    finished_job(out)  # clear errors here, not in the child
    _uri(target, JOBS)
    return _in_child("append", f"Appending '{out}' to the Delta tables", out, _to_json(target))


def write_published_ids(target: WarehouseTarget, params: dict[str, Any], dest: str) -> int:
    """Like iceberg_tables.write_published_ids, from the Delta tables of target: the patch_ids
    published for this model and search, as Parquet files under dest."""
    what = f"reading the published ids of '{_uri(target, JobLayout.PATCH_SCORES)}'"
    return _in_child("ids", what, _to_json(target), json.dumps(params), dest)


def _uri(target: WarehouseTarget, name: str) -> str:
    if target.warehouse is None:
        raise ConfigError("--warehouse", None, "the folder or s3:// prefix of the Delta tables")
    return storage.join(target.warehouse, target.namespace, target.table(name))


def _to_json(target: WarehouseTarget) -> str:
    return json.dumps(dataclasses.asdict(target))


def _from_json(text: str) -> WarehouseTarget:
    return WarehouseTarget(**json.loads(text))


def _in_child(command: str, what: str, *args: str) -> Any:
    cmd = [sys.executable, "-m", "anogan_batch.warehouse.delta_tables", command, *args]
    r = run_retried_child(cmd)
    if r.returncode == 0:
        return json.loads(r.stdout.strip().splitlines()[-1])
    message = f"{what} failed: {r.stderr.strip()[-2000:]}"
    if is_s3_failure(message):
        raise OSError(message)  # S3 past its retries: exit 1, rerun (cli.run)
    raise InputError(message)


def _published_ids(target_json: str, params_json: str, dest: str) -> int:
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    from anogan_batch.io.s3 import object_store_options

    target, params = _from_json(target_json), json.loads(params_json)
    storage.delete(dest)
    uris = {name: _uri(target, name) for name in (JOBS, JobLayout.PATCH_SCORES)}
    options = object_store_options(uris[JOBS])
    if not all(_exists(u, options) for u in uris.values()):
        return 0
    jobs = DeltaTable(uris[JOBS], storage_options=options).to_pyarrow_dataset()
    same = same_search_jobs(
        jobs.to_table(columns=[JOB_ID, "params"], filter=pc.field(MODEL_ID) == params[MODEL_ID]),
        params,
    )
    if not same:
        return 0
    patches = DeltaTable(uris[JobLayout.PATCH_SCORES], storage_options=options)
    scanner = patches.to_pyarrow_dataset().scanner(
        columns=[PATCH_ID], filter=pc.field(JOB_ID).isin(same)
    )
    return write_id_files(scanner.to_batches(), dest)


def _append_job(out: str, target_json: str) -> dict[str, Any]:
    from anogan_batch.io.s3 import object_store_options

    manifest = finished_job(out)
    app_id = APP_PREFIX + manifest.job_id
    done: dict[str, Any] = {}
    for name in TABLE_ORDER:
        rows = job_rows(out, manifest, name)
        if rows is not None:
            uri = _uri(_from_json(target_json), name)
            has_model = PARTITION_MODEL in rows.schema.names
            partition = {PARTITION_MODEL: manifest.model_id} if has_model else {}
            done[name] = _append_once(uri, object_store_options(uri), rows, app_id, partition)
    return done


def _append_once(
    uri: str, options: dict | None, rows: JobRows, app_id: str, partition: dict[str, str]
) -> Any:
    """Append rows with the application transaction app_id unless the table holds it. The
    check and the commit read the same table version, so a publish of the same job that
    commits in between is a conflict (Delta's concurrent-transaction check), never a second
    copy. The table is created empty first, so that two first publishes race on creating it,
    not on appending; conflicts and lost races are retried from a fresh read.

    The rows are written a batch at a time (`published.write_data_files`) and committed as
    add actions in one transaction: deltalake's own writer held all of a job's rows in
    memory (docs/performance.md). `partition`: the job's value of each partition column."""
    import pyarrow as pa
    from deltalake import CommitProperties, DeltaTable, Transaction
    from deltalake.exceptions import CommitFailedError, DeltaError, SchemaMismatchError

    partition_by = list(partition) or None
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            if not DeltaTable.is_deltatable(uri, storage_options=options):
                DeltaTable.create(uri, rows.schema, mode="ignore", partition_by=partition_by,
                                  storage_options=options)  # fmt: skip
            table = DeltaTable(uri, storage_options=options)
            if table.transaction_version(app_id) is not None:
                return "already published"
            table = _grown(table, rows, uri, options)  # now with every column of the job
            schema = pa.schema(table.schema().to_arrow())
            table.create_write_transaction(
                _add_actions(uri, rows, schema, partition),
                mode="append",
                schema=schema,
                partition_by=partition_by,
                commit_properties=CommitProperties(
                    app_transactions=[Transaction(app_id, 1)], max_commit_retries=20
                ),
            )
            return rows.rows
        except (CommitFailedError, DeltaError) as e:
            if attempt == COMMIT_ATTEMPTS or isinstance(e, SchemaMismatchError):
                raise
            commit_pause(attempt)
    raise AssertionError("unreachable")


def _grown(table: Any, rows: JobRows, uri: str, options: dict | None) -> Any:
    """The table with any column of the job it lacks added (a newer version's columns; old
    rows read null): a metadata commit of its own, which a retry finds already made. The
    job's rows are then written in the table's columns and types."""
    import pyarrow as pa
    from deltalake import DeltaTable, Field

    existing = pa.schema(table.schema().to_arrow()).names
    missing = [Field.from_arrow(f) for f in rows.schema if f.name not in existing]
    if not missing:
        return table
    table.alter.add_columns(missing)
    return DeltaTable(uri, storage_options=options)


def _add_actions(uri: str, rows: JobRows, schema: pa.Schema, partition: dict[str, str]) -> list:
    """The job's data files, written at the table's root under new names (no value from data
    in a path: the partition values live in the log), as Delta add actions."""
    import time
    import uuid

    import pyarrow as pa
    from deltalake.transaction import AddAction

    file_schema = pa.schema([f for f in schema if f.name not in partition])
    files = write_data_files(rows, uri, file_schema, stem=f"part-anogan-{uuid.uuid4().hex}")
    now_ms = int(time.time() * 1000)
    return [
        AddAction(
            posixpath.basename(f.uri), f.size, partition, now_ms, True,
            json.dumps({"numRecords": f.rows}),
        )
        for f in files
    ]  # fmt: skip


def _exists(uri: str, options: dict | None) -> bool:
    from deltalake import DeltaTable

    return DeltaTable.is_deltatable(uri, storage_options=options)


if __name__ == "__main__":  # the child of append_job_to_delta and write_published_ids
    try:
        work = {"append": _append_job, "ids": _published_ids}[sys.argv[1]]
        result = work(*sys.argv[2:])
    except Exception as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    print(json.dumps(result), flush=True)
    os._exit(0)
