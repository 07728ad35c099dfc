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

from anogan_batch.core.model_config import TrainConfig
from anogan_batch.core.search_config import SearchConfig
from anogan_batch.errors import AnoganError, ConfigError, redact
from anogan_batch.flags import configured
from anogan_batch.job.ingest_config import IngestConfig
from anogan_batch.job.score_config import ScoreJobConfig
from anogan_batch.warehouse.target import WarehouseTarget

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


def _echo(msg: str) -> None:
    typer.echo(msg)


@app.command()
@configured(cfg=IngestConfig)
def ingest(
    src: _path("SRC", "folder (or s3:// prefix) of scan files"),
    out: _path("OUT", "patch table to write (Parquet dataset)"),
    cfg: IngestConfig,
) -> None:
    """Cut every scan under SRC into P x P patches and write a patch table to OUT.

    Formats: PNG/JPEG (8/16-bit), TIFF (multi-page; tiled and pyramidal slides, SVS, NDPI,
    OME-TIFF read by region), NPY (2-D, or 3-D volumes), DICOM, NIfTI.
    """
    from anogan_batch.job.ingest import ingest as run_ingest

    s = run_ingest(src, out, cfg)
    _echo(
        f"ingested {s.files} files: {s.scans} scans -> {s.patches} patches in {out} "
        f"({s.skipped_patches} patches below --min-foreground skipped, "
        f"{s.quarantined} files or slices quarantined; {s.engine}, {s.seconds:.1f} s)"
    )


@app.command()
@configured(cfg=TrainConfig)
def train(
    patches: _path("PATCHES", "patch table to train on"),
    model_dir: _path("MODEL_DIR", "where to write the model"),
    cfg: TrainConfig,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Train the GAN on normal patches (only rows whose label is L when given), then score
    the held-out normal scans as the model's calibration."""
    from anogan_batch.core.training import train_gan

    model_id = train_gan(patches, model_dir, cfg, progress=progress)
    _echo(f"model {model_id} written to {model_dir}")


@app.command()
@configured(search=SearchConfig)
def calibrate(
    model_dir: _path("MODEL_DIR", "trained model to (re)calibrate"),
    patches: _path("PATCHES", "patch table of this site's normal patches"),
    search: SearchConfig,
    normal_label: Annotated[
        str | None, typer.Option("--normal-label", help="use only rows with this label")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda ...  [default: CUDA when present, else CPU]")
    ] = None,
) -> None:
    """Score a site's normal patches and store them as the model's calibration for one
    search (score's default unless its flags say otherwise): the weights and model_id stay."""
    from anogan_batch.core.calibrating import calibrate as run_calibrate

    r = run_calibrate(model_dir, patches, normal_label=normal_label, search=search, device=device)
    _echo(
        f"calibration {r['calibration_id']} of model {model_dir}: {r['n']} normal patches "
        f"for search {r['search_key']}"
    )


@app.command()
@configured(cfg=ScoreJobConfig)
def score(cfg: ScoreJobConfig) -> None:
    """The distributed scoring job: latent mapping of every patch on Ray actors."""
    from anogan_batch.job.runner import run_score_job

    m = run_score_job(cfg)
    _echo(
        f"job {m.job_id} {m.status}: {m.scored_rows} scored, {m.quarantined_rows} quarantined"
        f"{f', {m.skipped_rows} skipped (published)' if m.skipped_rows else ''} "
        f"of {m.input_rows} rows ({m.patches_per_second or 0:.2f} patches/s); outputs in {cfg.out}"
    )
    if m.scored_rows == 0 and m.quarantined_rows > 0:
        from anogan_batch.job.runner import first_quarantine_reason

        raise AnoganError(
            f"no row of '{cfg.patches}' could be scored: all {m.quarantined_rows} rows are in "
            f"{cfg.out}/quarantine; first reason: {first_quarantine_reason(cfg.out)}"
        )


@app.command()
@configured(target=WarehouseTarget)
def publish(
    out: _path("OUT", "a finished job's output folder"),
    target: WarehouseTarget,
    to: Annotated[str, typer.Option(help="iceberg, or delta (tables under --warehouse)")] = (
        "iceberg"
    ),
) -> None:
    """Append a finished job to long-lived warehouse tables (patch_scores, scan_scores,
    quarantine, jobs): Iceberg in a catalog, or Delta under WAREHOUSE; a job already there is
    not added again."""
    if to == "delta":
        from anogan_batch.warehouse.delta_tables import append_job_to_delta

        done = append_job_to_delta(out, target)
    elif to == "iceberg":
        from anogan_batch.warehouse.iceberg_tables import append_job_to_iceberg

        done = append_job_to_iceberg(out, target)
    else:
        raise ConfigError("--to", to, "iceberg or delta")
    for table, rows in done.items():
        appended = rows if isinstance(rows, str) else f"{rows} rows appended"
        _echo(f"{target.namespace}.{target.table(table)}: {appended}")


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
        from anogan_batch.evaluation.slide_bench import run_slide_bench
        from anogan_batch.fields import check_int

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
