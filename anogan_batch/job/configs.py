"""The typed configs of the two Ray jobs, `ingest` and `score`: the one owner of their
defaults (the CLI, the Python API, the bench and the demo take them from here).

Light on purpose (no torch, numpy, pyarrow or Ray): the CLI reads these defaults for `--help`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from anogan_batch.config import check_choice, check_float, check_int
from anogan_batch.core.configs import SearchConfig
from anogan_batch.core.devices import check_device
from anogan_batch.errors import ConfigError

if TYPE_CHECKING:
    from anogan_batch.io.readers import ReadOptions

# how `score` leaves its tables: its own Parquet, Delta in place (job/warehouse.py), or appended
# to long-lived Iceberg tables (job/iceberg.py)
TABLE_FORMATS = ("parquet", "delta", "iceberg")


@dataclass(frozen=True)
class WarehouseTarget:
    """Where the long-lived tables live. Iceberg: a pyiceberg catalog by name and a namespace;
    for the zero-configuration SQLite catalog (used when pyiceberg has no configuration for the
    name), the warehouse folder and the SQLite file. Delta: `<warehouse>/<namespace>/<table>`.
    Each table is named `<table_prefix><name>` (name: patch_scores, scan_scores, quarantine,
    jobs), so that several sets can share a namespace."""

    catalog: str = "anogan"
    namespace: str = "anogan"
    warehouse: str | None = None  # local folder or s3:// prefix
    catalog_db: str | None = None  # SQLite file; default <warehouse>/catalog.sqlite (local)
    table_prefix: str = ""

    def __post_init__(self) -> None:
        for name in ("catalog", "namespace"):
            value = getattr(self, name)
            if not value or not all(c.isalnum() or c in "_-" for c in value):
                raise ConfigError(name, value, "use letters, digits, '_' and '-'")
        prefix = self.table_prefix
        if len(prefix) > 64 or not all(c.isascii() and (c.isalnum() or c == "_") for c in prefix):
            raise ConfigError("table_prefix", prefix, "use at most 64 letters, digits and '_'")

    def table(self, name: str) -> str:
        """The name of one of the tables (job/published.py's TABLE_ORDER) in this target."""
        return self.table_prefix + name


ENGINES = ("auto", "local", "ray")
AUTO_RAY_FILES = 256  # `auto` uses Ray above this many files (or when RAY_ADDRESS is set)
AUTO_RAY_UNITS = 16  # ... or for this many work units of slides (ingest/plan.UNIT_PATCHES)
# Values decoded from one file at most (all its slices): 512 CT slices of 512 x 512. Sizes come
# from headers that anyone can write, so they are checked before anything is allocated.
MAX_PIXELS = 2**27


@dataclass(frozen=True)
class IngestConfig:
    patch_size: int
    stride: int | None = None  # None: the patch size (non-overlapping grid)
    label_from_parent: bool = False
    rows_per_file: int = 50_000  # target rows per output Parquet file
    slice_axis: int = 0
    window: tuple[float, float] | None = None  # (center, width), source units
    min_foreground: float = 0.0  # skip patches with less Otsu foreground than this
    engine: str = "auto"
    # values one read may hold: a whole file for formats read whole (a larger one is refused
    # before it is decoded), one region of a slide (a tile or strip larger is refused)
    max_pixels: int = MAX_PIXELS
    mpp: float | None = None  # µm per pixel to read slides at (ingest/levels.py)
    # the foreground mask --min-foreground decides on: "auto" (computed: io/readers.
    # masks.foreground_mask), or a folder of the user's masks, <scan_id>.png (nonzero = foreground)
    mask: str = "auto"
    level: int | None = None  # or the pyramid level to read

    def __post_init__(self) -> None:
        check_int("patch_size", self.patch_size, min_value=4)
        if self.stride is not None:
            check_int("stride", self.stride, min_value=1)
        check_int("rows_per_file", self.rows_per_file, min_value=1)
        check_choice("slice_axis", self.slice_axis, (-3, -2, -1, 0, 1, 2))
        check_float("min_foreground", self.min_foreground, low=0.0, high=1.0)
        check_choice("engine", self.engine, ENGINES)
        check_int("max_pixels", self.max_pixels, min_value=1)
        if self.mpp is not None:
            check_float("mpp", self.mpp, low=0.0, low_open=True)
        if self.level is not None:
            check_int("level", self.level, min_value=0)
        if self.mask != "auto" and not self.mask.strip():
            raise ConfigError("mask", self.mask, "use auto or a folder of <scan_id>.png masks")
        if self.mpp is not None and self.level is not None:
            raise ConfigError("level", self.level, "give --mpp or --level, not both")
        if self.window is not None:
            check_float("window center", self.window[0])
            check_float("window width", self.window[1], low=0.0, low_open=True)

    @property
    def step(self) -> int:
        return self.stride or self.patch_size

    @property
    def foreground_share(self) -> float:
        """The share of a patch inside the mask it needs: --min-foreground, or with the
        user's masks and no --min-foreground, half."""
        if self.mask != "auto" and self.min_foreground == 0:
            return 0.5
        return self.min_foreground

    @property
    def read_options(self) -> ReadOptions:
        from anogan_batch.io.readers import ReadOptions

        return ReadOptions(
            slice_axis=self.slice_axis, window=self.window, max_pixels=self.max_pixels
        )

    @property
    def max_file_bytes(self) -> int:
        """Largest file read: its pixels as float64 plus room for headers and metadata."""
        return 8 * self.max_pixels + 2**24


# a job id names a partition folder (patch_scores/job_id=<id>), so it is a safe file name
JOB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


# --residual-maps: residual_map as float16 (compact: within 2^-11 of float32, relative; half
# the bytes), float32, or not at all (job/scorer.encode_maps)
RESIDUAL_MAPS = ("compact", "float32", "none")


@dataclass(frozen=True)
class ScoreJobConfig:
    """Everything `anogan-batch score` takes. Defaults follow the paper and the local machine."""

    model_dir: str
    patches: str
    out: str
    search: SearchConfig = field(default_factory=SearchConfig)
    batch_size: int | None = None  # rows an actor task scores; None: by device (auto)
    actors: tuple[int, int] | None = None  # (min, max) pool size; None: one per node / GPU
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float | None = None  # None: derived from the cluster (see plan_resources)
    job_id: str | None = None
    threshold: float | None = None  # counts patches above it in scan_scores
    target_file_mb: float = 128.0  # approximate size of each output Parquet file
    # auto: CUDA when the cluster has GPUs (one per actor), else the CPU; cuda: GPUs required
    device: str = "auto"
    gpu_wait_s: float = 600.0  # how long a job that wants GPUs waits for the autoscaler
    progress: bool = True
    heatmaps: bool = True  # stitch per-scan heatmaps and PNG overlays after scoring
    residual_maps: str = "compact"  # how residual_map is stored: RESIDUAL_MAPS
    table_format: str = "parquet"  # or "delta": the output tables committed as Delta Lake
    # calibrated decisions (core/calibration.py): patches flagged at p_value <= fpr (the
    # false-positive rate on normal patches), scans by Benjamini-Hochberg at FDR fdr
    fpr: float | None = None
    fdr: float | None = None
    # the long-lived tables a finished job is appended to: with --table-format iceberg, or
    # delta when a warehouse is named (job/iceberg.py, job/delta_tables.py)
    published: WarehouseTarget = field(default_factory=WarehouseTarget)
    # score only the patches whose (patch_id, model, search) those tables do not hold yet
    skip_published: bool = False

    def __post_init__(self) -> None:
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, min_value=1)
        if self.actors is not None:
            lo, hi = self.actors
            check_int("actors", lo, min_value=1)
            check_int("actors", hi, min_value=lo)
        if self.gpus_per_actor is not None:
            check_float("gpus_per_actor", self.gpus_per_actor, low=0.0)
        if self.cpus_per_actor is not None:
            check_float("cpus_per_actor", self.cpus_per_actor, low=0.0, low_open=True)
        if self.threshold is not None:
            check_float("threshold", self.threshold)
        for name in ("fpr", "fdr"):
            if getattr(self, name) is not None:
                check_float(name, getattr(self, name), low=0.0, high=1.0, low_open=True)
        check_float("target_file_mb", self.target_file_mb, low=0.0, low_open=True)
        if self.job_id is not None and not JOB_ID.fullmatch(self.job_id):
            raise ConfigError(
                "job_id", self.job_id, "use 1-128 letters, digits, '.', '_' or '-', not first '.'"
            )
        check_choice("table_format", self.table_format, TABLE_FORMATS)
        check_device(self.device)
        check_choice("residual_maps", self.residual_maps, RESIDUAL_MAPS)
        if self.residual_maps == "none" and self.heatmaps:
            raise ConfigError("residual_maps", "none", "heatmaps are built from the maps: add "
                              "--no-heatmaps")  # fmt: skip
        check_float("gpu_wait_s", self.gpu_wait_s, low=0.0)
        if self.device == "cpu" and self.gpus_per_actor:
            raise ConfigError("gpus_per_actor", self.gpus_per_actor, "--device cpu uses no GPU")
        if self.skip_published and self.publishes_to is None:
            raise ConfigError(
                "skip_published",
                True,
                "needs the tables it reads: --table-format iceberg, or delta with --warehouse",
            )

    @property
    def publishes_to(self) -> str | None:
        """The long-lived tables a finished job is appended to: "iceberg", "delta" or None."""
        if self.table_format == "iceberg":
            return "iceberg"
        if self.table_format == "delta" and self.published.warehouse is not None:
            return "delta"
        return None
