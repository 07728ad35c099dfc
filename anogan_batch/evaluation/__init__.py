"""Judging and measuring finished work (may import every layer below: job/, core/, ...).

- `evaluate`: AUROC / AUPRC, metrics.json. `report`: the HTML report. `demo`: the demo.
- `bench`: the performance benchmark; `scale`: the job at 1 M-10 M rows; `slide_bench`:
  a gigapixel slide's ingest; `volume_bench`: DICOM series and NIfTI volumes (and the DICOM
  generators the tests use); `quality`: the one-class MNIST protocol; `datasets`: MNIST IDX.
"""
