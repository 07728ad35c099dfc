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
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING

from anogan_batch.errors import InputError
from anogan_batch.io import storage
from anogan_batch.io.columns import JOB_ID, PATCH_ID, QUARANTINE_COLUMNS, REASON, SLICE
from anogan_batch.io.patches import PATCH_SCHEMA
from anogan_batch.io.tables import ray_read_parquet
from anogan_batch.job.layout import PARTITION_COLUMN, JobLayout
from anogan_batch.job.raykit import pending_bases, task_file_base
from anogan_batch.job.score_config import AUTO_BATCH_CPU, AUTO_BATCH_GPU, ScoreJobConfig

if TYPE_CHECKING:
    from anogan_batch.core.modeldir import ModelCard

log = logging.getLogger(__name__)

IO_CPUS = 0.5  # logical CPUs of read/write/aggregate tasks: light work, must never starve
# Rows of an output row group, in MB of row bytes (a file holds --target-file-mb): a reader
# holds one at a time, and every reader plans from the footers, whose size grows with the
# number of row groups (one per scored batch made a 10 M-row job's footers hundreds of MB)
ROW_GROUP_MB = 64.0


@dataclass(frozen=True)
class Resources:
    min_actors: int
    max_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int  # torch threads per actor


IO_RESERVE_CPUS = 2.0  # per node, left to reads, writes and Ray Data's checkpoint filter actor
# Sizing estimate for CPU actors: above the peak RSS `anogan-batch bench` measures for an
# actor scoring the default 64x64 model at batch 64 (docs/performance.md).
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
    one-thread actors score more patches/s than fewer multi-thread ones
    (docs/performance.md). Explicit flags always win; `--actors K` alone splits each node's
    cores between its share of the K actors. A pool never outnumbers the job's batches
    (`todo_rows`): an actor without a batch would only cost its start-up."""
    total_gpu = cluster.get("GPU", 0.0)
    gpus = gpus_per_actor(cfg, total_gpu)
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
        batches = max(1, math.ceil(todo_rows / auto_batch_size(cfg, gpus)))
        lo, hi = min(lo, batches), min(hi, batches)
    return Resources(lo, hi, cpus, gpus, threads=max(1, math.ceil(cpus)))


def gpus_per_actor(cfg: ScoreJobConfig, cluster_gpus: float) -> float:
    """GPUs of one scoring actor: --gpus-per-actor; else none with --device cpu, one with
    --device cuda, and with auto one when the cluster has GPUs."""
    if cfg.device == "cpu":
        return 0.0
    if cfg.gpus_per_actor is not None:
        return cfg.gpus_per_actor
    return 1.0 if cfg.device.startswith("cuda") or cluster_gpus else 0.0


def auto_batch_size(cfg: ScoreJobConfig, gpus: float) -> int:
    """--batch-size, or auto's choice for actors of `gpus` GPUs each."""
    if cfg.batch_size is not None:
        return cfg.batch_size
    return AUTO_BATCH_GPU if gpus > 0 else AUTO_BATCH_CPU


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


def make_sink(out: str, rows_per_file: int, rows_per_group: int):
    """A Parquet sink writing scored rows and quarantined rows to their two tables, a write
    task's rows (about `rows_per_file`) in row groups of `rows_per_group` at most."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    from ray.data.datasource import BlockBasedFileDatasink

    class JobSink(BlockBasedFileDatasink):
        # Subclassing Ray's file sink keeps Ray's two-phase checkpoint commit: the pending
        # checkpoint's name is this task's base file name, which both our tables share.
        def write_block(self, block, block_index, ctx) -> None:
            table = block.to_arrow()
            base = task_file_base(self, ctx)
            is_bad = pc.is_valid(table.column(REASON))
            scored = table.filter(pc.invert(is_bad)).drop_columns([REASON])
            bad = table.filter(is_bad).select(list(QUARANTINE_COLUMNS))
            if scored.num_rows:
                pads.write_dataset(
                    scored,
                    base_dir=posixpath.join(self.path, JobLayout.PATCH_SCORES),
                    filesystem=self.filesystem,
                    format="parquet",
                    partitioning=[PARTITION_COLUMN],
                    partitioning_flavor="hive",
                    basename_template=f"{base}-{{i}}.parquet",
                    existing_data_behavior="overwrite_or_ignore",
                    # the task's rows arrive as one chunk per scored batch: without a
                    # minimum, each chunk would be a row group of its own
                    min_rows_per_group=min(rows_per_group, scored.num_rows),
                    max_rows_per_group=rows_per_group,
                    file_options=pads.ParquetFileFormat().make_write_options(compression="zstd"),
                )
            if bad.num_rows:
                qdir = posixpath.join(self.path, JobLayout.QUARANTINE)
                self.filesystem.create_dir(qdir, recursive=True)
                with self.filesystem.open_output_stream(f"{qdir}/{base}.parquet") as f:
                    pq.write_table(bad, f, compression="zstd", row_group_size=rows_per_group)

        def on_write_complete(self, write_result) -> None:
            pass  # never remove OUT, even when a resumed run writes no rows

    fs, inner = storage.filesystem_for(out)
    return JobSink(inner, filesystem=fs, min_rows_per_file=rows_per_file, file_format="parquet")


def recover_pending(out: str) -> int:
    """Delete data files of uncommitted writes (pending checkpoints); return how many."""
    import pyarrow.fs as pafs

    layout = JobLayout(out)
    fs, checkpoint = storage.filesystem_for(layout.checkpoint)
    pending = pending_bases(fs, checkpoint)
    if not pending:
        return 0
    bases = tuple(base for _, base in pending)
    for table in (layout.patch_scores, layout.quarantine):
        root = storage.filesystem_for(table)[1]
        sel = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        for f in fs.get_file_info(sel):
            if f.type == pafs.FileType.File and posixpath.basename(f.path).startswith(bases):
                fs.delete_file(f.path)
    for path, _ in pending:
        fs.delete_file(path)
    return len(pending)


def build_pipeline(
    cfg: ScoreJobConfig,
    res: Resources,
    job_id: str,
    card: ModelCard,
    columns: tuple[str, ...],
    progress=None,
    calibration=None,
    skip_ids: tuple[str, int] | None = None,
):
    """read_parquet -> map_batches(PatchScorer) on an actor pool; the caller writes it.
    `columns`: the patch table's, over all its files (a file without one reads it as null).
    `calibration`: the model's calibration scores for the job's search, or None.
    `skip_ids`: (path, hash partitions) of a table of patch_ids not to score
    (--skip-published)."""
    from ray.data import ActorPoolStrategy

    from anogan_batch.job.scorer import CONCURRENT_CALLS, PatchScorer

    ds = ray_read_parquet(
        cfg.patches,
        columns=[c for c in (*PATCH_SCHEMA.names, SLICE) if c in columns],
        num_cpus=IO_CPUS,
        file_extensions=["parquet", "parq", "pq"],
    )
    if skip_ids is not None:
        path, partitions = skip_ids
        published = ray_read_parquet(path, columns=[PATCH_ID], num_cpus=IO_CPUS)
        # a hash join spread over the cluster: neither side needs to fit in one process
        ds = ds.join(published, join_type="left_anti", num_partitions=partitions,
                     on=(PATCH_ID,))  # fmt: skip
    # Blocks of one batch each: an actor task is then one search, so progress, failures and
    # retries are per batch, and a file's worth of rows is committed as soon as it is scored
    # (without this, Ray hands an actor a whole read block, often a whole file).
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    return ds.map_batches(
        PatchScorer,
        fn_constructor_kwargs={
            "model": card,
            "search": cfg.search,
            JOB_ID: job_id,
            "device": cfg.device,
            "threads": res.threads,
            "progress": progress,
            "calibration": calibration,
            "fpr": cfg.fpr,
            "residual_maps": cfg.residual_maps,
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        # GPU actors run two calls at once: PatchScorer's device thread searches one batch
        # while another decodes its rows or encodes its results. CPU actors one: their host
        # work is under 1 % of a batch, and a second call cost 90 MB (docs/performance.md)
        compute=ActorPoolStrategy(
            min_size=res.min_actors,
            max_size=res.max_actors,
            max_concurrent_calls_per_actor=CONCURRENT_CALLS if res.gpus_per_actor else 1,
            enable_true_multi_threading=True,
        ),
        num_cpus=res.cpus_per_actor,
        num_gpus=res.gpus_per_actor,
    )
