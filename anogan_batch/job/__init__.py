"""What runs on Ray (may import core/, ingest/, io/, errors, config).

- `configs`: ScoreJobConfig, IngestConfig. `runner`: `run_score_job`, its phases and job.json.
- `pipeline`: `build_pipeline` (read -> PatchScorer actors), the sink, resume.
- `scorer`: PatchScorer / `score_table`, a batch of rows -> score rows; the device thread.
- `aggregate` and `heatmaps`: scan_scores, heat grids and overlays (one Ray group-by).
- `decisions`: p-values and FDR flags of a job. `ingest`: scans -> patch table, both phases.
- `warehouse`, `delta_tables`, `iceberg`, `published`: the job's tables in Delta / Iceberg.
- `manifest`: job.json and rerun rules. `layout`: every path under OUT.
- `raykit`: Ray connection and Ray's private internals (pinned). `progress`: the live line,
  telemetry, device-fault ledger. `autoscale`: asking for GPUs. `submit`: the Jobs API.
"""
