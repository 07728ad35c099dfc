"""Publishing finished jobs into long-lived Apache Iceberg tables (docs/warehouse.md).

Every job appends to the same four tables of one namespace: `patch_scores`, `scan_scores`,
`quarantine` and `jobs` (one row per job: its lineage). The catalog is any catalog pyiceberg
supports, configured the pyiceberg way (`~/.pyiceberg.yaml` or `PYICEBERG_CATALOG__<NAME>__*`
variables) and named by `catalog`; when no such configuration exists, a zero-configuration SQL
catalog on a local SQLite file with a warehouse folder (local or `s3://`).

Exactly once: each append carries the job's id in its snapshot summary (`anogan.job_id`), and
a table whose history already holds that id is skipped, so publishing a job again (a rerun
after a crash between two tables, a second `publish`) adds nothing. Iceberg commits one table
at a time, so the order is fixed: `patch_scores`, `scan_scores`, `quarantine`, then `jobs`; a
job is complete in the warehouse once its `jobs` row exists, and readers that must never see
half a job join on it. A commit that loses a race with another job's is retried on the
refreshed table. Columns a newer version adds are added to the table schema (old rows read
null); columns a table has and a job lacks are written as null.

The big payloads stay out of these tables: `residual_map` and `latent` (several KB a patch)
remain in the job's own Parquet files under `jobs.out`, keyed by `patch_id`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from anogan_batch.errors import ConfigError, InputError
from anogan_batch.io.columns import JOB_ID, MODEL_ID, PATCH_ID
from anogan_batch.io.s3 import S3RetryPolicy
from anogan_batch.job.layout import JobLayout
from anogan_batch.warehouse.job_rows import (
    COMMIT_ATTEMPTS,
    JOBS,
    PARTITION_DAY,
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

log = logging.getLogger(__name__)

JOB_ID_PROPERTY = "anogan.job_id"  # in each append's snapshot summary: the exactly-once key
# pyiceberg retries a conflicting append by rebasing it onto the new snapshot, past the
# exactly-once check; with its retries off the conflict reaches _append_once, which checks again
NO_REBASE = {"commit.retry.num-retries": "0"}


def load_catalog(target: WarehouseTarget) -> Any:
    """The pyiceberg catalog `target.catalog`: configured, or the zero-configuration one."""
    try:
        from pyiceberg.catalog import load_catalog as pyiceberg_load
        from pyiceberg.utils.config import Config
    except ImportError:
        raise InputError(
            "Iceberg needs the pyiceberg package: pip install 'anogan-batch[warehouse]'"
        ) from None
    configured = Config().get_catalog_config(target.catalog)
    if configured:  # the S3 policy unless the catalog's configuration has its own
        policy = S3RetryPolicy.from_env().pyiceberg()
        return pyiceberg_load(
            target.catalog, **{k: v for k, v in policy.items() if k not in configured}
        )
    if target.warehouse is None:
        raise ConfigError(
            "--warehouse",
            None,
            f"catalog {target.catalog!r} is not configured for pyiceberg (~/.pyiceberg.yaml or "
            f"PYICEBERG_CATALOG__{target.catalog.upper()}__URI); give --warehouse for the "
            "zero-configuration SQLite catalog",
        )
    return _open_sqlite(target.catalog, _sqlite_properties(target))


def _open_sqlite(name: str, props: dict[str, str]) -> Any:
    """The SQL catalog on SQLite. It creates its own tables on first use; two processes that
    open a new catalog at once race on that (one finds the other's table), so that is retried."""
    from pyiceberg.catalog import load_catalog as pyiceberg_load
    from sqlalchemy.exc import OperationalError

    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            return pyiceberg_load(name, **props)
        except OperationalError as e:
            if attempt == COMMIT_ATTEMPTS or "already exists" not in str(e):
                raise
            commit_pause(attempt)
    raise AssertionError("unreachable")


def _sqlite_properties(target: WarehouseTarget) -> dict[str, str]:
    import os

    from anogan_batch.io.s3 import is_s3, s3_endpoint, s3_region

    warehouse = target.warehouse.rstrip("/")
    db = target.catalog_db
    if db is None:
        if is_s3(warehouse):
            raise ConfigError("--catalog-db", None, "a local SQLite file for an s3:// warehouse")
        db = os.path.join(warehouse, "catalog.sqlite")
    db = os.path.abspath(db)
    os.makedirs(os.path.dirname(db), exist_ok=True)
    props = {"type": "sql", "uri": f"sqlite:///{db}", "init_catalog_tables": "true"}
    if is_s3(warehouse):
        props |= S3RetryPolicy.from_env().pyiceberg()
        props["warehouse"] = warehouse
        props["s3.region"] = s3_region()
        if s3_endpoint():
            props["s3.endpoint"] = s3_endpoint()
    else:
        os.makedirs(warehouse, exist_ok=True)
        props["warehouse"] = "file://" + os.path.abspath(warehouse)
    return props


def append_job_to_iceberg(out: str, target: WarehouseTarget) -> dict[str, Any]:
    """Append the finished job in OUT to the Iceberg tables of `target`, exactly once.
    -> {table: rows appended, or "already published"}."""
    manifest = finished_job(out)
    catalog = load_catalog(target)
    _ensure_namespace(catalog, target.namespace)
    done: dict[str, Any] = {}
    for name in TABLE_ORDER:
        rows = job_rows(out, manifest, name)
        if rows is None:
            continue
        identifier = f"{target.namespace}.{target.table(name)}"
        done[name] = _append_once(catalog, identifier, rows, manifest.job_id)
    return done


def _ensure_namespace(catalog: Any, namespace: str) -> None:
    """Create the namespace when missing. Two first publishes at once race on it, and the SQL
    catalog reports the loser's insert as an integrity error, not as "already exists"."""
    try:
        catalog.create_namespace_if_not_exists(namespace)
    except Exception:
        if not catalog.namespace_exists(namespace):
            raise


def _append_once(catalog: Any, identifier: str, rows: JobRows, job_id: str) -> Any:
    """Append `rows` to the table (created when missing) unless the job is in its history;
    a commit that lost a race is retried on the refreshed table."""
    from pyiceberg.exceptions import CommitFailedException

    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        table = _table_for(catalog, identifier, rows.schema)
        if _published(table, job_id):
            return "already published"
        try:
            _append_streamed(table, rows, job_id)
            return rows.rows
        except CommitFailedException as e:
            if attempt == COMMIT_ATTEMPTS:
                raise
            log.info("%s: commit conflict, retrying (%d): %s", identifier, attempt, e)
            commit_pause(attempt)
    raise AssertionError("unreachable")


def _append_streamed(table: Any, rows: JobRows, job_id: str) -> None:
    """One append snapshot (one commit) of data files written a batch at a time.

    pyiceberg's `append` takes a whole table in memory, or a stream for unpartitioned tables
    only (apache/iceberg-python#2152), and fed chunk by chunk it held several at once. So the
    files are written here (`published.write_data_files`, in the table's columns without
    Iceberg's field ids, under the table's data folder) and added by `add_files`, which
    reads their footers: each holds one job, so one day and one model, its partition."""
    import uuid

    schema = _without_ids(table.schema().as_arrow())
    folder = _storage_uri(f"{table.location()}/data")
    files = write_data_files(rows, folder, schema, stem=f"anogan-{uuid.uuid4().hex}")
    with table.transaction() as tx:
        tx.add_files(
            [_iceberg_uri(f.uri) for f in files],
            snapshot_properties={JOB_ID_PROPERTY: job_id},
            check_duplicate_files=False,  # new names; the check would read every manifest
        )


def _without_ids(schema: pa.Schema) -> pa.Schema:
    """An Arrow schema without field metadata: `add_files` refuses files with field ids."""
    import pyarrow as pa

    return pa.schema([f.remove_metadata() for f in schema])


def _storage_uri(location: str) -> str:
    """A table location (file:// or s3://) as a path of io/storage."""
    return location.removeprefix("file://")


def _iceberg_uri(path: str) -> str:
    """A path of io/storage as pyiceberg names files (file:// for local ones)."""
    return path if "://" in path else "file://" + path


def _table_for(catalog: Any, identifier: str, schema: pa.Schema) -> Any:
    """The table, created with `schema` (and its partitioning) when missing, its schema grown
    by any column of `schema` it lacks."""
    from pyiceberg.exceptions import CommitFailedException

    table = catalog.create_table_if_not_exists(identifier, schema=schema, properties=NO_REBASE)
    if any(table.properties.get(k) != v for k, v in NO_REBASE.items()):  # made by someone else
        try:
            with table.transaction() as tx:
                tx.set_properties(NO_REBASE)
        except CommitFailedException:
            pass  # another writer set them first, or grew the table: reloaded below
        table = catalog.load_table(identifier)
    if not table.spec().fields:
        _partition(table)
        table = catalog.load_table(identifier)
    missing = [f for f in schema if f.name not in {c.name for c in table.schema().fields}]
    if missing:
        try:
            with table.update_schema() as update:
                update.union_by_name(schema)
        except CommitFailedException:
            pass  # another writer grew it first: the reload below sees its schema
        table = catalog.load_table(identifier)
    return table


def _partition(table: Any) -> None:
    """By day of the job and by model: the two axes of the questions users ask."""
    from pyiceberg.exceptions import CommitFailedException
    from pyiceberg.transforms import DayTransform, IdentityTransform

    names = {f.name for f in table.schema().fields}
    axes = ((PARTITION_DAY, DayTransform()), (PARTITION_MODEL, IdentityTransform()))
    wanted = [(column, transform) for column, transform in axes if column in names]
    if not wanted:
        return
    try:
        with table.update_spec() as spec:
            for column, transform in wanted:
                spec.add_field(column, transform, f"{column}_{transform}".replace("()", ""))
    except (CommitFailedException, ValueError):
        pass  # another writer partitioned it first


def _published(table: Any, job_id: str) -> bool:
    for snapshot in table.metadata.snapshots:
        summary = snapshot.summary
        if summary is not None and summary.additional_properties.get(JOB_ID_PROPERTY) == job_id:
            return True
    return False


def write_published_ids(target: WarehouseTarget, params: dict[str, Any], dest: str) -> int:
    """Write the patch_ids that `patch_scores` holds for this model and search (jobs with the
    same `model_id` and SEARCH_KEYS) as Parquet files under `dest`, streamed a batch at a
    time so that memory stays bounded. -> how many ids (0: nothing published yet)."""
    from pyiceberg.expressions import EqualTo, In

    from anogan_batch.io import storage

    catalog = load_catalog(target)
    tables = {n: f"{target.namespace}.{target.table(n)}" for n in (JOBS, JobLayout.PATCH_SCORES)}
    storage.delete(dest)
    if not all(catalog.table_exists(t) for t in tables.values()):
        return 0
    jobs = (
        catalog.load_table(tables[JOBS])
        .scan(row_filter=EqualTo(MODEL_ID, params[MODEL_ID]), selected_fields=(JOB_ID, "params"))
        .to_arrow()
    )
    same = same_search_jobs(jobs, params)
    if not same:
        return 0
    scan = catalog.load_table(tables[JobLayout.PATCH_SCORES]).scan(
        row_filter=In(JOB_ID, same), selected_fields=(PATCH_ID,)
    )
    return write_id_files(scan.to_arrow_batch_reader(), dest)
