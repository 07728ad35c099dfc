"""`run_score_job`: a scoring job as a short list of phases.

    prepare   model.json and the patch table checked (exit 2 before anything is written)
    open      job.json created `running`, or the crashed run's manifest taken up
    connect   Ray joined or started; Ray Data's context set for the job (and put back after)
    check_ids patch_id unique and non-null, at any scale
    resume    uncommitted files of a crashed run removed, finished rows counted
    score     the checkpointed pipeline: every unfinished row scored or quarantined, once
    scans     scan_scores (and heatmaps, overlays) rewritten whole from patch_scores
    decide    scans flagged under --fdr, flag counts and drift in job.json
    publish   the tables committed as Delta, when asked
    account   every input row in patch_scores or quarantine, then `succeeded`

Order matters for crash safety: job.json says `running` before any row is written; rows are
written exactly once through the checkpointed pipeline; the scan tables are derived afterwards
and rewritten on every run; `succeeded` is written last, only when every input row is accounted
for. Each phase's wall time lands in the run's `phase_seconds`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from anogan_batch.core.search_config import SearchConfig, score_params
from anogan_batch.errors import InputError, redact
from anogan_batch.io import storage
from anogan_batch.io.columns import (
    DTYPE,
    IMAGE,
    MODEL_ID,
    PATCH_ID,
    REASON,
    SHAPE_COLUMNS,
)
from anogan_batch.job.layout import JobLayout
from anogan_batch.job.manifest import JobManifest, check_rerun, new_job_id, now
from anogan_batch.job.pipeline import (
    IO_CPUS,
    ROW_GROUP_MB,
    Resources,
    auto_batch_size,
    build_pipeline,
    gpus_per_actor,
    make_sink,
    plan_resources,
    recover_pending,
)
from anogan_batch.job.score_config import ScoreJobConfig
from anogan_batch.job.scorer import peak_rss_mb

if TYPE_CHECKING:
    from anogan_batch.core.modeldir import ModelCard

log = logging.getLogger(__name__)


def output_rows(path: str) -> int:
    """Rows in the output table at `path` from Parquet footers (0 when it does not exist yet)."""
    from anogan_batch.io.tables import count_rows, open_dataset

    if not storage.is_dir(path) and not storage.exists(path):
        return 0
    if not storage.list_files(path, suffixes=(".parquet",)):
        return 0
    return count_rows(open_dataset(path), path)


def first_quarantine_reason(out: str) -> str | None:
    """The reason of one quarantined row (for messages), or None."""
    from anogan_batch.io.tables import first_rows, open_dataset

    quarantine = JobLayout(out).quarantine
    if not output_rows(quarantine):
        return None
    return first_rows(open_dataset(quarantine), [REASON]).column(REASON)[0].as_py()


class Preflight(NamedTuple):
    card: ModelCard  # model.json, read once for the whole job
    rows: int
    search: SearchConfig  # its start resolved against the model
    columns: tuple[str, ...]  # of the patch table, over all its files
    calibration: Any  # sorted calibration scores (numpy) for `search`, or None
    calibration_info: dict[str, Any]  # its record in model.json, or {"missing": why}

    @property
    def model_id(self) -> str:
        return self.card.model_id


def prepare(cfg: ScoreJobConfig) -> Preflight:
    """Fail fast (exit 2) on a bad model or a table that cannot fit it."""
    from anogan_batch.core.modeldir import check_weights, read_calibration, read_model_card
    from anogan_batch.core.search import resolve_search
    from anogan_batch.io.patches import row_problem
    from anogan_batch.io.tables import (
        check_normalisation,
        first_rows,
        inspect_patch_table,
        open_patch_table,
        table_normalisation,
    )

    if cfg.publishes_to == "iceberg":  # a catalog that cannot be opened fails now, not after
        from anogan_batch.warehouse.iceberg_tables import load_catalog

        load_catalog(cfg.published)
    card = read_model_card(cfg.model_dir)
    check_weights(card)
    search = resolve_search(cfg.search, has_encoder=card.config.encoder)
    ds = open_patch_table(cfg.patches)
    check_normalisation(
        table_normalisation(cfg.patches), card.normalisation, cfg.patches, cfg.model_dir
    )
    table = inspect_patch_table(cfg.patches)
    if table.rows == 0:
        raise InputError(f"patch table '{cfg.patches}' is empty: nothing to score")
    sample = first_rows(ds, [PATCH_ID, IMAGE, *SHAPE_COLUMNS, DTYPE])
    cols = sample.column_names
    image = sample.column(IMAGE)[0].as_py()
    shape = None
    if all(c in cols for c in SHAPE_COLUMNS):
        shape = tuple(int(sample.column(c)[0].as_py() or 0) for c in SHAPE_COLUMNS)
    dtype = sample.column(DTYPE)[0].as_py() if DTYPE in cols else None
    problem = row_problem(card.patch_spec, None if image is None else len(image), shape, dtype)
    if problem is not None:
        raise InputError(
            f"patch table '{cfg.patches}' does not fit model '{cfg.model_dir}': first row "
            f"{sample.column('patch_id')[0].as_py()!r}: {problem}"
        )
    calibration, info = read_calibration(card, search)
    return Preflight(card, table.rows, search, table.columns, calibration, info)


def identity(cfg: ScoreJobConfig, prep: Preflight) -> dict[str, Any]:
    return {
        MODEL_ID: prep.model_id,
        "calibration_id": prep.calibration_info.get("calibration_id"),
        "fpr": cfg.fpr,
        "patches": cfg.patches,
        **score_params(cfg.search),
    }


def run_score_job(cfg: ScoreJobConfig) -> JobManifest:
    """Score every row of cfg.patches into cfg.out (resuming a crashed run). -> manifest."""
    from anogan_batch.job.raykit import connect_ray, job_data_context

    cfg = replace(
        cfg,
        model_dir=storage.absolute(cfg.model_dir),
        patches=storage.absolute(cfg.patches),
        out=storage.absolute(cfg.out),
    )
    started = time.time()
    prep = prepare(cfg)
    cfg = replace(cfg, search=prep.search)
    manifest = open_manifest(cfg, prep)
    if manifest.status == "succeeded":
        # a rerun after a crash between the job's end and the warehouse's commit
        append_to_warehouse(cfg)
        return manifest
    run = Run(manifest, cfg.out, preflight_s=time.time() - started)
    try:
        with run.phase("connect"):
            connect_ray()
        with job_data_context():
            with run.phase("check_ids"):
                run.record["ids_checked_in"] = _check_ids(cfg, prep)
            with run.phase("resume"):
                done_before = resume(cfg, run)
            with run.phase("skip"):
                skip = skip_published(cfg, manifest)
            todo = prep.rows - done_before - manifest.skipped_rows
            if todo > 0 or not manifest.skipped_rows:  # all published: nothing to score
                with run.phase("score"):
                    score(cfg, prep, manifest, todo=todo, skip_ids=skip)
            count_outputs(manifest, cfg.out)
            with run.phase("scans_and_heatmaps" if cfg.heatmaps else "scans"):
                write_scans(cfg, prep, manifest, run)
            with run.phase("decide"):
                decide(cfg, prep, manifest)
            if cfg.table_format == "delta":
                with run.phase("publish"):
                    run.record["published"] = commit_delta_in_place(cfg)
        account(manifest, run, prep.rows, done_before)
        storage.delete(JobLayout(cfg.out).checkpoint)
        storage.delete(JobLayout(cfg.out).published_ids)
    except BaseException as e:
        run.fail(e)
        raise
    append_to_warehouse(cfg)  # only a succeeded job is published
    return manifest


def open_manifest(cfg: ScoreJobConfig, prep: Preflight) -> JobManifest:
    """job.json for this run: the crashed or failed run's to resume (same job only), the
    succeeded one to report, or a new one; a new job needs an OUT without scores."""
    ident = identity(cfg, prep)
    existing = JobManifest.load(cfg.out)
    if existing is not None:
        check_rerun(existing, ident, cfg.job_id, cfg.out)
        if existing.status == "succeeded":
            log.warning("job %s in '%s' already succeeded; nothing to do", existing.job_id, cfg.out)
            return existing
        manifest = existing
        manifest.status, manifest.error, manifest.finished_at = "running", None, None
    else:
        layout = JobLayout(cfg.out)
        if output_rows(layout.patch_scores) or output_rows(layout.quarantine):
            raise InputError(f"'{cfg.out}' already holds scores but no job.json: use an empty OUT")
        manifest = JobManifest(
            job_id=cfg.job_id or new_job_id(),
            status="running",
            model_id=prep.model_id,
            params={
                **ident,
                "model_dir": cfg.model_dir,
                "batch_size": cfg.batch_size or "auto",
                "residual_maps": cfg.residual_maps,
                "threshold": cfg.threshold,
                "fdr": cfg.fdr,
            },
            input_rows=prep.rows,
        )
    manifest.input_rows = prep.rows
    manifest.calibration = {k: v for k, v in prep.calibration_info.items() if k != "search"}
    return manifest


class Run:
    """This run's entry in job.json: phase timings, facts for the record, and the failure."""

    def __init__(self, manifest: JobManifest, out: str, preflight_s: float) -> None:
        self.manifest, self.out = manifest, out
        self.record: dict[str, Any] = {
            "started_at": now(),
            "phase_seconds": {"preflight": round(preflight_s, 2)},
        }
        manifest.runs.append(self.record)
        manifest.save(out)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.time()
        try:
            yield
        finally:
            self.record["phase_seconds"][name] = round(time.time() - started, 2)

    def fail(self, e: BaseException) -> None:
        m = self.manifest
        m.status, m.finished_at = "failed", now()
        m.error = redact(f"{type(e).__name__}: {e}")
        self.record["finished_at"] = now()
        try:
            m.save(self.out)
        except Exception:  # keep the original error
            log.exception("could not record the failure in job.json")


def _check_ids(cfg: ScoreJobConfig, prep: Preflight) -> str:
    from anogan_batch.io.tables import check_patch_ids

    return check_patch_ids(cfg.patches, prep.rows, io_cpus=IO_CPUS)


def skip_published(cfg: ScoreJobConfig, manifest: JobManifest) -> tuple[str, int] | None:
    """--skip-published: the ids the long-lived tables hold for this model and search, written
    under OUT, and how many input rows they cover (manifest.skipped_rows). -> (ids path, hash
    partitions) for the pipeline's anti-join, or None when there is nothing to skip."""
    from anogan_batch.io.tables import count_listed_ids, id_partitions

    manifest.skipped_rows = 0
    if not cfg.skip_published:
        return None
    path = JobLayout(cfg.out).published_ids
    if cfg.publishes_to == "iceberg":
        from anogan_batch.warehouse.iceberg_tables import write_published_ids

        listed = write_published_ids(cfg.published, manifest.params, path)
    else:
        from anogan_batch.warehouse.delta_tables import write_published_ids

        listed = write_published_ids(cfg.published, manifest.params, path)
    if not listed:
        return None
    rows = manifest.input_rows
    manifest.skipped_rows = count_listed_ids(cfg.patches, path, rows, listed, io_cpus=IO_CPUS)
    return path, id_partitions(rows + listed)


def resume(cfg: ScoreJobConfig, run: Run) -> int:
    """Remove what a crashed run wrote but did not commit; -> rows already finished."""
    layout = JobLayout(cfg.out)
    run.record["recovered_pending_writes"] = recover_pending(cfg.out)
    return output_rows(layout.patch_scores) + output_rows(layout.quarantine)


def score(
    cfg: ScoreJobConfig,
    prep: Preflight,
    manifest: JobManifest,
    todo: int,
    skip_ids: tuple[str, int] | None = None,
) -> None:
    """Every unfinished row through the checkpointed pipeline on a planned actor pool."""
    import ray

    from anogan_batch.job.autoscale import wait_for_gpus

    resources = ray.cluster_resources()
    gpus = gpus_per_actor(cfg, resources.get("GPU", 0.0))
    if gpus > resources.get("GPU", 0.0):  # a GPU group that scales from zero
        actors = cfg.actors[1] if cfg.actors else 1
        resources = wait_for_gpus(gpus, actors, cfg.gpu_wait_s)
    cfg = replace(cfg, batch_size=auto_batch_size(cfg, gpus))
    nodes = [n for n in ray.nodes() if n["Alive"]]
    res = plan_resources(cfg, resources, nodes, todo_rows=todo)
    run = manifest.runs[-1]
    run["resources"] = asdict(res)
    run["batch_size"] = cfg.batch_size
    manifest.save(cfg.out)
    started = time.time()
    _execute(cfg, res, manifest, prep, todo, skip_ids)
    run["seconds"] = round(time.time() - started, 2)


def count_outputs(manifest: JobManifest, out: str) -> None:
    layout = JobLayout(out)
    manifest.scored_rows = output_rows(layout.patch_scores)
    manifest.quarantined_rows = output_rows(layout.quarantine)


def write_scans(cfg: ScoreJobConfig, prep: Preflight, manifest: JobManifest, run: Run) -> None:
    """scan_scores (and heatmaps and overlays), rewritten whole on every run."""
    from anogan_batch.job.aggregate import write_scan_tables

    if not manifest.scored_rows:
        return
    if cfg.heatmaps:
        floor, full = _heatmap_geometry(prep).heat
        anchored = "calibration" if prep.calibration_info.get("heat") else "fixed"
        run.record["overlay_scale"] = {
            "tinted_from": floor,
            "full_from": full,
            "anchored": anchored,
        }
    run.record["scans_grouped_in"] = write_scan_tables(
        cfg.out,
        cfg.patches,
        threshold=cfg.threshold,
        heatmaps=_heatmap_geometry(prep) if cfg.heatmaps else None,
        io_cpus=IO_CPUS,
        rows=prep.rows,
    )


def decide(cfg: ScoreJobConfig, prep: Preflight, manifest: JobManifest) -> None:
    """Scans flagged by Benjamini-Hochberg under --fdr (scan_scores rewritten with `flagged`),
    how many patches --fpr flagged, and the drift of the job's p-values, into job.json."""
    from anogan_batch.core.calibration import score_threshold
    from anogan_batch.job.decisions import flag_scans, patch_p_values

    if prep.calibration is None:
        flag_scans(cfg.out, None)  # the column exists in every job's scan_scores
        manifest.decisions = {"p_values": False, "why": prep.calibration_info.get("missing")}
        manifest.drift = None
        return
    patches, manifest.drift = patch_p_values(cfg.out, len(prep.calibration))
    scans = flag_scans(cfg.out, cfg.fdr)
    manifest.decisions = {
        "p_values": True,
        "scan_p_value": "bonferroni",
        "fpr": cfg.fpr,
        "patches_flagged": patches if cfg.fpr is not None else None,
        "patch_score_threshold": (
            score_threshold(prep.calibration, cfg.fpr) if cfg.fpr is not None else None
        ),
        "fdr": cfg.fdr,
        **scans,
    }


def append_to_warehouse(cfg: ScoreJobConfig) -> None:
    """Append the finished job to the long-lived Iceberg or Delta tables, if the job has
    them (exactly once: see warehouse/iceberg_tables.py, warehouse/delta_tables.py)."""
    target = cfg.published
    if cfg.publishes_to == "iceberg":
        from anogan_batch.warehouse.iceberg_tables import append_job_to_iceberg

        done = append_job_to_iceberg(cfg.out, target)
    elif cfg.publishes_to == "delta":
        from anogan_batch.warehouse.delta_tables import append_job_to_delta

        done = append_job_to_delta(cfg.out, target)
    else:
        return
    for table, rows in done.items():
        log.info("%s %s.%s: %s", cfg.publishes_to, target.namespace, target.table(table), rows)


def commit_delta_in_place(cfg: ScoreJobConfig) -> dict[str, str]:
    """--table-format delta: the job's own tables become Delta tables where they are."""
    from anogan_batch.warehouse.delta_in_place import commit_job_as_delta

    return commit_job_as_delta(cfg.out)


def account(manifest: JobManifest, run: Run, input_rows: int, done_before: int) -> None:
    """Check that every input row is scored, quarantined or skipped (--skip-published), then
    record `succeeded`."""
    record = run.record
    record["driver_peak_rss_mb"] = round(peak_rss_mb(), 1)
    done_now = manifest.scored_rows + manifest.quarantined_rows - done_before
    seconds = record.get("seconds") or 0.0
    record.update(finished_at=now(), rows=done_now)
    manifest.patches_per_second = round(done_now / seconds, 3) if seconds > 0 else None
    finished = manifest.scored_rows + manifest.quarantined_rows + manifest.skipped_rows
    if finished != input_rows:
        raise RuntimeError(
            f"row accounting failed: {input_rows} input rows, {manifest.scored_rows} scored, "
            f"{manifest.quarantined_rows} quarantined, {manifest.skipped_rows} skipped"
        )
    manifest.status, manifest.finished_at = "succeeded", now()
    manifest.save(run.out)


def _heatmap_geometry(prep: Preflight):
    from anogan_batch.job.heatmaps import HeatmapGeometry

    config = prep.card.config
    geometry = HeatmapGeometry(config.image_size, config.channels)
    heat = prep.calibration_info.get("heat")  # the model's normal residuals, when recorded
    return geometry._replace(heat=(heat["floor"], heat["full"])) if heat else geometry


def _execute(
    cfg: ScoreJobConfig,
    res: Resources,
    manifest: JobManifest,
    prep: Preflight,
    todo: int,
    skip_ids: tuple[str, int] | None,
) -> None:
    from ray.data import DataContext
    from ray.data.checkpoint import CheckpointConfig

    from anogan_batch.job.progress import Progress

    ctx = DataContext.get_current()
    checkpoint = JobLayout(cfg.out).checkpoint
    fs, _ = storage.filesystem_for(checkpoint)
    previous = ctx.checkpoint_config
    ctx.checkpoint_config = CheckpointConfig(
        id_column=PATCH_ID,
        checkpoint_path=checkpoint,
        override_filesystem=fs,
        # job.json, not Ray, decides when a job is over: a checkpoint deleted before
        # job.json says "succeeded" would make a rerun score everything again.
        delete_checkpoint_on_success=False,
    )
    try:
        with Progress(todo, cfg.progress) as progress:
            ds = build_pipeline(
                cfg,
                res,
                manifest.job_id,
                prep.card,
                prep.columns,
                progress=progress.actor,
                calibration=prep.calibration,
                skip_ids=skip_ids,
            )
            ds.write_datasink(
                make_sink(
                    cfg.out,
                    rows_per_file=_rows_in(cfg.target_file_mb, prep),
                    rows_per_group=_rows_in(ROW_GROUP_MB, prep),
                ),
                ray_remote_args={"num_cpus": IO_CPUS},
            )
            # memory and busy time for the bench (flat memory, job overhead) and for capacity
            # planning: busy / (score seconds x actors) is how well the actors were fed
            manifest.runs[-1].update(progress.telemetry())
    finally:
        ctx.checkpoint_config = previous


def _rows_in(mb: float, prep: Preflight) -> int:
    """Output rows in `mb` MB of uncompressed row bytes (for --target-file-mb)."""
    c = prep.card.config
    row_bytes = c.image_size**2 * c.channels * 4 + c.latent_dim * 4 + 256
    return max(1, int(mb * 2**20 / row_bytes))
