"""A finished job's tables in a warehouse (may import job/'s layout, manifest and configs,
io/, errors, fields; job/'s runner calls it at the end of a job, `anogan-batch publish` too).

- `target`: WarehouseTarget, where the long-lived tables live (catalog, namespace, folder).
- `job_rows`: what both formats share: the tables, their order, the lineage columns, the
  `jobs` row, the streamed batches of a job's rows.
- `iceberg_tables`: `append_job_to_iceberg`, a job appended to long-lived Iceberg tables,
  exactly once; `write_published_ids` for --skip-published.
- `delta_tables`: `append_job_to_delta`, the same for long-lived Delta tables.
- `delta_in_place`: `commit_job_as_delta`, the job's own folder committed as Delta tables
  where it is (`--table-format delta`).
"""
