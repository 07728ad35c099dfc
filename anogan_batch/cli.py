"""The `anogan-batch` command line (typer).

Commands stay thin: parse flags into a typed config, call the library, print where the results
are. `main` maps user errors (`AnoganError`) to exit code 2 with the message only; anything
else is a bug and exits 1 with its traceback. Heavy libraries (torch, ray, pyarrow) are imported
inside the commands so `anogan-batch --help` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from anogan_batch.core.configs import SearchConfig, TrainConfig
from anogan_batch.errors import AnoganError, ConfigError, redact
from anogan_batch.job.configs import AUTO_RAY_FILES, IngestConfig, ScoreJobConfig, WarehouseTarget

app = typer.Typer(
    name="anogan-batch",
    help="Distributed batch anomaly scoring of image archives with AnoGAN on Ray.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _path(metavar: str, what: str = "local path or s3://bucket/prefix"):
    return Annotated[str, typer.Argument(metavar=metavar, help=what, show_default=False)]


# Iceberg options, shared by `score --table-format iceberg` and `publish` (job/iceberg.py)
_Catalog = Annotated[
    str,
    typer.Option(help="pyiceberg catalog name (~/.pyiceberg.yaml or PYICEBERG_CATALOG__* vars)"),
]
_Namespace = Annotated[str, typer.Option(help="Iceberg namespace of the tables")]
_Warehouse = Annotated[
    str | None,
    typer.Option(help="zero-configuration catalog: warehouse folder, local or s3://"),
]
_CatalogDb = Annotated[
    str | None,
    typer.Option("--catalog-db", help="its SQLite file [default: WAREHOUSE/catalog.sqlite]"),
]
_TablePrefix = Annotated[
    str,
    typer.Option("--table-prefix", help="names the tables <prefix>patch_scores, ... <prefix>jobs"),
]


def _echo(msg: str) -> None:
    typer.echo(msg)


@app.command()
def ingest(
    src: _path("SRC", "folder (or s3:// prefix) of scan files"),
    out: _path("OUT", "patch table to write (Parquet dataset)"),
    patch_size: Annotated[int, typer.Option("--patch-size", help="patch side P in pixels")],
    stride: Annotated[int | None, typer.Option(help="grid step; default P")] = None,
    label_from_parent: Annotated[
        bool, typer.Option("--label-from-parent", help="label = name of the file's folder")
    ] = False,
    slice_axis: Annotated[
        int, typer.Option("--slice-axis", help="axis of 3-D NPY volumes that indexes slices")
    ] = IngestConfig.slice_axis,
    window: Annotated[
        str | None,
        typer.Option(
            help="CENTER,WIDTH in source units (DICOM: after rescale); values in the window "
            "map linearly onto uint16"
        ),
    ] = None,
    min_foreground: Annotated[
        float,
        typer.Option(
            "--min-foreground",
            help="skip patches with less foreground (0-1): saturated pixels of colour scans, "
            "above the intensity's Otsu threshold for grayscale",
        ),
    ] = IngestConfig.min_foreground,
    engine: Annotated[
        str, typer.Option(help=f"auto (Ray above {AUTO_RAY_FILES} files), local, or ray")
    ] = IngestConfig.engine,
    rows_per_file: Annotated[int, typer.Option("--rows-per-file")] = IngestConfig.rows_per_file,
    max_pixels: Annotated[
        int | None,
        typer.Option(
            "--max-pixels",
            help="values one read may hold: a whole file for formats read whole (all its "
            "slices), one region of a slide (a tile or strip larger is refused); larger files "
            "are quarantined before decoding",
        ),
    ] = IngestConfig.max_pixels,
    mpp: Annotated[
        float | None,
        typer.Option(
            help="µm per pixel to read slides at: the nearest pyramid level within 5 %, else "
            "the next finer one downsampled by area (files without a pixel size: level 0)"
        ),
    ] = IngestConfig.mpp,
    level: Annotated[
        int | None, typer.Option(help="the pyramid level to read slides at (0: full size)")
    ] = IngestConfig.level,
    mask: Annotated[
        str,
        typer.Option(
            help="the foreground --min-foreground decides on: auto (computed), or a folder of "
            "your masks, <scan_id>.png/.tif/.npy, any size, nonzero = foreground (then "
            "--min-foreground defaults to 0.5)"
        ),
    ] = IngestConfig.mask,
) -> None:
    """Cut every scan under SRC into P x P patches and write a patch table to OUT.

    Formats: PNG/JPEG (8/16-bit), TIFF (multi-page; tiled and pyramidal slides, SVS, NDPI,
    OME-TIFF read by region), NPY (2-D, or 3-D volumes), DICOM, NIfTI.
    """
    from anogan_batch.job.configs import IngestConfig
    from anogan_batch.job.ingest import ingest as run_ingest

    cfg = IngestConfig(
        patch_size=patch_size,
        stride=stride,
        label_from_parent=label_from_parent,
        slice_axis=slice_axis,
        window=_parse_window(window),
        min_foreground=min_foreground,
        engine=engine,
        rows_per_file=rows_per_file,
        max_pixels=max_pixels,
        mpp=mpp,
        level=level,
        mask=mask,
    )
    s = run_ingest(src, out, cfg)
    _echo(
        f"ingested {s.files} files: {s.scans} scans -> {s.patches} patches in {out} "
        f"({s.skipped_patches} patches below --min-foreground skipped, "
        f"{s.quarantined} files or slices quarantined; {s.engine}, {s.seconds:.1f} s)"
    )


def _parse_window(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    from anogan_batch.errors import ConfigError

    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError("--window", text, "must be CENTER,WIDTH, e.g. 40,400") from None
    return center, width


@app.command()
def train(
    patches: _path("PATCHES", "patch table to train on"),
    model_dir: _path("MODEL_DIR", "where to write the model"),
    epochs: Annotated[
        int, typer.Option(help="passes over the normal patches")
    ] = TrainConfig.epochs,
    seed: Annotated[
        int, typer.Option(help="random seed (deterministic on CPU)")
    ] = TrainConfig.seed,
    normal_label: Annotated[
        str | None, typer.Option("--normal-label", help="train only on rows with this label")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = TrainConfig.batch_size,
    lr: Annotated[float, typer.Option(help="Adam learning rate of G and D")] = TrainConfig.lr,
    latent_dim: Annotated[int, typer.Option("--latent-dim")] = TrainConfig.latent_dim,
    g_width: Annotated[
        int, typer.Option("--g-width", help="generator width")
    ] = TrainConfig.g_width,
    d_width: Annotated[
        int, typer.Option("--d-width", help="discriminator width")
    ] = TrainConfig.d_width,
    d_norm: Annotated[
        str, typer.Option("--d-norm", help="discriminator normalisation: batch, spectral, none")
    ] = TrainConfig.d_norm,
    max_patches: Annotated[int | None, typer.Option("--max-patches")] = None,
    encoder_epochs: Annotated[
        int,
        typer.Option(
            "--encoder-epochs",
            help="epochs of the encoder (f-AnoGAN izi_f) trained after the GAN; 0 skips it",
        ),
    ] = TrainConfig.encoder_epochs,
    g_ema: Annotated[
        float, typer.Option("--g-ema", help="decay of the EMA of G's weights that is saved; 0: off")
    ] = TrainConfig.g_ema,
    kappa: Annotated[
        float, typer.Option(help="κ, feature weight of the encoder loss")
    ] = TrainConfig.kappa,
    augment_shift: Annotated[
        int,
        typer.Option(
            help="shift training patches by up to this many pixels (augmentation); 0: off"
        ),
    ] = TrainConfig.augment_shift,
    input_norm: Annotated[
        str,
        typer.Option(
            "--input-norm",
            help="contrast: normalise each patch's contrast before G/D (docs/quality.md); "
            "none: pixels as stored, for archives where absolute brightness is the signal",
        ),
    ] = TrainConfig.input_norm,
    input_blur: Annotated[
        float,
        typer.Option(
            "--input-blur",
            help="σ in pixels of a Gaussian blur that ends the model input, for training and "
            "scoring: a residual between blurred patches ignores strokes drawn a pixel off "
            "(docs/quality.md); 0: none",
        ),
    ] = TrainConfig.input_blur,
    feature_layer: Annotated[
        int,
        typer.Option(
            "--feature-layer",
            help="D block whose output is the feature layer f of the search: 0 the first, "
            "-1 the last (docs/quality.md)",
        ),
    ] = TrainConfig.feature_layer,
    calibration_fraction: Annotated[
        float,
        typer.Option(
            "--calibration-fraction",
            help="share of the normal scans held out of training and scored for calibrated "
            "p-values (whole scans; 0: none; docs/calibration.md)",
        ),
    ] = TrainConfig.calibration_fraction,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ...")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Train the GAN on normal patches (only rows whose label is L when given), then score
    the held-out normal scans as the model's calibration."""
    from anogan_batch.core.configs import TrainConfig
    from anogan_batch.core.training import train_gan

    cfg = TrainConfig(
        epochs=epochs,
        seed=seed,
        normal_label=normal_label,
        batch_size=batch_size,
        lr=lr,
        latent_dim=latent_dim,
        g_width=g_width,
        d_width=d_width,
        d_norm=d_norm,
        max_patches=max_patches,
        encoder_epochs=encoder_epochs,
        kappa=kappa,
        augment_shift=augment_shift,
        g_ema=g_ema,
        input_norm=input_norm,
        input_blur=input_blur,
        feature_layer=feature_layer,
        calibration_fraction=calibration_fraction,
        device=device,
    )
    model_id = train_gan(patches, model_dir, cfg, progress=progress)
    _echo(f"model {model_id} written to {model_dir}")


@app.command()
def calibrate(
    model_dir: _path("MODEL_DIR", "trained model to (re)calibrate"),
    patches: _path("PATCHES", "patch table of this site's normal patches"),
    normal_label: Annotated[
        str | None, typer.Option("--normal-label", help="use only rows with this label")
    ] = None,
    iterations: Annotated[
        int | None, typer.Option(help="Γ of the search to calibrate [default: score's]")
    ] = None,
    lam: Annotated[float, typer.Option("--lambda", help="λ of that search")] = SearchConfig.lam,
    lr: Annotated[float | None, typer.Option(help="its step size [default: score's]")] = None,
    seed: Annotated[int, typer.Option(help="its seed")] = SearchConfig.seed,
    start: Annotated[
        str, typer.Option(help="its start: auto, encoder, prior")
    ] = SearchConfig.start,
    device: Annotated[str | None, typer.Option(help="cpu, cuda ...; default auto")] = None,
) -> None:
    """Score a site's normal patches and store them as the model's calibration for one
    search (score's default unless flags say otherwise): the weights and model_id stay."""
    from anogan_batch.core.training import calibrate as run_calibrate

    search = SearchConfig(iterations=iterations, lam=lam, lr=lr, seed=seed, start=start)
    r = run_calibrate(model_dir, patches, normal_label=normal_label, search=search, device=device)
    _echo(
        f"calibration {r['calibration_id']} of model {model_dir}: {r['n']} normal patches "
        f"for search {r['search_key']}"
    )


def parse_batch_size(value: str) -> int | None:
    """'auto' -> None (chosen per device: job/pipeline.auto_batch_size); '256' -> 256."""
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError("batch_size", value, "use a number of patches or auto") from None


def parse_actors(value: str | None) -> tuple[int, int] | None:
    """'4' -> (4, 4); '2-8' or '2:8' -> (2, 8) for an autoscaling pool."""
    if value is None:
        return None
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


@app.command()
def score(
    model_dir: _path("MODEL_DIR", "trained model (anogan-batch train)"),
    patches: _path("PATCHES", "patch table to score"),
    out: _path("OUT", "job output folder (resumes a crashed job)"),
    iterations: Annotated[
        int | None,
        typer.Option(
            help="Γ, latent search steps [default: 500 (the paper) from a random start; "
            "10 from the encoder's start, which only polishes z = E(x)]",
            show_default=False,
        ),
    ] = None,
    lam: Annotated[
        float, typer.Option("--lambda", help="λ, weight of the feature loss")
    ] = SearchConfig.lam,
    batch_size: Annotated[
        str,
        typer.Option(
            "--batch-size",
            help="patches per actor task, or auto: 1,024 on GPU actors (each actor then "
            "searches as many at once as its GPU holds, learnt from out-of-memory errors), "
            "64 on CPU actors",
        ),
    ] = "auto",
    actors: Annotated[
        str | None, typer.Option(help="actor pool size K, or MIN-MAX to autoscale")
    ] = None,
    gpus_per_actor: Annotated[
        float | None, typer.Option("--gpus-per-actor", help="GPUs per actor, may be < 1")
    ] = None,
    cpus_per_actor: Annotated[
        float | None,
        typer.Option(
            "--cpus-per-actor",
            help="CPUs (and torch threads) per actor [default: one 1-thread actor per core on "
            "CPU clusters, more threads where memory is short; 1 beside each GPU]",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the z initialisation")] = SearchConfig.seed,
    job_id: Annotated[str | None, typer.Option("--job-id")] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Adam step size of the search [default: 0.05 from a random start, 0.003 "
            "from the encoder's]",
            show_default=False,
        ),
    ] = None,
    stop_tol: Annotated[
        float | None,
        typer.Option(
            "--stop-tol",
            help="early stopping: a patch stops when its loss fell by less than this fraction "
            "over --stop-window steps (default: off, the paper's fixed Γ)",
        ),
    ] = None,
    stop_window: Annotated[int, typer.Option("--stop-window")] = SearchConfig.stop_window,
    min_iterations: Annotated[int, typer.Option("--min-iterations")] = SearchConfig.min_iterations,
    slots: Annotated[
        int | None,
        typer.Option(help="patches searched at once; stopped ones are replaced (default: batch)"),
    ] = None,
    precision: Annotated[
        str, typer.Option(help="fp32, or bf16 (autocast during the search; scores in fp32)")
    ] = SearchConfig.precision,
    start: Annotated[
        str,
        typer.Option(
            help="z_0 of the search: encoder (z_0 = E(x)), prior (random), or auto: the "
            "encoder when the model has one"
        ),
    ] = SearchConfig.start,
    threshold: Annotated[float | None, typer.Option(help="count patches above it per scan")] = None,
    fpr: Annotated[
        float | None,
        typer.Option(
            help="flag patches with p_value <= FPR: the false-positive rate on normal "
            "patches (needs a calibrated model)"
        ),
    ] = None,
    fdr: Annotated[
        float | None,
        typer.Option(
            help="flag scans by Benjamini-Hochberg: expected share of normal scans "
            "among the flagged <= FDR (needs a calibrated model)"
        ),
    ] = None,
    target_file_mb: Annotated[
        float, typer.Option("--target-file-mb")
    ] = ScoreJobConfig.target_file_mb,
    device: Annotated[
        str,
        typer.Option(
            help="auto (a GPU per actor when the cluster has GPUs, else the CPU), cpu, or "
            "cuda (GPU actors required; an actor whose torch cannot use its GPU fails the job)"
        ),
    ] = ScoreJobConfig.device,
    gpu_wait: Annotated[
        float,
        typer.Option(
            "--gpu-wait",
            help="seconds a job that wants GPUs (--device cuda, --gpus-per-actor) waits for "
            "the autoscaler when the cluster has none yet; then exit 1",
        ),
    ] = ScoreJobConfig.gpu_wait_s,
    progress: Annotated[bool, typer.Option(help="show live progress")] = True,
    heatmaps: Annotated[
        bool, typer.Option(help="stitch per-scan heatmaps and PNG overlays after scoring")
    ] = True,
    residual_maps: Annotated[
        str,
        typer.Option(
            "--residual-maps",
            help="residual_map stored as compact (float16: within 2^-11 of float32, half the "
            "bytes), float32, or none (with --no-heatmaps)",
        ),
    ] = ScoreJobConfig.residual_maps,
    table_format: Annotated[
        str,
        typer.Option(
            "--table-format",
            help="parquet; delta (Delta Lake, in place; with --warehouse also appended to the "
            "long-lived Delta tables there); iceberg (appended to the catalog's long-lived "
            "tables); appends are exactly once",
        ),
    ] = ScoreJobConfig.table_format,
    catalog: _Catalog = WarehouseTarget.catalog,
    namespace: _Namespace = WarehouseTarget.namespace,
    warehouse: _Warehouse = None,
    catalog_db: _CatalogDb = None,
    table_prefix: _TablePrefix = WarehouseTarget.table_prefix,
    skip_published: Annotated[
        bool,
        typer.Option(
            "--skip-published",
            help="score only patches whose (patch_id, model, search) the long-lived tables do "
            "not hold yet (needs --table-format iceberg, or delta with --warehouse); job.json "
            "counts the rest as skipped_rows",
        ),
    ] = False,
) -> None:
    """The distributed scoring job: latent mapping of every patch on Ray actors."""
    from anogan_batch.core.configs import SearchConfig
    from anogan_batch.job.configs import ScoreJobConfig
    from anogan_batch.job.runner import run_score_job

    cfg = ScoreJobConfig(
        model_dir=model_dir,
        patches=patches,
        out=out,
        search=SearchConfig(
            iterations=iterations,
            lam=lam,
            lr=lr,
            seed=seed,
            stop_tol=stop_tol,
            stop_window=stop_window,
            min_iterations=min_iterations,
            slots=slots,
            precision=precision,
            start=start,
        ),
        batch_size=parse_batch_size(batch_size),
        actors=parse_actors(actors),
        gpus_per_actor=gpus_per_actor,
        cpus_per_actor=cpus_per_actor,
        job_id=job_id,
        threshold=threshold,
        fpr=fpr,
        fdr=fdr,
        target_file_mb=target_file_mb,
        device=device,
        gpu_wait_s=gpu_wait,
        progress=progress,
        heatmaps=heatmaps,
        residual_maps=residual_maps,
        table_format=table_format,
        published=WarehouseTarget(catalog, namespace, warehouse, catalog_db, table_prefix),
        skip_published=skip_published,
    )
    m = run_score_job(cfg)
    _echo(
        f"job {m.job_id} {m.status}: {m.scored_rows} scored, {m.quarantined_rows} quarantined"
        f"{f', {m.skipped_rows} skipped (published)' if m.skipped_rows else ''} "
        f"of {m.input_rows} rows ({m.patches_per_second or 0:.2f} patches/s); outputs in {out}"
    )
    if m.scored_rows == 0 and m.quarantined_rows > 0:
        from anogan_batch.job.runner import first_quarantine_reason

        raise AnoganError(
            f"no row of '{patches}' could be scored: all {m.quarantined_rows} rows are in "
            f"{out}/quarantine; first reason: {first_quarantine_reason(out)}"
        )


@app.command()
def publish(
    out: _path("OUT", "a finished job's output folder"),
    to: Annotated[str, typer.Option(help="iceberg, or delta (tables under --warehouse)")] = (
        "iceberg"
    ),
    catalog: _Catalog = WarehouseTarget.catalog,
    namespace: _Namespace = WarehouseTarget.namespace,
    warehouse: _Warehouse = None,
    catalog_db: _CatalogDb = None,
    table_prefix: _TablePrefix = WarehouseTarget.table_prefix,
) -> None:
    """Append a finished job to long-lived warehouse tables (patch_scores, scan_scores,
    quarantine, jobs): Iceberg in a catalog, or Delta under WAREHOUSE; a job already there is
    not added again."""
    target = WarehouseTarget(catalog, namespace, warehouse, catalog_db, table_prefix)
    if to == "delta":
        from anogan_batch.job.delta_tables import publish_delta

        done = publish_delta(out, target)
    elif to == "iceberg":
        from anogan_batch.job.iceberg import publish as publish_iceberg

        done = publish_iceberg(out, target)
    else:
        raise ConfigError("--to", to, "iceberg or delta")
    for table, rows in done.items():
        appended = rows if isinstance(rows, str) else f"{rows} rows appended"
        _echo(f"{namespace}.{target.table(table)}: {appended}")


@app.command("eval")
def eval_(
    out: _path("OUT", "output folder of a finished score job"),
    normal_label: Annotated[str, typer.Option("--normal-label", help="label of normal rows")],
    truth: Annotated[
        str | None,
        typer.Option(help="CSV/Parquet of patch_id,label that overrides the label column"),
    ] = None,
) -> None:
    """AUROC / AUPRC of a finished job against the `label` column; writes OUT/metrics.json."""
    from anogan_batch.evaluation.evaluate import evaluate_job

    m = evaluate_job(out, normal_label, truth=truth)
    _echo(
        f"AUROC {m['auroc']:.4f}  AUPRC {m['auprc']:.4f}  "
        f"({m['n_normal']} normal, {m['n_anomalous']} anomalous)"
    )
    if "scan" in m:
        s = m["scan"]
        _echo(f"scan AUROC {s['auroc']:.4f}  AUPRC {s['auprc']:.4f} (by {s['score']})")


@app.command()
def heatmap(
    out: _path("OUT", "output folder of a finished score job"),
    scan_id: Annotated[str, typer.Argument(metavar="SCAN_ID", help="the scan to fetch")],
    npy: Annotated[str | None, typer.Option(help="write the heatmap as .npy here")] = None,
    tiff: Annotated[
        str | None,
        typer.Option(help="write the overlay as a tiled pyramidal OME-TIFF here (slide viewers)"),
    ] = None,
) -> None:
    """Fetch one scan's anomaly heatmap by scan_id (and where its overlay PNG is)."""
    import numpy as np

    from anogan_batch.job.heatmaps import heat_grid_for
    from anogan_batch.job.layout import JobLayout

    heat, cell = heat_grid_for(out, scan_id)
    if npy:
        np.save(npy, heat)
    if tiff:
        from anogan_batch.job.heatmaps import export_tiff

        export_tiff(out, scan_id, tiff)
    overlay = JobLayout(out).overlay(scan_id)
    row, col = divmod(int(heat.argmax()), heat.shape[1])
    _echo(
        f"{scan_id}: {heat.shape[0]}x{heat.shape[1]} heat grid of {cell:g}x{cell:g}-pixel cells, "
        f"max {heat.max():.3f} at (x={round(col * cell)}, y={round(row * cell)}); overlay {overlay}"
        + (f"; saved to {npy}" if npy else "")
        + (f"; OME-TIFF pyramid {tiff}" if tiff else "")
    )


@app.command()
def report(
    out: _path("OUT", "output folder of a finished score job"),
    html: Annotated[
        str | None, typer.Option(help="where to write; default OUT/report.html")
    ] = None,
) -> None:
    """A self-contained HTML report of a finished job."""
    from anogan_batch.evaluation.report import write_report

    path = write_report(out, html)
    _echo(f"report written to {path}")


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="where the demo writes everything")] = "demo-out",
    train: Annotated[
        bool, typer.Option("--train", help="train the GAN here instead of using the bundled one")
    ] = False,
    iterations: Annotated[
        int | None, typer.Option(help="Γ, latent search steps [default: score's]")
    ] = None,
) -> None:
    """The whole flow on data that ships with the package; finishes with the AUROC."""
    from anogan_batch.evaluation.demo import run_demo

    run_demo(out, train=train, iterations=iterations)


@app.command()
def submit(
    spec: _path("SPEC", "job spec YAML, e.g. jobs/score.yaml"),
    address: Annotated[
        str | None, typer.Option(help="Ray Jobs API URL; default $RAY_API_SERVER_ADDRESS")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="NAME=value for a ${NAME} of the spec")
    ] = None,
    wait: Annotated[bool, typer.Option(help="follow the logs until the job ends")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 7 * 24 * 3600.0,
) -> None:
    """Submit a job spec from jobs/ to a Ray cluster (Ray Jobs API); exits like the job."""
    from anogan_batch.job.submit import default_address, load_spec, parse_sets
    from anogan_batch.job.submit import submit as run_submit

    job = load_spec(spec, parse_sets(set_ or []))
    code = run_submit(job, address or default_address(), wait=wait, timeout_s=timeout, echo=_echo)
    if code:
        raise typer.Exit(code)


@app.command()
def bench(
    json_path: Annotated[Path | None, typer.Option("--json", help="write figures here")] = None,
    quick: Annotated[bool, typer.Option(help="tiny sizes: checks the bench runs")] = False,
    scale: Annotated[
        str | None,
        typer.Option(
            help="rows, comma-separated (e.g. 1000000,10000000): the job and publish at scale "
            "with a 16 x 16 model, their rows/s per phase and peak memory, instead"
        ),
    ] = None,
    scale_dir: Annotated[
        str | None,
        typer.Option("--scale-dir", help="--scale: where its tables go [default: TMPDIR]"),
    ] = None,
    scale_score: Annotated[
        str, typer.Option("--scale-score", help="--scale: more `score` flags, space-separated")
    ] = "",
    quality: Annotated[
        str | None,
        typer.Option(help="'mnist': the one-class MNIST quality protocol instead (see docs/)"),
    ] = None,
    classes: Annotated[str, typer.Option(help="--quality: digits to run, e.g. 0,3,8")] = (
        "0,1,2,3,4,5,6,7,8,9"
    ),
    out: Annotated[str, typer.Option(help="--quality: where quality.json/.md go")] = "quality",
    mnist: Annotated[str | None, typer.Option(help="--quality: MNIST IDX folder")] = None,
    slide: Annotated[
        int | None,
        typer.Option(
            help="SIDE: a generated SIDE x SIDE pyramidal slide ingested at default settings "
            "(peak RSS of every process, ingest vs raw tile decode, its heatmap), instead"
        ),
    ] = None,
    volumes: Annotated[
        bool,
        typer.Option(
            "--volumes",
            help="a 300-slice DICOM series and a 512x512x300 .nii.gz ingested (peak RSS, "
            "order), instead",
        ),
    ] = False,
) -> None:
    """The performance benchmark (or, with --quality mnist, the detection-quality one; with
    --scale, the job at scale; with --slide, a gigapixel slide's ingest; with --volumes,
    volumes' ingest)."""
    if volumes:
        from anogan_batch.evaluation.volume_bench import run_volume_bench

        figures = run_volume_bench(scale_dir)
        _echo(json.dumps(figures, indent=2))
        if json_path is not None:
            json_path.write_text(json.dumps(figures, indent=2) + "\n")
        return
    if slide is not None:
        from anogan_batch.config import check_int
        from anogan_batch.evaluation.slide_bench import run_slide_bench

        check_int("slide", slide, min_value=1024)
        figures = run_slide_bench(slide, scale_dir)
        _echo(json.dumps(figures, indent=2))
        if json_path is not None:
            json_path.write_text(json.dumps(figures, indent=2) + "\n")
        return
    if scale is not None:
        from anogan_batch.errors import ConfigError
        from anogan_batch.evaluation.scale import run_scale

        try:
            sizes = [int(v) for v in scale.split(",")]
        except ValueError:
            sizes = []
        if not sizes or not all(0 < n <= 10**9 for n in sizes):
            raise ConfigError("--scale", scale, "row counts from 1 to 10^9, comma-separated")
        figures = run_scale(sizes, scale_dir, tuple(scale_score.split()))
        if json_path is not None:
            json_path.write_text(json.dumps(figures, indent=2) + "\n")
        return
    if quality is not None:
        from anogan_batch.errors import ConfigError
        from anogan_batch.evaluation.quality import QualityRecipe, run_quality

        if quality != "mnist":
            raise ConfigError("--quality", quality, "the one protocol is 'mnist'")
        try:
            digits = tuple(int(c) for c in classes.split(","))
        except ValueError:
            digits = ()
        if not digits or not all(0 <= d <= 9 for d in digits):
            raise ConfigError("--classes", classes, "digits 0-9, comma-separated")
        tiny = {"epochs": 2, "encoder_epochs": 2}
        recipe = QualityRecipe(train_images=400, test_images=200, train=tiny) if quick else None
        result = run_quality(out, mnist=mnist, classes=digits, recipe=recipe)
        if json_path is not None:
            json_path.write_text(json.dumps(result, indent=2) + "\n")
        return
    from anogan_batch.evaluation.bench import run_bench

    figures = run_bench(quick=quick)
    if json_path is not None:
        json_path.write_text(json.dumps(figures, indent=2) + "\n")
        _echo(f"figures written to {json_path}")


def run(argv: list[str] | None = None) -> int:
    """The command in `argv` -> its exit status: 0 ok, 2 bad usage or input, 1 anything else.

    Typer (standalone mode) turns usage errors into exit 2; a user error from the library
    surfaces here as `AnoganError`, the one place it becomes exit 2. S3 that stays unreachable
    past the retry policy, and a fault of the machine (`MachineError`: a GPU torch cannot use,
    a batch failed on several devices), are exit 1 with a message (a rerun resumes); anything
    else is a bug, exit 1 with its traceback.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("anogan_batch").setLevel(logging.INFO)
    try:
        app(args=argv, prog_name="anogan-batch")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except AnoganError as e:
        typer.echo(redact(f"error: {e}"), err=True)
        return 2
    except Exception as e:
        import traceback

        from anogan_batch.errors import describe_machine_failure
        from anogan_batch.io.s3 import describe_s3_failure

        message = describe_s3_failure(e) or describe_machine_failure(e)
        if message is None:  # a bug: exit 1 with its traceback
            sys.stderr.write(redact(traceback.format_exc()))
            return 1
        typer.echo(redact(f"error: {message}"), err=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> NoReturn:
    """Console entry point: runs the command (native stderr lines that are not news dropped:
    io/native_stderr.py), then ends the process the orderly way (io/exiting.py: exit handlers
    run, no interpreter teardown, so no exit-time hang)."""
    from anogan_batch.io.exiting import leave
    from anogan_batch.io.native_stderr import filter_native_stderr

    filter_native_stderr()
    leave(run(argv))
