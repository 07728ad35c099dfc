"""The DICOM series generators of the tests: the bench's own (evaluation/volume_bench.py)."""

from anogan_batch.evaluation.volume_bench import AXIAL, SAGITTAL, write_series, write_slice

__all__ = ["AXIAL", "SAGITTAL", "write_series", "write_slice"]
