"""`--table-format delta`: a finished job's own folder committed as Delta tables, in place.

`parquet` (the default) is the job's own output: hive-partitioned Parquet that DuckDB, Spark,
Trino, Athena and pandas read as it is. `delta` turns each output table into a Delta Lake table
*in place*: the Parquet files the job wrote become the table's data files, and one commit in
`_delta_log/` adds them all. Nothing is copied or rewritten, and the commit is atomic: readers
see either no table or every row of the job. Publishing is idempotent (a table that already has
a log is left as it is), so a job that crashes after publishing and is rerun does not commit
twice.

Delta needs the `deltalake` package (`pip install 'anogan-batch[warehouse]'`). On S3, the
endpoint, region and retry policy come from `s3.object_store_options`.
"""

from __future__ import annotations

import os

from anogan_batch.errors import InputError
from anogan_batch.io import storage
from anogan_batch.job.layout import PARTITION_COLUMN, JobLayout

# table -> hive partition columns of its directory layout
TABLES = {
    JobLayout.PATCH_SCORES: (PARTITION_COLUMN,),
    JobLayout.SCAN_SCORES: (),
    JobLayout.QUARANTINE: (),
    JobLayout.HEATMAPS: (),
}


def commit_job_as_delta(out: str) -> dict[str, str]:
    """Commit each of OUT's tables as a Delta table in place; -> {table: uri} committed."""
    try:
        import deltalake  # noqa: F401
    except ImportError:
        raise InputError(
            "--table-format delta needs the deltalake package: "
            "pip install 'anogan-batch[warehouse]'"
        ) from None
    published = {}
    for table, partitions in TABLES.items():
        uri = storage.join(out, table)
        if not storage.list_files(uri, suffixes=(".parquet",)):
            continue  # e.g. no quarantine
        _convert_in_child(uri, partitions, table)
        published[table] = uri
    return published


def _convert_in_child(uri: str, partitions: tuple[str, ...], name: str) -> None:
    """Run the Delta conversion in a child process. deltalake's native runtime can abort the
    interpreter at exit ("terminate called without an active exception", seen when DuckDB was
    used in the same process); a child that leaves with os._exit keeps that away from the job."""
    import sys

    from anogan_batch.io.s3 import run_retried_child

    cmd = [sys.executable, "-m", "anogan_batch.warehouse.delta_in_place", uri, name, *partitions]
    r = run_retried_child(cmd)  # idempotent: a table that has its log is left as it is
    if r.returncode != 0:
        raise RuntimeError(f"Delta conversion of '{uri}' failed: {r.stderr.strip()[-2000:]}")


def _convert(uri: str, name: str, partitions: list[str]) -> None:
    from deltalake import Field, Schema, convert_to_deltalake

    from anogan_batch.io.s3 import object_store_options

    convert_to_deltalake(
        uri,
        mode="ignore",
        partition_by=Schema([Field(c, "string") for c in partitions]) if partitions else None,
        partition_strategy="hive" if partitions else None,
        name=name,
        storage_options=object_store_options(uri),
    )


if __name__ == "__main__":  # the child of _convert_in_child
    import sys

    try:
        _convert(sys.argv[1], sys.argv[2], sys.argv[3:])
    except Exception as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)
