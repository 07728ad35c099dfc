"""The config of `anogan-batch score` (the Ray scoring job): its fields, defaults and flags,
the search's (core/search_config.py) and the warehouse target's (warehouse/target.py) within.

Light on purpose (no torch, numpy, pyarrow or Ray): the CLI reads these defaults for `--help`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from anogan_batch.core.devices import check_device
from anogan_batch.core.search_config import SearchConfig
from anogan_batch.errors import ConfigError
from anogan_batch.fields import check_choice, check_float, check_int, option
from anogan_batch.warehouse.target import WarehouseTarget

# how `score` leaves its tables: its own Parquet, Delta in place (warehouse/delta_in_place.py),
# or appended to long-lived Iceberg tables (warehouse/iceberg_tables.py)
TABLE_FORMATS = ("parquet", "delta", "iceberg")
# a job id names a partition folder (patch_scores/job_id=<id>), so it is a safe file name
JOB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
# --residual-maps: residual_map as float16 (compact: within 2^-11 of float32, relative; half
# the bytes), float32, or not at all (job/scorer.encode_maps)
RESIDUAL_MAPS = ("compact", "float32", "none")
# --batch-size auto: rows of an actor task on a GPU actor and on a CPU one
# (job/pipeline.auto_batch_size). A GPU searches 1,024 patches ~6x faster than 64
# (docs/performance.md), and a task of 64 would cost the driver 16x more tasks and progress
# calls; each GPU actor then searches as many at once as its GPU holds (job/scorer.py).
AUTO_BATCH_GPU, AUTO_BATCH_CPU = 1_024, 64


def parse_batch_size(value: str) -> int | None:
    """'auto' -> None (chosen per device: job/pipeline.auto_batch_size); '256' -> 256."""
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError("batch_size", value, "use a number of patches or auto") from None


def parse_actors(value: str) -> tuple[int, int]:
    """'4' -> (4, 4); '2-8' or '2:8' -> (2, 8) for an autoscaling pool."""
    parts = value.replace(":", "-").split("-")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ConfigError("actors", value, "use K or MIN-MAX, e.g. 4 or 2-8") from None
    if len(nums) == 1:
        return nums[0], nums[0]
    if len(nums) == 2:
        return nums[0], nums[1]
    raise ConfigError("actors", value, "use K or MIN-MAX, e.g. 4 or 2-8")


@dataclass(frozen=True)
class ScoreJobConfig:
    """Everything `anogan-batch score` takes. Defaults follow the paper and the local machine."""

    model_dir: str = option(help="trained model (anogan-batch train)", argument=True)
    patches: str = option(help="patch table to score", argument=True)
    out: str = option(help="job output folder (resumes a crashed job)", argument=True)
    search: SearchConfig = field(default_factory=SearchConfig)
    batch_size: int | None = option(
        None,
        "patches per actor task, or auto",
        default_text=f"auto: {AUTO_BATCH_GPU:,} on GPU actors (each actor then searches as "
        f"many at once as its GPU holds), {AUTO_BATCH_CPU} on CPU actors",
        parse=parse_batch_size,
    )
    actors: tuple[int, int] | None = option(
        None,
        "actor pool size K, or MIN-MAX to autoscale",
        default_text="one per node (CPU) or per GPU",
        parse=parse_actors,
    )
    gpus_per_actor: float | None = option(
        None, "GPUs per actor, may be < 1", default_text="1 when the cluster has GPUs, else 0"
    )
    cpus_per_actor: float | None = option(
        None,
        "CPUs (and torch threads) per actor",
        default_text="one 1-thread actor per core on CPU clusters, more threads where memory "
        "is short; 1 beside each GPU",
    )
    job_id: str | None = option(
        None, "the job's id (a partition of patch_scores)", default_text="a new one"
    )
    threshold: float | None = option(
        None, "count patches above it per scan (scan_scores.n_above_threshold)", default_text="none"
    )
    target_file_mb: float = option(128.0, "approximate size of each output Parquet file")
    device: str = option(
        "auto",
        "auto (a GPU per actor when the cluster has GPUs, else the CPU), cpu, or cuda (GPU "
        "actors required; an actor whose torch cannot use its GPU fails the job)",
    )
    gpu_wait_s: float = option(
        600.0,
        "seconds a job that wants GPUs (--device cuda, --gpus-per-actor) waits for the "
        "autoscaler when the cluster has none yet; then exit 1",
        name="--gpu-wait",
    )
    progress: bool = option(True, "show live progress")
    heatmaps: bool = option(True, "stitch per-scan heatmaps and PNG overlays after scoring")
    residual_maps: str = option(
        "compact",
        "residual_map stored as compact (float16: within 2^-11 of float32, half the bytes), "
        "float32, or none (with --no-heatmaps)",
    )
    table_format: str = option(
        "parquet",
        "parquet; delta (Delta Lake, in place; with --warehouse also appended to the long-lived "
        "Delta tables there); iceberg (appended to the catalog's long-lived tables); appends "
        "are exactly once",
    )
    # calibrated decisions (core/calibration.py)
    fpr: float | None = option(
        None,
        "flag patches with p_value <= FPR: the false-positive rate on normal patches (needs a "
        "calibrated model)",
        default_text="none: no patch flags",
    )
    fdr: float | None = option(
        None,
        "flag scans by Benjamini-Hochberg: expected share of normal scans among the flagged "
        "<= FDR (needs a calibrated model)",
        default_text="none: no scan flags",
    )
    # the long-lived tables a finished job is appended to: with --table-format iceberg, or
    # delta when a warehouse is named (warehouse/)
    published: WarehouseTarget = field(default_factory=WarehouseTarget)
    skip_published: bool = option(
        False,
        "score only patches whose (patch_id, model, search) the long-lived tables do not hold "
        "yet (needs --table-format iceberg, or delta with --warehouse); job.json counts the "
        "rest as skipped_rows",
    )

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
