"""`anogan-batch report`: one self-contained HTML file about a finished job.

Images are inlined as data: URIs and charts as inline SVG, so the file can be mailed or
archived on its own. Only small columns and the top-K rows are read; the report never loads a
whole patch table.
"""

from __future__ import annotations

import base64
from html import escape
from typing import Any

import numpy as np

from anogan_batch.errors import InputError
from anogan_batch.io import storage
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
    light = scores.to_table(columns=["patch_id", "anomaly_score"])
    if light.num_rows == 0:
        return []
    order = pc.sort_indices(light, [("anomaly_score", "descending")])[:k]
    ids = light.column("patch_id").take(order)
    cols = [
        "patch_id",
        "scan_id",
        "x",
        "y",
        "label",
        "anomaly_score",
        "residual_score",
        "discrimination_score",
        "residual_map",
        "latent",
        "height",
        "width",
        "channels",
    ]
    rows = scores.to_table(columns=cols, filter=pads.field("patch_id").isin(ids)).to_pylist()
    rows.sort(key=lambda r: -r["anomaly_score"])

    model = load_model(_model_dir(manifest))
    inputs = open_dataset(manifest.params["patches"]).to_table(
        columns=["patch_id", "image"], filter=pads.field("patch_id").isin(ids)
    )
    images = dict(
        zip(inputs.column("patch_id").to_pylist(), inputs.column("image").to_pylist(), strict=True)
    )
    spec = model.patch_spec
    for r in rows:
        h, w, c = r["height"], r["width"], r["channels"]
        z = torch.from_numpy(np.frombuffer(r.pop("latent"), dtype="<f4").copy())[None]
        with torch.no_grad():
            gz = to_pixel_space(model.generator(z))[0].numpy()
        raw_map = r.pop("residual_map")  # None: scored with --residual-maps none
        raw = images.get(r["patch_id"])
        if raw is not None:
            # x as the model reads it (contrast-normalised when the model is), on G(z)'s scale
            x = np.frombuffer(raw, dtype=DTYPES[spec.dtype]).reshape(1, h, w, c)
            x_model = model_input(torch.from_numpy(x.copy()), model.config)
            r["x_png"] = png_bytes(to_pixel_space(x_model)[0].numpy())
        r["gz_png"] = png_bytes(gz)
        if raw_map is not None:
            r["residual_png"] = png_bytes(decode_map(raw_map, h, w, c) / 2.0)  # [0, 2] -> [0, 1]
    return rows


def _overlays(out: str, scan_ids: list[str]) -> str:
    """The overlay PNGs of these scans (from OUT/overlays), inlined, with captions."""
    from anogan_batch.job.layout import JobLayout

    cells = []
    for scan_id in scan_ids:
        path = JobLayout(out).overlay(scan_id)
        if storage.exists(path):
            img = _img(storage.read_bytes(path), size=224, title=scan_id)
            cells.append(f"<figure>{img}<figcaption>{escape(scan_id)}</figcaption></figure>")
    return f'<div class="charts" id="top-scans">{"".join(cells)}</div>' if cells else ""


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
        f"Colours are anchored in the model's normal patches: a pixel is tinted where its "
        f"smoothed residual exceeds {low} of normal pixels' (from {tinted:.3g}), and at full "
        f"colour above {high} (from {full:.3g}). Normal tissue stays dark."
    )


def _model_dir(manifest) -> str:
    model_dir = manifest.params.get("model_dir")
    if not model_dir:
        raise InputError(f"job {manifest.job_id} does not record its model directory")
    return model_dir


def write_report(out: str, html_path: str | None = None) -> str:
    """Write the report of job OUT to `html_path` (default OUT/report.html); return the path."""
    import pyarrow.compute as pc

    from anogan_batch.evaluation.evaluate import roc_curve
    from anogan_batch.io.plots import histogram_svg, line_chart_svg
    from anogan_batch.io.tables import read_columns, table_columns
    from anogan_batch.job.manifest import JobManifest

    manifest = JobManifest.load(out)
    if manifest is None:
        raise InputError(f"'{out}' holds no job.json: not the OUT of a score job")
    layout = JobLayout(out)
    html_path = html_path or layout.report
    metrics = {}
    if storage.exists(layout.metrics):
        metrics = storage.read_json(layout.metrics)
    table = read_columns(layout.patch_scores, ["anomaly_score", "label", "patch_id"])
    scores = table.column("anomaly_score").to_numpy()
    labels = (
        table.column("label").to_pylist() if "label" in table.column_names else [None] * len(scores)
    )
    if metrics.get("truth"):  # eval's labels, so that the ROC here is the one it measured
        from anogan_batch.evaluation.evaluate import read_truth

        truth = read_truth(metrics["truth"])
        ids = table.column("patch_id").to_pylist()
        labels = [truth.get(i, lab) for i, lab in zip(ids, labels, strict=True)]
    groups: dict[str, list[float]] = {}
    for s, lab in zip(scores, labels, strict=True):
        groups.setdefault("(none)" if lab is None else lab, []).append(float(s))
    decisions = manifest.decisions or {}
    threshold = decisions.get("patch_score_threshold")
    hist = histogram_svg(
        {k: np.array(v) for k, v in sorted(groups.items())},
        title="anomaly score by label",
        xlabel="anomaly_score",
        marker=None if threshold is None else (f"p ≤ {decisions['fpr']} (--fpr)", threshold),
    )
    roc = ""
    if metrics.get("normal_label") is not None:
        keep = [lab is not None for lab in labels]
        pos = np.array([lab != metrics["normal_label"] for lab in labels])[keep]
        fpr, tpr = roc_curve(scores[keep], pos)
        roc = line_chart_svg(
            {f"AUROC {metrics['auroc']:.4f}": (fpr.tolist(), tpr.tolist())},
            title="ROC (patches)",
            xlabel="false positive rate",
            ylabel="true positive rate",
            diagonal=True,
        )

    top = top_patches(out)
    top_rows = "".join(
        f"<tr><td>{escape(r['patch_id'])}</td><td>{_fmt(r['label'])}</td>"
        f"<td>{r['anomaly_score']:.4g}</td>"
        f"<td>{_img(r['x_png'], title='x') if 'x_png' in r else ''}</td>"
        f"<td>{_img(r['gz_png'], title='G(z)')}</td>"
        f"<td>{_img(r['residual_png'], title='residual') if 'residual_png' in r else ''}</td></tr>"
        for r in top
    )
    scans_html = ""
    scan_dir = layout.scan_scores
    if storage.is_dir(scan_dir) or storage.exists(scan_dir):
        columns = ["scan_id", "label", "n_patches", "max_score", "mean_score", "p95_score"]
        decided = [c for c in ("p_value", "flagged") if c in table_columns(scan_dir)]
        scans = read_columns(scan_dir, columns + decided)
        order = [("max_score", "descending")]
        if "flagged" in decided:  # flagged scans first (--fdr), then by score
            scans = scans.append_column("_flag", pc.fill_null(scans.column("flagged"), False))
            order = [("_flag", "descending"), *order]
        scans = scans.sort_by(order).slice(0, 20).to_pylist()
        scans_html = _table(scans, columns + decided)
        scans_html = _overlays(out, [r["scan_id"] for r in scans[:TOP_SCANS]]) + scans_html
    job_rows = [
        {"key": k, "value": v}
        for k, v in (
            ("job_id", manifest.job_id),
            ("status", manifest.status),
            ("model_id", manifest.model_id),
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
    timing_rows = [
        {"run": i, "started_at": r.get("started_at"), "rows": r.get("rows"),
         "seconds": r.get("seconds"), **r.get("phase_seconds", {})}
        for i, r in enumerate(manifest.runs)
    ]  # fmt: skip
    phase_names = sorted({k for r in manifest.runs for k in r.get("phase_seconds", {})})
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>anogan-batch job {escape(manifest.job_id)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ddd; padding: 4px 8px; text-align: left; font-size: 13px; }}
th {{ background: #f4f4f4; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 1em; }}
</style></head><body>
<h1>anogan-batch job {escape(manifest.job_id)}</h1>
<h2>Job</h2>{_table(job_rows, ["key", "value"])}
<h2>Timings (seconds per phase, per run)</h2>
{_table(timing_rows, ["run", "started_at", "rows", "seconds", *phase_names])}
<h2>Scores</h2><div class="charts">{hist}{roc}</div>
<h2>Top {len(top)} anomalous patches</h2>
<p>x, its closest generated patch G(z), and the residual |x − G(z)| (bright = anomalous).</p>
<table id="top-patches"><thead><tr><th>patch_id</th><th>label</th><th>anomaly_score</th>
<th>x</th><th>G(z)</th><th>residual</th></tr></thead><tbody>{top_rows}</tbody></table>
<h2>Top scans</h2>
<p>Heatmap overlays of the most anomalous scans. {escape(_heat_legend(manifest))}
</p>{scans_html}
</body></html>
"""
    storage.write_bytes(html_path, page.encode())
    return html_path
