"""The distributed scoring job on Ray Data.

    read_parquet(PATCHES) -> [checkpoint filter] -> map_batches(PatchScorer, ActorPoolStrategy)
        -> JobSink: OUT/patch_scores/job_id=<id>/*.parquet and OUT/quarantine/*.parquet
    then scan_scores (a Ray groupby; in the driver for small jobs), row counts from Parquet
    footers, job.json.

Exactly-once across crashes rests on Ray Data's checkpointing (`DataContext.checkpoint_config`,
id column `patch_id`, under OUT/_checkpoint): a write task records the ids it is about to write
in a pending checkpoint, writes its data files, then commits the checkpoint. A rerun deletes the
data files of uncommitted (pending) checkpoints and skips every committed id at read time.
Ray's own clean-up only looks in one data folder; our sink writes two (patch_scores and
quarantine), so `recover_pending` does that clean-up for both before Ray starts.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from anogan_batch.config import check_choice, check_float, check_int
from anogan_batch.core.search import SearchConfig
from anogan_batch.errors import ConfigError, InputError
from anogan_batch.io import storage

log = logging.getLogger(__name__)

IO_CPUS = 0.5  # logical CPUs of read/write/aggregate tasks: light work, must never starve
INPUT_COLUMNS = (
    "patch_id",
    "scan_id",
    "x",
    "y",
    "image",
    "height",
    "width",
    "channels",
    "dtype",
    "label",
)
QUARANTINE_COLUMNS = ("patch_id", "scan_id", "x", "y", "label", "reason", "job_id", "model_id")
PARTITION_COLUMN = "job_id"
CHECKPOINT_DIR = "_checkpoint"
# a job id names a partition folder (patch_scores/job_id=<id>), so it is a safe file name
JOB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class ScoreJobConfig:
    """Everything `anogan-batch score` takes. Defaults follow the paper and the local machine."""

    model_dir: str
    patches: str
    out: str
    search: SearchConfig = field(default_factory=SearchConfig)
    batch_size: int = 64
    actors: tuple[int, int] | None = None  # (min, max) pool size; None: one per node / GPU
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float | None = None  # None: derived from the cluster (see plan_resources)
    job_id: str | None = None
    threshold: float | None = None  # counts patches above it in scan_scores
    target_file_mb: float = 128.0  # approximate size of each output Parquet file
    device: str | None = None  # None: CUDA when the actor has a GPU, else CPU
    progress: bool = True
    heatmaps: bool = True  # stitch per-scan heatmaps and PNG overlays after scoring
    table_format: str = "parquet"  # or "delta": the output tables committed as Delta Lake

    def __post_init__(self) -> None:
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
        check_float("target_file_mb", self.target_file_mb, low=0.0, low_open=True)
        if self.job_id is not None and not JOB_ID.fullmatch(self.job_id):
            raise ConfigError(
                "job_id", self.job_id, "use 1-128 letters, digits, '.', '_' or '-', not first '.'"
            )
        from anogan_batch.job.warehouse import TABLE_FORMATS

        check_choice("table_format", self.table_format, TABLE_FORMATS)


@dataclass(frozen=True)
class Resources:
    min_actors: int
    max_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int  # torch threads per actor


IO_RESERVE_CPUS = 2.0  # per node, left to reads, writes and Ray Data's checkpoint filter actor
# Sizing estimate for CPU actors: an actor scoring the default 64x64 model at batch 64 peaks
# at 0.8 GiB RSS (torch, Ray Data and the search's activations; `anogan-batch bench`).
ACTOR_MEMORY_BYTES = 2**30


def plan_resources(
    cfg: ScoreJobConfig,
    cluster: dict[str, float],
    nodes: list[dict],
    todo_rows: int | None = None,
) -> Resources:
    """Actor pool sizing. GPU clusters: one actor per `gpus_per_actor` GPUs. CPU clusters: every
    core but two per node (left to the I/O tasks) scores, one single-threaded actor per core,
    or fewer actors with more threads each where the node's memory cannot hold one per core:
    on 2 cores, two 1-thread actors score 7-20 % more patches/s than one 2-thread actor
    (docs/performance.md). Explicit flags always win; `--actors K` alone splits each node's
    cores between its share of the K actors. A pool never outnumbers the job's batches
    (`todo_rows`): an actor without a batch would only cost its start-up."""
    total_gpu = cluster.get("GPU", 0.0)
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if total_gpu else 0.0)
    if gpus > 0 and gpus > total_gpu:
        raise InputError(f"--gpus-per-actor {gpus} but the Ray cluster has {total_gpu:g} GPUs")
    if cfg.cpus_per_actor is not None:
        cpus = cfg.cpus_per_actor
    elif gpus > 0:
        cpus = 1.0
    elif cfg.actors is not None:
        cpu_nodes = [_cpus(n) for n in nodes if _cpus(n) >= 1]  # not a CPU-less head node
        per_node = max(1, math.ceil(cfg.actors[1] / max(1, len(cpu_nodes))))
        cpus = max(1.0, math.floor((min(cpu_nodes, default=1.0) - IO_RESERVE_CPUS) / per_node))
    else:
        cpus = float(max((_threads_that_fit(n) for n in nodes), default=1))
    if cfg.actors is not None:
        lo, hi = cfg.actors
    elif gpus > 0:
        lo = hi = max(1, int(total_gpu / gpus))
    else:
        lo = hi = max(1, sum(_cpu_actor_slots(n, cpus) for n in nodes))
    if todo_rows is not None:
        batches = max(1, math.ceil(todo_rows / cfg.batch_size))
        lo, hi = min(lo, batches), min(hi, batches)
    return Resources(lo, hi, cpus, gpus, threads=max(1, math.ceil(cpus)))


def _cpus(node: dict) -> float:
    return node.get("Resources", {}).get("CPU", 0.0)


def _cpu_actor_slots(node: dict, cpus: float) -> int:
    """CPU actors of `cpus` cores each for a node: its cores beside the I/O reserve, and at
    least one on any node that has a core (a 2-core node still scores)."""
    if _cpus(node) < 1:
        return 0  # e.g. a head node started with --num-cpus 0
    return max(1, int(max(0.0, _cpus(node) - IO_RESERVE_CPUS) // cpus))


def _threads_that_fit(node: dict) -> int:
    """Fewest threads per actor at which a node's actors fit in its memory."""
    memory = node.get("Resources", {}).get("memory")
    threads = 1
    while (
        memory
        and threads < _cpus(node)
        and (_cpu_actor_slots(node, threads) * ACTOR_MEMORY_BYTES > memory)
    ):
        threads += 1
    return threads


def connect_ray() -> None:
    """Join the cluster at RAY_ADDRESS, or start a local one sized for this machine.

    A local cluster advertises two logical CPUs more than the machine has: the scoring actor
    holds the real cores, and the light I/O tasks (and Ray Data's checkpoint filter actor,
    which always asks for one CPU) must still be schedulable, or a 2-core machine hangs.
    """
    import ray

    if ray.is_initialized():
        return
    # Token auth stays on (Ray's default); its one-line notice is not news to our users.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # address="local": always a fresh cluster, never one left running by someone else
        ray.init(
            address="local", num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False, **kwargs
        )


def quiet_ray_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # Our own progress line replaces Ray Data's per-operator bars and their log spam.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # One retry policy for S3, ours (s3.py), not Ray's on top of it: Ray's own I/O retry
    # (10 tries, backoff to 32 s, on top of the SDK's) would stretch a dead endpoint's
    # failure to many minutes.
    ctx.retried_io_errors = []
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def make_sink(out: str, rows_per_file: int):
    """A Parquet sink writing scored rows and quarantined rows to their two tables."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME
    from ray.data.datasource import BlockBasedFileDatasink
    from ray.data.datasource.filename_provider import _split_base_and_ext

    class JobSink(BlockBasedFileDatasink):
        # Subclassing Ray's file sink keeps Ray's two-phase checkpoint commit: the pending
        # checkpoint's name is this task's base file name, which both our tables share.
        def write_block(self, block, block_index, ctx) -> None:
            table = block.to_arrow()
            name = self.filename_provider.get_filename_for_task(
                ctx.kwargs[WRITE_UUID_KWARG_NAME], ctx.task_idx
            )
            base, _ = _split_base_and_ext(name)
            is_bad = pc.is_valid(table.column("reason"))
            scored = table.filter(pc.invert(is_bad)).drop_columns(["reason"])
            bad = table.filter(is_bad).select(list(QUARANTINE_COLUMNS))
            if scored.num_rows:
                pads.write_dataset(
                    scored,
                    base_dir=posixpath.join(self.path, "patch_scores"),
                    filesystem=self.filesystem,
                    format="parquet",
                    partitioning=[PARTITION_COLUMN],
                    partitioning_flavor="hive",
                    basename_template=f"{base}-{{i}}.parquet",
                    existing_data_behavior="overwrite_or_ignore",
                    file_options=pads.ParquetFileFormat().make_write_options(compression="zstd"),
                )
            if bad.num_rows:
                qdir = posixpath.join(self.path, "quarantine")
                self.filesystem.create_dir(qdir, recursive=True)
                with self.filesystem.open_output_stream(f"{qdir}/{base}.parquet") as f:
                    pq.write_table(bad, f, compression="zstd")

        def on_write_complete(self, write_result) -> None:
            pass  # never remove OUT, even when a resumed run writes no rows

    fs, inner = storage.filesystem_for(out)
    return JobSink(inner, filesystem=fs, min_rows_per_file=rows_per_file, file_format="parquet")


def recover_pending(out: str) -> int:
    """Delete data files of uncommitted writes (pending checkpoints); return how many."""
    ckpt = storage.join(out, CHECKPOINT_DIR)
    if not storage.exists(ckpt) and not storage.is_dir(ckpt):
        return 0
    fs, inner = storage.filesystem_for(ckpt)
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))
    pending = [f for f in infos if f.path.endswith(".pending.parquet")]
    if not pending:
        return 0
    bases = tuple(posixpath.basename(f.path)[: -len(".pending.parquet")] for f in pending)
    for table in ("patch_scores", "quarantine"):
        root = storage.filesystem_for(storage.join(out, table))[1]
        sel = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        for f in fs.get_file_info(sel):
            if f.type == pafs.FileType.File and posixpath.basename(f.path).startswith(bases):
                fs.delete_file(f.path)
    for f in pending:
        fs.delete_file(f.path)
    return len(pending)


def build_pipeline(
    cfg: ScoreJobConfig,
    res: Resources,
    job_id: str,
    model_id: str,
    columns: tuple[str, ...],
    progress=None,
):
    """read_parquet -> map_batches(PatchScorer) on an actor pool; the caller writes it.
    `columns`: the patch table's, over all its files (a file without one reads it as null)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from anogan_batch.job.scorer import PatchScorer

    fs, inner = storage.filesystem_for(cfg.patches)
    ds = ray.data.read_parquet(
        inner,
        filesystem=fs,
        columns=[c for c in INPUT_COLUMNS if c in columns],
        num_cpus=IO_CPUS,
        file_extensions=["parquet", "parq", "pq"],
    )
    # Blocks of one batch each: an actor task is then one search, so progress, failures and
    # retries are per batch, and a file's worth of rows is committed as soon as it is scored
    # (without this, Ray hands an actor a whole read block, often a whole file).
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    return ds.map_batches(
        PatchScorer,
        fn_constructor_kwargs={
            "model_dir": cfg.model_dir,
            "search": cfg.search,
            "job_id": job_id,
            "model_id": model_id,
            "device": cfg.device,
            "threads": res.threads,
            "progress": progress,
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
        num_cpus=res.cpus_per_actor,
        num_gpus=res.gpus_per_actor,
    )
