"""Every table's columns: the one place a column's name is spelled, its type, and the column
subsets each table is read or written by (docs/schema.md is the users' description).

Other modules use these names, never the string: tests/test_columns.py holds every column to
one spelling. Light on purpose (pyarrow loads when a schema is first built).

Tables: the patch table (input; what ingest writes) and ingest's _scans beside it
(io/patches.SCANS_FILE), and a job's outputs under OUT: patch_scores, scan_scores, heatmaps
and quarantine (job/layout.JobLayout names their folders).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

# --- the patch table (docs/schema.md: "Patch table")
PATCH_ID = "patch_id"
SCAN_ID = "scan_id"
X, Y = "x", "y"  # the patch's top-left corner, level-0 pixels of its scan
IMAGE = "image"  # raw pixels, (HEIGHT, WIDTH, CHANNELS) of DTYPE (io/patches.py)
HEIGHT, WIDTH, CHANNELS = "height", "width", "channels"
DTYPE = "dtype"
LABEL = "label"
SLICE = "slice"  # a volume's slice; null for a 2-D scan or a slide
LEVEL = "level"  # the pyramid level read (ingest)
MPP = "mpp"  # µm per pixel read (ingest; null without a pixel size)

# --- patch_scores: the patch's own columns above, and
ANOMALY_SCORE = "anomaly_score"
RESIDUAL_SCORE = "residual_score"
DISCRIMINATION_SCORE = "discrimination_score"
RESIDUAL_MAP = "residual_map"
LATENT = "latent"
HEAT = "heat"
THUMB = "thumb"
SEARCH_STEPS = "search_steps"
P_VALUE = "p_value"
FLAGGED = "flagged"
JOB_ID = "job_id"  # also patch_scores' hive partition (job_id=<id>)
MODEL_ID = "model_id"
REASON = "reason"  # why a row is quarantined; null on a scored row

# --- scan_scores (and the first columns of heatmaps)
N_PATCHES = "n_patches"
MAX_SCORE = "max_score"
MEAN_SCORE = "mean_score"
P95_SCORE = "p95_score"
MIN_SCORE = "min_score"
STD_SCORE = "std_score"
N_ABOVE_THRESHOLD = "n_above_threshold"
MAX_PATCH_ID = "max_patch_id"
MAX_X, MAX_Y = "max_x", "max_y"
MAX_SLICE = "max_slice"

# --- heatmaps
HEAT_SLICE = "heat_slice"
CELL = "cell"
GRID_HEIGHT, GRID_WIDTH = "grid_height", "grid_width"
HEATMAP = "heatmap"
MAX_HEAT, MEAN_HEAT = "max_heat", "mean_heat"
OVERLAY = "overlay"
HEATMAP_SKIPPED = "heatmap_skipped"

# --- ingest's _scans table (io/patches.SCANS_FILE): a row a scan, a slice or an unreadable file
PATH = "path"  # the file, as listed
N_SKIPPED = "n_skipped"  # patches below --min-foreground
NORMALISATION = "normalisation"  # how values became stored pixels (JSON)
DOWNSAMPLE = "downsample"  # level-0 pixels per pixel read
SOURCE = "source"  # format, backend, levels, pyramid (JSON)
WARNING = "warning"  # why an asked resolution was not used

# --- the warehouse's lineage column (warehouse/job_rows.py)
JOB_STARTED_AT = "job_started_at"

# --- subsets
# a patch table needs these; the rest are optional (the model's shape and dtype are assumed)
REQUIRED_COLUMNS = (PATCH_ID, SCAN_ID, X, Y, IMAGE)
STRING_COLUMNS = (PATCH_ID, SCAN_ID, LABEL, DTYPE)
INT_COLUMNS = (X, Y, SLICE, HEIGHT, WIDTH, CHANNELS)
SHAPE_COLUMNS = (HEIGHT, WIDTH, CHANNELS)
# a quarantined row: where it came from and why
QUARANTINE_COLUMNS = (PATCH_ID, SCAN_ID, X, Y, LABEL, REASON, JOB_ID, MODEL_ID)
SUMMARY_COLUMNS = (
    SCAN_ID, N_PATCHES, MAX_SCORE, MEAN_SCORE, P95_SCORE, MIN_SCORE, STD_SCORE,
    N_ABOVE_THRESHOLD, MAX_PATCH_ID, MAX_X, MAX_Y, MAX_SLICE, LABEL, P_VALUE,
)  # fmt: skip
MAP_COLUMNS = (
    HEIGHT, WIDTH, HEAT_SLICE, CELL, GRID_HEIGHT, GRID_WIDTH, HEATMAP, MAX_HEAT, MEAN_HEAT,
    OVERLAY, HEATMAP_SKIPPED,
)  # fmt: skip
SCANS_COLUMNS = (
    PATH, SCAN_ID, LABEL, HEIGHT, WIDTH, CHANNELS, DTYPE, N_PATCHES, N_SKIPPED, NORMALISATION,
    REASON, LEVEL, DOWNSAMPLE, MPP, SOURCE, WARNING, SLICE,
)  # fmt: skip
# per patch, several KB: they stay in the job's own Parquet files (docs/warehouse.md)
ARRAY_COLUMNS = (RESIDUAL_MAP, LATENT, HEAT, THUMB)


@cache
def patch_schema() -> pa.Schema:
    """The patch table's columns (PATCH_SCHEMA in io/patches.py)."""
    import pyarrow as pa

    return pa.schema(
        [
            (PATCH_ID, pa.string()),
            (SCAN_ID, pa.string()),
            (X, pa.int32()),
            (Y, pa.int32()),
            (IMAGE, pa.binary()),
            (HEIGHT, pa.int32()),
            (WIDTH, pa.int32()),
            (CHANNELS, pa.int32()),
            (DTYPE, pa.string()),
            (LABEL, pa.string()),
        ]
    )


@cache
def ingest_schema() -> pa.Schema:
    """What ingest writes: the patch table, the slice, and how each row's scan was read (the
    level and the µm per pixel read; train and score ignore these)."""
    import pyarrow as pa

    extra = [pa.field(SLICE, pa.int32()), pa.field(LEVEL, pa.int32()), pa.field(MPP, pa.float64())]
    return pa.schema([*patch_schema(), *extra])


@cache
def scorer_schema() -> pa.Schema:
    """Rows leaving the scorer: patch_scores' columns plus REASON (null when scored)."""
    import pyarrow as pa

    return pa.schema(
        [
            (PATCH_ID, pa.string()),
            (SCAN_ID, pa.string()),
            (X, pa.int32()),
            (Y, pa.int32()),
            (SLICE, pa.int32()),
            (LABEL, pa.string()),
            (ANOMALY_SCORE, pa.float64()),
            (RESIDUAL_SCORE, pa.float64()),
            (DISCRIMINATION_SCORE, pa.float64()),
            (RESIDUAL_MAP, pa.binary()),  # float16/32 LE, (height, width, channels)
            (LATENT, pa.binary()),  # float32 LE, the final z (latent_dim,)
            # the patch's cells of a heat grid (job/heatmaps.py): float16 LE (G, G) residual
            # means, and uint8 (G, G, C) pixel means, G = side / core/calibration.heat_cell
            (HEAT, pa.binary()),
            (THUMB, pa.binary()),
            (SEARCH_STEPS, pa.int32()),  # steps the search took (fewer with early stopping)
            (P_VALUE, pa.float64()),  # conformal p-value; null without a calibration
            (FLAGGED, pa.bool_()),  # p_value <= --fpr; null without --fpr or a calibration
            (HEIGHT, pa.int32()),
            (WIDTH, pa.int32()),
            (CHANNELS, pa.int32()),
            (JOB_ID, pa.string()),
            (MODEL_ID, pa.string()),
            (REASON, pa.string()),
        ]
    )


@cache
def scan_schema(heatmaps: bool) -> pa.Schema:
    """The columns of OUT/scan_scores (and, with `heatmaps`, of OUT/heatmaps), typed once so
    that every file of the table has one schema whatever nulls its scans hold."""
    import pyarrow as pa

    summary = [
        (SCAN_ID, pa.string()),
        (N_PATCHES, pa.int64()),
        *(
            (name, pa.float64())
            for name in (MAX_SCORE, MEAN_SCORE, P95_SCORE, MIN_SCORE, STD_SCORE)
        ),
        (N_ABOVE_THRESHOLD, pa.int64()),
        (MAX_PATCH_ID, pa.string()),
        (MAX_X, pa.int32()),
        (MAX_Y, pa.int32()),
        (MAX_SLICE, pa.int32()),
        (LABEL, pa.string()),
        (P_VALUE, pa.float64()),
    ]
    maps = [
        (HEIGHT, pa.int32()),
        (WIDTH, pa.int32()),
        (HEAT_SLICE, pa.int32()),
        (CELL, pa.float64()),
        (GRID_HEIGHT, pa.int32()),
        (GRID_WIDTH, pa.int32()),
        (HEATMAP, pa.binary()),
        (MAX_HEAT, pa.float64()),
        (MEAN_HEAT, pa.float64()),
        (OVERLAY, pa.string()),
        (HEATMAP_SKIPPED, pa.string()),
    ]
    return pa.schema(summary + (maps if heatmaps else []))


def scans_schema(*extra: str) -> pa.Schema:
    """Ingest's _scans table (SCANS_COLUMNS), and `extra` string columns of its own."""
    import pyarrow as pa

    ints = (HEIGHT, WIDTH, CHANNELS, N_PATCHES, N_SKIPPED, LEVEL, SLICE)
    floats = (DOWNSAMPLE, MPP)

    def typed(name: str) -> pa.DataType:
        return pa.int64() if name in ints else pa.float64() if name in floats else pa.string()

    return pa.schema([(name, typed(name)) for name in (*SCANS_COLUMNS, *extra)])
