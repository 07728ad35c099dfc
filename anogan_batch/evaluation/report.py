"""`anogan-batch report`: one self-contained HTML file about a finished job.

Images are inlined as data: URIs and charts as inline SVG, so the file can be mailed or
archived on its own. `gather` reads what the report shows (small columns and the top-K rows
only: never a whole patch table) into a `ReportData`; `render` turns that into the page.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from html import escape
from typing import Any

import numpy as np

from anogan_batch.errors import InputError
from anogan_batch.io import storage
from anogan_batch.io.columns import (
    ANOMALY_SCORE,
    CHANNELS,
    DISCRIMINATION_SCORE,
    FLAGGED,
    HEIGHT,
    IMAGE,
    JOB_ID,
    LABEL,
    LATENT,
    MAX_SCORE,
    MEAN_SCORE,
    MODEL_ID,
    N_PATCHES,
    P95_SCORE,
    P_VALUE,
    PATCH_ID,
    RESIDUAL_MAP,
    RESIDUAL_SCORE,
    SCAN_ID,
    WIDTH,
    X,
    Y,
)
from anogan_batch.job.layout import JobLayout

TOP_K = 16
TOP_SCANS = 8


def _img(png: bytes, size: int = 84, title: str = "") -> str:
    data = base64.b64encode(png).decode()
    return (
        f'<img src="data:image/png;base64,{data}" width="{size}" height="{size}" '
        f'style="image-rendering:pixelated" title="{escape(title)}" alt="{escape(title)}">'
    )


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return escape("" if v is None else str(v))


def top_patches(out: str, k: int = TOP_K) -> list[dict[str, Any]]:
    """The k most anomalous patches with x, G(z) and |x - G(z)| as PNG bytes."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import torch

    from anogan_batch.core.model import model_input, to_pixel_space
    from anogan_batch.core.modeldir import load_model
    from anogan_batch.io.patches import DTYPES, decode_map
    from anogan_batch.io.plots import png_bytes
    from anogan_batch.io.tables import open_dataset
    from anogan_batch.job.manifest import JobManifest

    manifest = JobManifest.load(out)
    scores = open_dataset(JobLayout(out).patch_scores)
    light = scores.to_table(columns=[PATCH_ID, ANOMALY_SCORE])
    if light.num_rows == 0:
        return []
    order = pc.sort_indices(light, [(ANOMALY_SCORE, "descending")])[:k]
    ids = light.column(PATCH_ID).take(order)
    cols = [
        PATCH_ID,
        SCAN_ID,
        X,
        Y,
        LABEL,
        ANOMALY_SCORE,
        RESIDUAL_SCORE,
        DISCRIMINATION_SCORE,
        RESIDUAL_MAP,
        LATENT,
        HEIGHT,
        WIDTH,
        CHANNELS,
    ]
    rows = scores.to_table(columns=cols, filter=pads.field(PATCH_ID).isin(ids)).to_pylist()
    rows.sort(key=lambda r: -r[ANOMALY_SCORE])

    model = load_model(_model_dir(manifest))
    inputs = open_dataset(manifest.params["patches"]).to_table(
        columns=[PATCH_ID, IMAGE], filter=pads.field(PATCH_ID).isin(ids)
    )
    images = dict(
        zip(inputs.column(PATCH_ID).to_pylist(), inputs.column(IMAGE).to_pylist(), strict=True)
    )
    spec = model.patch_spec
    for r in rows:
        h, w, c = r[HEIGHT], r[WIDTH], r[CHANNELS]
        z = torch.from_numpy(np.frombuffer(r.pop(LATENT), dtype="<f4").copy())[None]
        with torch.no_grad():
            gz = to_pixel_space(model.generator(z))[0].numpy()
        raw_map = r.pop(RESIDUAL_MAP)  # None: scored with --residual-maps none
        raw = images.get(r[PATCH_ID])
        if raw is not None:
            # x as the model reads it (contrast-normalised when the model is), on G(z)'s scale
            x = np.frombuffer(raw, dtype=DTYPES[spec.dtype]).reshape(1, h, w, c)
            x_model = model_input(torch.from_numpy(x.copy()), model.config)
            r["x_png"] = png_bytes(to_pixel_space(x_model)[0].numpy())
        r["gz_png"] = png_bytes(gz)
        if raw_map is not None:
            r["residual_png"] = png_bytes(decode_map(raw_map, h, w, c) / 2.0)  # [0, 2] -> [0, 1]
    return rows


def _heat_legend(manifest) -> str:
    """What the overlay's colours mean, as the job's last run drew them."""
    from anogan_batch.core.calibration import HEAT_QUANTILES

    scale = next((r["overlay_scale"] for r in reversed(manifest.runs) if "overlay_scale" in r),
                 None)  # fmt: skip
    if scale is None:
        return ""
    tinted, full = scale["tinted_from"], scale["full_from"]
    if scale.get("anchored") != "calibration":
        return (
            f"Colours: the smoothed residual on a fixed scale, tinted from {tinted:g} and full "
            f"from {full:g} (model units); the model has no calibrated scale."
        )
    low, high = (f"{100 * q:g} %" for q in HEAT_QUANTILES)
    return (
        f"Colours are anchored in the model's normal patches: a heat-grid cell is tinted where "
        f"its smoothed residual exceeds {low} of normal cells' (from {tinted:.3g}), and at full "
        f"colour above {high} (from {full:.3g}). Normal tissue stays dark."
    )


def _model_dir(manifest) -> str:
    model_dir = manifest.params.get("model_dir")
    if not model_dir:
        raise InputError(f"job {manifest.job_id} does not record its model directory")
    return model_dir


@dataclass
class ReportData:
    """What a report shows of a finished job, gathered from OUT (`gather`); `render` turns
    it into the page."""

    manifest: Any
    metrics: dict[str, Any]
    score_groups: dict[str, np.ndarray]  # label -> anomaly scores
    threshold: tuple[str, float] | None  # (caption, score) of the patch decision, if any
    roc: tuple[str, list[float], list[float]] | None  # (caption, fpr, tpr)
    top: list[dict[str, Any]]  # top_patches
    scan_columns: list[str]
    scans: list[dict[str, Any]]  # the top scans' rows, flagged first
    overlays: list[tuple[str, bytes]]  # (scan_id, overlay PNG) of the first TOP_SCANS
    job_rows: list[dict[str, Any]]
    timing_rows: list[dict[str, Any]]
    phase_names: list[str]
    legend: str


def write_report(out: str, html_path: str | None = None) -> str:
    """Write the report of job OUT to `html_path` (default OUT/report.html); return the path."""
    html_path = html_path or JobLayout(out).report
    storage.write_bytes(html_path, render(gather(out)).encode())
    return html_path


def gather(out: str) -> ReportData:
    """Read what the report shows: small columns and the top rows only."""
    from anogan_batch.job.manifest import JobManifest

    manifest = JobManifest.load(out)
    if manifest is None:
        raise InputError(f"'{out}' holds no job.json: not the OUT of a score job")
    layout = JobLayout(out)
    metrics = storage.read_json(layout.metrics) if storage.exists(layout.metrics) else {}
    scores, labels = _scores_and_labels(layout, metrics)
    groups: dict[str, list[float]] = {}
    for s, lab in zip(scores, labels, strict=True):
        groups.setdefault("(none)" if lab is None else lab, []).append(float(s))
    decisions = manifest.decisions or {}
    threshold = decisions.get("patch_score_threshold")
    scan_columns, scans = _top_scans(layout)
    overlays = []
    for row in scans[:TOP_SCANS]:
        path = layout.overlay(row[SCAN_ID])
        if storage.exists(path):
            overlays.append((row[SCAN_ID], storage.read_bytes(path)))
    return ReportData(
        manifest=manifest,
        metrics=metrics,
        score_groups={k: np.array(v) for k, v in sorted(groups.items())},
        threshold=None if threshold is None else (f"p ≤ {decisions['fpr']} (--fpr)", threshold),
        roc=_roc(scores, labels, metrics),
        top=top_patches(out),
        scan_columns=scan_columns,
        scans=scans,
        overlays=overlays,
        job_rows=_job_rows(manifest, metrics),
        timing_rows=[
            {
                "run": i,
                "started_at": r.get("started_at"),
                "rows": r.get("rows"),
                "seconds": r.get("seconds"),
                **r.get("phase_seconds", {}),
            }
            for i, r in enumerate(manifest.runs)
        ],
        phase_names=sorted({k for r in manifest.runs for k in r.get("phase_seconds", {})}),
        legend=_heat_legend(manifest),
    )


def _scores_and_labels(layout: JobLayout, metrics: dict) -> tuple[np.ndarray, list]:
    """Every patch's score and label (eval's truth, when it used one: the ROC it measured)."""
    from anogan_batch.io.tables import read_columns

    table = read_columns(layout.patch_scores, [ANOMALY_SCORE, LABEL, PATCH_ID])
    scores = table.column(ANOMALY_SCORE).to_numpy()
    labels = (
        table.column(LABEL).to_pylist() if LABEL in table.column_names else [None] * len(scores)
    )
    if metrics.get("truth"):
        from anogan_batch.evaluation.evaluate import read_truth

        truth = read_truth(metrics["truth"])
        ids = table.column(PATCH_ID).to_pylist()
        labels = [truth.get(i, lab) for i, lab in zip(ids, labels, strict=True)]
    return scores, labels


def _roc(scores: np.ndarray, labels: list, metrics: dict):
    if metrics.get("normal_label") is None:
        return None
    from anogan_batch.evaluation.evaluate import roc_curve

    keep = [lab is not None for lab in labels]
    pos = np.array([lab != metrics["normal_label"] for lab in labels])[keep]
    fpr, tpr = roc_curve(scores[keep], pos)
    return f"AUROC {metrics['auroc']:.4f}", fpr.tolist(), tpr.tolist()


def _top_scans(layout: JobLayout) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of the 20 most anomalous scans, flagged ones first (--fdr)."""
    import pyarrow.compute as pc

    from anogan_batch.io.tables import read_columns, table_columns

    columns = [SCAN_ID, LABEL, N_PATCHES, MAX_SCORE, MEAN_SCORE, P95_SCORE]
    scan_dir = layout.scan_scores
    if not (storage.is_dir(scan_dir) or storage.exists(scan_dir)):
        return columns, []
    decided = [c for c in (P_VALUE, FLAGGED) if c in table_columns(scan_dir)]
    scans = read_columns(scan_dir, columns + decided)
    order = [(MAX_SCORE, "descending")]
    if FLAGGED in decided:
        scans = scans.append_column("_flag", pc.fill_null(scans.column(FLAGGED), False))
        order = [("_flag", "descending"), *order]
    return columns + decided, scans.sort_by(order).slice(0, 20).to_pylist()


def _job_rows(manifest, metrics: dict) -> list[dict[str, Any]]:
    decisions = manifest.decisions or {}
    return [
        {"key": k, "value": v}
        for k, v in (
            (JOB_ID, manifest.job_id),
            ("status", manifest.status),
            (MODEL_ID, manifest.model_id),
            (
                "input / scored / quarantined",
                f"{manifest.input_rows} / {manifest.scored_rows} / {manifest.quarantined_rows}",
            ),
            ("started / finished", f"{manifest.started_at} / {manifest.finished_at}"),
            ("patches per second", manifest.patches_per_second),
            *((f"param {k}", v) for k, v in manifest.params.items()),
            *((f"decision {k}", v) for k, v in decisions.items()),
            *((f"drift {k}", v) for k, v in (manifest.drift or {}).items()),
            *((f"metric {k}", v) for k, v in metrics.items() if not isinstance(v, dict)),
            *((f"scan metric {k}", v) for k, v in metrics.get("scan", {}).items()),
        )
    ]


def render(data: ReportData) -> str:
    """The report's page: self-contained HTML (images inlined, charts as SVG)."""
    from anogan_batch.io.plots import histogram_svg, line_chart_svg

    hist = histogram_svg(data.score_groups, title="anomaly score by label",
                         xlabel=ANOMALY_SCORE, marker=data.threshold)  # fmt: skip
    roc = ""
    if data.roc is not None:
        caption, fpr, tpr = data.roc
        roc = line_chart_svg({caption: (fpr, tpr)}, title="ROC (patches)",
                             xlabel="false positive rate", ylabel="true positive rate",
                             diagonal=True)  # fmt: skip
    top_rows = "".join(
        f"<tr><td>{escape(r['patch_id'])}</td><td>{_fmt(r['label'])}</td>"
        f"<td>{r['anomaly_score']:.4g}</td>"
        f"<td>{_img(r['x_png'], title='x') if 'x_png' in r else ''}</td>"
        f"<td>{_img(r['gz_png'], title='G(z)')}</td>"
        f"<td>{_img(r['residual_png'], title='residual') if 'residual_png' in r else ''}</td></tr>"
        for r in data.top
    )
    scans_html = ""
    if data.scans:
        figures = "".join(
            f"<figure>{_img(png, size=224, title=scan_id)}"
            f"<figcaption>{escape(scan_id)}</figcaption></figure>"
            for scan_id, png in data.overlays
        )
        overlays = f'<div class="charts" id="top-scans">{figures}</div>' if figures else ""
        scans_html = overlays + _table(data.scans, data.scan_columns)
    job_id = escape(data.manifest.job_id)
    timings = _table(data.timing_rows, ["run", "started_at", "rows", "seconds", *data.phase_names])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>anogan-batch job {job_id}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ddd; padding: 4px 8px; text-align: left; font-size: 13px; }}
th {{ background: #f4f4f4; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 1em; }}
</style></head><body>
<h1>anogan-batch job {job_id}</h1>
<h2>Job</h2>{_table(data.job_rows, ["key", "value"])}
<h2>Timings (seconds per phase, per run)</h2>
{timings}
<h2>Scores</h2><div class="charts">{hist}{roc}</div>
<h2>Top {len(data.top)} anomalous patches</h2>
<p>x, its closest generated patch G(z), and the residual |x − G(z)| (bright = anomalous).</p>
<table id="top-patches"><thead><tr><th>patch_id</th><th>label</th><th>anomaly_score</th>
<th>x</th><th>G(z)</th><th>residual</th></tr></thead><tbody>{top_rows}</tbody></table>
<h2>Top scans</h2>
<p>Heatmap overlays of the most anomalous scans. {escape(data.legend)}
</p>{scans_html}
</body></html>
"""
