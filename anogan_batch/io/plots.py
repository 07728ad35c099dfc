"""Dependency-free figures: PNG image grids (Pillow) and small SVG charts.

SVG keeps the training artefacts and the HTML report self-contained and text-diffable without
pulling in a plotting stack.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from html import escape

import numpy as np

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W) or (H, W, C) float in [0, 1] or uint8 -> PNG bytes."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def image_grid(images: np.ndarray, columns: int = 8, pad: int = 2) -> np.ndarray:
    """(N, H, W, C) in [0, 1] -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image."""
    n, h, w, c = images.shape
    rows = max(1, -(-n // columns))
    grid = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def _scale(values: Sequence[float], lo: float, hi: float, out_lo: float, out_hi: float):
    span = (hi - lo) or 1.0
    return [out_lo + (v - lo) / span * (out_hi - out_lo) for v in values]


def line_chart_svg(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    width: int = 560,
    height: int = 320,
    diagonal: bool = False,
) -> str:
    """An SVG line chart of named (xs, ys) series; `diagonal` draws y = x (for ROC curves)."""
    left, right, top, bottom = 56, 16, 28, 40
    all_x = [float(v) for xs, _ in series.values() for v in xs] or [0.0, 1.0]
    all_y = [float(v) for _, ys in series.values() for v in ys if np.isfinite(v)] or [0.0, 1.0]
    x0, x1 = min(all_x), max(all_x)
    y0, y1 = min(all_y), max(all_y)
    if diagonal:
        x0, x1, y0, y1 = 0.0, 1.0, 0.0, 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{width - left - right}" '
        f'height="{height - top - bottom}" fill="none" stroke="#999"/>',
        f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle">{escape(xlabel)}</text>',
        f'<text x="12" y="{height / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {height / 2})">{escape(ylabel)}</text>',
    ]
    for v, label in ((y0, y0), (y1, y1)):
        (py,) = _scale([v], y0, y1, height - bottom, top)
        parts.append(f'<text x="{left - 4}" y="{py + 4}" text-anchor="end">{label:.3g}</text>')
    for v in (x0, x1):
        (px,) = _scale([v], x0, x1, left, width - right)
        parts.append(
            f'<text x="{px}" y="{height - bottom + 14}" text-anchor="middle">{v:.3g}</text>'
        )
    if diagonal:
        parts.append(
            f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{top}" '
            'stroke="#bbb" stroke-dasharray="4 3"/>'
        )
    for i, (name, (xs, ys)) in enumerate(series.items()):
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if np.isfinite(y)]
        if not pts:
            continue
        # Long series (thousands of steps) are thinned to ~800 points: the eye sees no more.
        step = max(1, len(pts) // 800)
        pts = pts[::step] + ([pts[-1]] if (len(pts) - 1) % step else [])
        px = _scale([p[0] for p in pts], x0, x1, left, width - right)
        py = _scale([p[1] for p in pts], y0, y1, height - bottom, top)
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px, py, strict=True))
        color = PALETTE[i % len(PALETTE)]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        parts.append(
            f'<text x="{left + 8}" y="{top + 14 + 13 * i}" fill="{color}">{escape(name)}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def histogram_svg(
    groups: dict[str, np.ndarray],
    *,
    title: str,
    xlabel: str,
    bins: int = 40,
    marker: tuple[str, float] | None = None,
) -> str:
    """Overlaid step histograms (densities) of several groups, e.g. scores by label;
    `marker` (name, x) draws a vertical line, e.g. a decision threshold."""
    values = [np.asarray(v, dtype=np.float64) for v in groups.values() if len(v)]
    if not values:
        return line_chart_svg({}, title=title, xlabel=xlabel, ylabel="density")
    lo = min(float(v.min()) for v in values)
    hi = max(float(v.max()) for v in values)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    series = {}
    for name, v in groups.items():
        if not len(v):
            continue
        counts, _ = np.histogram(v, bins=edges, density=True)
        xs = np.repeat(edges, 2)[1:-1]
        ys = np.repeat(counts, 2)
        series[f"{name} (n={len(v)})"] = (xs.tolist(), ys.tolist())
    if marker is not None and series:
        top = max(max(ys) for _, ys in series.values())
        series[marker[0]] = ([marker[1], marker[1]], [0.0, top])
    return line_chart_svg(series, title=title, xlabel=xlabel, ylabel="density")
