"""What runs on Ray (may import core/, ingest/, io/, warehouse/, errors, fields).

- `score_config`: ScoreJobConfig, score's fields and flags. `ingest_config`: IngestConfig.
- `runner`: `run_score_job`, its phases and job.json.
- `pipeline`: `build_pipeline` (read -> PatchScorer actors), the sink, resume.
- `scorer`: PatchScorer / `score_table`, a batch of rows -> score rows; the device thread.
- `aggregate` and `heatmaps`: scan_scores, heat grids and overlays (one Ray group-by).
- `decisions`: p-values and FDR flags of a job. `ingest`: scans -> patch table, both phases.
- `manifest`: job.json and rerun rules. `layout`: every path under OUT.
- `raykit`: Ray connection and Ray's private internals (pinned). `progress`: the live line,
  telemetry, device-fault ledger. `autoscale`: asking for GPUs. `submit`: the Jobs API.

The warehouse (Iceberg, Delta) is warehouse/; the tables' columns are io/columns.py.
"""
