"""`run_score_job`: checks, the job manifest, the Ray run, aggregation and final counts.

Order matters for crash safety: job.json says `running` before any row is written; rows are
written exactly once through the checkpointed pipeline; scan_scores is derived afterwards and
rewritten on every run; `succeeded` is written last, only when every input row is accounted
for in patch_scores or quarantine.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from dataclasses import asdict, replace
from typing import Any, NamedTuple

from anogan_batch.core.search import SearchConfig
from anogan_batch.errors import InputError, redact
from anogan_batch.io import storage
from anogan_batch.job.manifest import JobManifest, check_rerun, new_job_id, now
from anogan_batch.job.pipeline import (
    CHECKPOINT_DIR,
    IO_CPUS,
    Resources,
    ScoreJobConfig,
    build_pipeline,
    connect_ray,
    make_sink,
    plan_resources,
    quiet_ray_data,
    recover_pending,
)
from anogan_batch.job.scorer import peak_rss_mb

log = logging.getLogger(__name__)


def output_rows(out: str, table: str) -> int:
    """Rows in OUT/<table> from Parquet footers (0 when the table does not exist yet)."""
    from anogan_batch.io.tables import count_rows, open_dataset

    path = storage.join(out, table)
    if not storage.is_dir(path) and not storage.exists(path):
        return 0
    if not storage.list_files(path, suffixes=(".parquet",)):
        return 0
    return count_rows(open_dataset(path), path)


def first_quarantine_reason(out: str) -> str | None:
    """The reason of one quarantined row (for messages), or None."""
    from anogan_batch.io.tables import open_dataset

    if not output_rows(out, "quarantine"):
        return None
    return open_dataset(storage.join(out, "quarantine")).head(1, columns=["reason"])[0][0].as_py()


class Preflight(NamedTuple):
    model_id: str
    rows: int
    search: SearchConfig  # its start resolved against the model
    columns: tuple[str, ...]  # of the patch table, over all its files


def preflight(cfg: ScoreJobConfig) -> Preflight:
    """Fail fast (exit 2) on a bad model or a table that cannot fit it."""
    from anogan_batch.core.modeldir import load_model, read_model_json
    from anogan_batch.core.search import resolve_search
    from anogan_batch.io.patches import row_problem
    from anogan_batch.io.tables import (
        check_normalisation,
        first_rows,
        inspect_patch_table,
        open_patch_table,
        table_normalisation,
    )

    model = load_model(cfg.model_dir)
    search = resolve_search(cfg.search, has_encoder=model.encoder is not None)
    ds = open_patch_table(cfg.patches)
    model_norm = read_model_json(cfg.model_dir).get("normalisation", {})
    check_normalisation(table_normalisation(cfg.patches), model_norm, cfg.patches, cfg.model_dir)
    table = inspect_patch_table(cfg.patches)
    rows = table.rows
    if rows == 0:
        raise InputError(f"patch table '{cfg.patches}' is empty: nothing to score")
    sample = first_rows(ds, ["patch_id", "image", "height", "width", "channels", "dtype"])
    cols = sample.column_names
    image = sample.column("image")[0].as_py()
    shape = None
    if all(c in cols for c in ("height", "width", "channels")):
        shape = tuple(
            int(sample.column(c)[0].as_py() or 0) for c in ("height", "width", "channels")
        )
    dtype = sample.column("dtype")[0].as_py() if "dtype" in cols else None
    problem = row_problem(model.patch_spec, None if image is None else len(image), shape, dtype)
    if problem is not None:
        raise InputError(
            f"patch table '{cfg.patches}' does not fit model '{cfg.model_dir}': first row "
            f"{sample.column('patch_id')[0].as_py()!r}: {problem}"
        )
    return Preflight(model.model_id, rows, search, table.columns)


def identity(cfg: ScoreJobConfig, model_id: str) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "patches": cfg.patches,
        "iterations": cfg.search.iterations,
        "lambda": cfg.search.lam,
        "lr": cfg.search.lr,
        "seed": cfg.search.seed,
        # the stopping rule, when there is one (None: the paper's fixed Γ)
        "stop_tol": cfg.search.stop_tol,
        "stop_window": cfg.search.stop_window if cfg.search.stop_tol else None,
        "min_iterations": cfg.search.min_iterations if cfg.search.stop_tol else None,
        "precision": cfg.search.precision,
        "start": cfg.search.start,
    }


class _Progress:
    """A Ray actor counts rows the scorers finished; a driver thread prints rate and ETA."""

    def __init__(self, total: int, enabled: bool) -> None:
        import ray

        @ray.remote(num_cpus=0)
        class Counter:
            def __init__(self) -> None:
                self.n = 0
                self.busy = 0.0  # seconds the scorers spent inside their batches
                self.peak_rss: dict[int, float] = {}  # scorer pid -> peak RSS (MiB)

            def add(self, k: int, pid: int = 0, rss_mb: float = 0.0, busy: float = 0.0) -> None:
                self.n += k
                self.busy += busy
                self.peak_rss[pid] = max(rss_mb, self.peak_rss.get(pid, 0.0))

            def get(self) -> int:
                return self.n

            def telemetry(self) -> tuple[float, float]:
                return max(self.peak_rss.values(), default=0.0), self.busy

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: a counter on a worker node would die with that node, and the
        # job must survive node failures (the driver's own node is one it cannot survive).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = Counter.options(scheduling_strategy=here).remote()
        self.total, self.enabled = total, enabled
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def telemetry(self) -> dict[str, float | None]:
        """Largest peak RSS any scorer reported and the seconds they spent scoring; None if
        the counter is gone (it is only telemetry and must never fail a job)."""
        import ray

        try:
            rss, busy = ray.get(self.actor.telemetry.remote(), timeout=30)
            return {"actor_peak_rss_mb": round(rss, 1), "actor_busy_seconds": round(busy, 2)}
        except Exception:
            log.warning("could not read the scorers' telemetry", exc_info=True)
            return {"actor_peak_rss_mb": None, "actor_busy_seconds": None}

    def done(self) -> int:
        import ray

        return int(ray.get(self.actor.get.remote()))

    def line(self) -> str:
        n = self.done()
        elapsed = max(1e-9, time.time() - self.started)
        rate = n / elapsed
        eta = (self.total - n) / rate if rate > 0 else float("nan")
        eta_s = "?" if eta != eta else f"{int(eta // 60)}m{int(eta % 60):02d}s"
        return f"scored {n:,}/{self.total:,} patches | {rate:.1f} patches/s | ETA {eta_s}"

    def _run(self) -> None:
        tty = sys.stderr.isatty()
        interval = 1.0 if tty else 15.0
        while not self._stop.wait(interval):
            try:
                text = self.line()
            except Exception:  # the cluster is going away; the job itself reports errors
                return
            sys.stderr.write(("\r" + text) if tty else (text + "\n"))
            sys.stderr.flush()

    def __enter__(self) -> _Progress:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
            if exc[0] is None:  # the final count, also where no line was due yet
                with contextlib.suppress(Exception):
                    sys.stderr.write(("\r" if sys.stderr.isatty() else "") + self.line())
            sys.stderr.write("\n")


def run_score_job(cfg: ScoreJobConfig) -> JobManifest:
    """Score every row of cfg.patches into cfg.out (resuming a crashed run). -> manifest."""
    import ray

    from anogan_batch.io.tables import check_patch_ids
    from anogan_batch.job.aggregate import write_scan_tables
    from anogan_batch.job.warehouse import publish

    cfg = replace(
        cfg,
        model_dir=storage.absolute(cfg.model_dir),
        patches=storage.absolute(cfg.patches),
        out=storage.absolute(cfg.out),
    )
    t0 = time.time()
    model_id, input_rows, search, columns = preflight(cfg)
    cfg = replace(cfg, search=search)
    preflight_s = time.time() - t0
    ident = identity(cfg, model_id)
    existing = JobManifest.load(cfg.out)
    if existing is not None:
        check_rerun(existing, ident, cfg.job_id, cfg.out)
        if existing.status == "succeeded":
            log.warning("job %s in '%s' already succeeded; nothing to do", existing.job_id, cfg.out)
            return existing
        manifest = existing
        manifest.status, manifest.error, manifest.finished_at = "running", None, None
    else:
        if output_rows(cfg.out, "patch_scores") or output_rows(cfg.out, "quarantine"):
            raise InputError(f"'{cfg.out}' already holds scores but no job.json: use an empty OUT")
        manifest = JobManifest(
            job_id=cfg.job_id or new_job_id(),
            status="running",
            model_id=model_id,
            params={
                **ident,
                "model_dir": cfg.model_dir,
                "batch_size": cfg.batch_size,
                "threshold": cfg.threshold,
            },
            input_rows=input_rows,
        )
    manifest.input_rows = input_rows
    run: dict[str, Any] = {"started_at": now(), "phase_seconds": {"preflight": preflight_s}}
    phases = run["phase_seconds"]
    manifest.runs.append(run)
    manifest.save(cfg.out)

    try:
        t0 = time.time()
        connect_ray()
        quiet_ray_data()
        phases["connect"] = time.time() - t0
        t0 = time.time()
        run["ids_checked_in"] = check_patch_ids(cfg.patches, input_rows, io_cpus=IO_CPUS)
        phases["check_ids"] = time.time() - t0
        run["recovered_pending_writes"] = recover_pending(cfg.out)
        before = output_rows(cfg.out, "patch_scores") + output_rows(cfg.out, "quarantine")
        todo = input_rows - before
        nodes = [n for n in ray.nodes() if n["Alive"]]
        res = plan_resources(cfg, ray.cluster_resources(), nodes, todo_rows=todo)
        run["resources"] = asdict(res)
        manifest.save(cfg.out)
        started = time.time()
        _execute(cfg, res, manifest, model_id, todo, columns)
        elapsed = time.time() - started
        phases["score"] = elapsed
        manifest.scored_rows = output_rows(cfg.out, "patch_scores")
        manifest.quarantined_rows = output_rows(cfg.out, "quarantine")
        t0 = time.time()
        if manifest.scored_rows:
            run["scans_grouped_in"] = write_scan_tables(
                cfg.out,
                cfg.patches,
                threshold=cfg.threshold,
                heatmaps=_heatmap_geometry(cfg) if cfg.heatmaps else None,
                io_cpus=IO_CPUS,
                rows=input_rows,
            )
        phases["scans_and_heatmaps" if cfg.heatmaps else "scans"] = time.time() - t0
        if cfg.table_format != "parquet":
            t0 = time.time()
            run["published"] = publish(cfg.out, cfg.table_format)
            phases["publish"] = time.time() - t0
        run["driver_peak_rss_mb"] = round(peak_rss_mb(), 1)
        run["phase_seconds"] = {k: round(v, 2) for k, v in phases.items()}
        done_now = manifest.scored_rows + manifest.quarantined_rows - before
        run.update(finished_at=now(), rows=done_now, seconds=round(elapsed, 2))
        manifest.patches_per_second = round(done_now / elapsed, 3) if elapsed > 0 else None
        if manifest.scored_rows + manifest.quarantined_rows != input_rows:
            raise RuntimeError(
                f"row accounting failed: {input_rows} input rows, {manifest.scored_rows} scored, "
                f"{manifest.quarantined_rows} quarantined"
            )
        manifest.status, manifest.finished_at = "succeeded", now()
        manifest.save(cfg.out)
        storage.delete(storage.join(cfg.out, CHECKPOINT_DIR))
        return manifest
    except BaseException as e:
        manifest.status, manifest.finished_at = "failed", now()
        manifest.error = redact(f"{type(e).__name__}: {e}")
        run["finished_at"] = now()
        try:
            manifest.save(cfg.out)
        except Exception:  # keep the original error
            log.exception("could not record the failure in job.json")
        raise


def _heatmap_geometry(cfg: ScoreJobConfig):
    from anogan_batch.core.modeldir import read_model_json
    from anogan_batch.job.heatmaps import HeatmapGeometry

    doc = read_model_json(cfg.model_dir)
    patch, norm = doc["patch"], doc.get("normalisation", {})
    return HeatmapGeometry(patch["size"], patch["channels"], norm.get("pixel_dtype", "uint8"))


def _execute(
    cfg: ScoreJobConfig,
    res: Resources,
    manifest: JobManifest,
    model_id: str,
    todo: int,
    columns: tuple[str, ...],
) -> None:
    from ray.data import DataContext
    from ray.data.checkpoint import CheckpointConfig

    ctx = DataContext.get_current()
    fs, _ = storage.filesystem_for(storage.join(cfg.out, CHECKPOINT_DIR))
    ctx.checkpoint_config = CheckpointConfig(
        id_column="patch_id",
        checkpoint_path=storage.join(cfg.out, CHECKPOINT_DIR),
        override_filesystem=fs,
        # job.json, not Ray, decides when a job is over: a checkpoint deleted before
        # job.json says "succeeded" would make a rerun score everything again.
        delete_checkpoint_on_success=False,
    )
    try:
        with _Progress(todo, cfg.progress) as progress:
            ds = build_pipeline(
                cfg, res, manifest.job_id, model_id, columns, progress=progress.actor
            )
            ds.write_datasink(
                make_sink(cfg.out, _rows_per_file(cfg)),
                ray_remote_args={"num_cpus": IO_CPUS},
            )
            # memory and busy time for the bench (flat memory, job overhead) and for capacity
            # planning: busy / (score seconds x actors) is how well the actors were fed
            manifest.runs[-1].update(progress.telemetry())
    finally:
        ctx.checkpoint_config = None


def _rows_per_file(cfg: ScoreJobConfig) -> int:
    """Rows per output file for --target-file-mb (of uncompressed row bytes)."""
    from anogan_batch.core.modeldir import read_model_json

    arch = read_model_json(cfg.model_dir)["architecture"]
    row_bytes = arch["image_size"] ** 2 * arch["channels"] * 4 + arch["latent_dim"] * 4 + 256
    return max(1, int(cfg.target_file_mb * 2**20 / row_bytes))
