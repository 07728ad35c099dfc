"""`anogan-batch bench --slide SIDE`: a generated SIDE x SIDE RGB pyramidal tiled TIFF (about a
third tissue, JPEG tiles) ingested at default settings, as its own `anogan-batch ingest`
process: every process's peak RSS, the ingest's level-0 pixels per second against tifffile's
raw decode of the same tiles in this run, and its heatmap (grid and overlay) from heat cells
of every patch, with that process's peak RSS. Figures in docs/performance.md.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from anogan_batch.io.columns import (
    ANOMALY_SCORE,
    CELL,
    GRID_HEIGHT,
    GRID_WIDTH,
    HEAT,
    HEATMAP,
    LABEL,
    PATCH_ID,
    SCAN_ID,
    THUMB,
    X,
    Y,
)
from anogan_batch.io.patches import INGEST_RECORD

TILE = 256
PATCH = 256
GLASS = (236, 234, 238)


def run_slide_bench(side: int, folder: str | None = None) -> dict[str, Any]:
    """The figures for one generated slide of `side` pixels a side (module docstring)."""
    from anogan_batch.evaluation.scale import _run_sampled

    root = tempfile.mkdtemp(prefix="anogan-slide-", dir=folder)
    slides = os.path.join(root, "slides")
    os.makedirs(slides)
    path = os.path.join(slides, "slide.tif")
    started = time.perf_counter()
    write_slide(path, side)
    figures: dict[str, Any] = {
        "side": side,
        "file_gb": round(os.path.getsize(path) / 2**30, 2),
        "generate_seconds": round(time.perf_counter() - started, 1),
    }
    figures["raw_decode"] = raw_decode_rate(path)
    out = os.path.join(root, "patches")
    run = _run_sampled(["ingest", slides, out, "--patch-size", str(PATCH)])
    with open(os.path.join(out, INGEST_RECORD)) as f:
        summary = json.load(f)
    pixels = summary["patches"] * PATCH * PATCH
    figures["ingest"] = {
        **run,
        "patches": summary["patches"],
        "engine": summary["engine"],
        "pixels_per_s": round(pixels / run["seconds"]),
    }
    figures["ingest_vs_raw_decode"] = round(
        figures["ingest"]["pixels_per_s"] / figures["raw_decode"]["pixels_per_s"], 3
    )
    figures[HEATMAP] = heatmap_figures(out, root)
    return figures


def write_slide(path: str, side: int) -> None:
    """A side x side RGB slide: JPEG tiles of 256, levels halving down to under 2,048 pixels
    a side (SubIFDs), 0.25 µm per pixel; tissue in two ellipses (about a third), glass
    elsewhere, textured from a few prepared tiles so that writing is fast."""
    import tifffile

    rng = np.random.default_rng(0)
    textures = [
        np.clip(np.array([170, 80, 160]) + rng.normal(0, 22, (TILE, TILE, 3)), 0, 255).astype(
            np.uint8
        )
        for _ in range(8)
    ]
    glass = np.empty((TILE, TILE, 3), np.uint8)
    glass[:] = GLASS
    levels = max(1, math.ceil(math.log2(side / 2048)) + 1)

    def tiles(size: int):
        n = math.ceil(size / TILE)
        yy = (np.arange(TILE)[:, None] + 0.5) / size
        xx = (np.arange(TILE)[None, :] + 0.5) / size
        for ty in range(n):
            for tx in range(n):
                y, x = yy + ty * TILE / size, xx + tx * TILE / size
                mask = _tissue(y, x)
                if not mask.any():
                    yield glass
                    continue
                tile = glass.copy()
                tile[mask] = textures[(ty * 7 + tx) % len(textures)][mask]
                yield tile

    options = {"tile": (TILE, TILE), "compression": "jpeg", "compressionargs": {"level": 85},
               "photometric": "rgb"}  # fmt: skip
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(tiles(side), shape=(side, side, 3), dtype=np.uint8, subifds=levels - 1,
                 resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER",
                 **options)  # fmt: skip
        for k in range(1, levels):
            size = math.ceil(side / 2**k)
            tw.write(tiles(size), shape=(size, size, 3), dtype=np.uint8, subfiletype=1,
                     **options)  # fmt: skip


def _tissue(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Tissue at relative (y, x) in [0, 1]: two ellipses, about a third of the slide."""
    one = ((y - 0.5) / 0.42) ** 2 + ((x - 0.33) / 0.22) ** 2 < 1
    two = ((y - 0.35) / 0.2) ** 2 + ((x - 0.78) / 0.14) ** 2 < 1
    return one | two


def raw_decode_rate(path: str) -> dict[str, Any]:
    """tifffile decoding every level-0 tile of `path`, one thread: pixels per second."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[0].keyframe
        decode = page.decode  # built on first access, which moves the file's position
        fh = tif.filehandle
        started = time.perf_counter()
        pixels = 0
        for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts,
                                                    strict=True)):  # fmt: skip
            fh.seek(offset)
            data = fh.read(count)
            tile, _, _ = decode(data, index, jpegtables=page.jpegtables)
            pixels += tile.shape[-3] * tile.shape[-2]
        seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 1), "pixels_per_s": round(pixels / seconds), "threads": 1}


HEATMAP_SCRIPT = """
import sys
from anogan_batch.job.aggregate import write_scan_tables
from anogan_batch.job.raykit import connect_ray
connect_ray()
rows = int(sys.argv[4])
print(write_scan_tables(sys.argv[1], sys.argv[2], heatmaps=(int(sys.argv[3]), 3), rows=rows))
"""


def heatmap_figures(patches: str, root: str) -> dict[str, Any]:
    """The slide's heatmap from heat cells at every patch (a job's patch_scores without the
    scoring: the same columns, the patches' own positions), as its own process."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from anogan_batch.core.calibration import heat_cell

    out = os.path.join(root, "job")
    target = os.path.join(out, "patch_scores", "job_id=bench")
    os.makedirs(target)
    g = PATCH // heat_cell(PATCH)
    rng = np.random.default_rng(0)
    source = pads.dataset(patches, format="parquet")
    rows = source.count_rows()
    for k, batch in enumerate(source.to_batches(columns=[PATCH_ID, SCAN_ID, X, Y],
                                                batch_size=65_536)):  # fmt: skip
        n = batch.num_rows
        heat = rng.random((n, g * g), dtype=np.float32).astype("<f2")
        thumb = rng.integers(0, 256, (n, g * g * 3), dtype=np.uint8)
        table = pa.table({
            **{c: batch.column(c) for c in (PATCH_ID, SCAN_ID, X, Y)},
            ANOMALY_SCORE: pa.array(rng.random(n)),
            LABEL: pa.nulls(n, pa.string()),
            HEAT: pa.array([h.tobytes() for h in heat], pa.binary()),
            THUMB: pa.array([t.tobytes() for t in thumb], pa.binary()),
        })  # fmt: skip
        pq.write_table(table, os.path.join(target, f"part-{k:04d}.parquet"))
    started = time.perf_counter()
    run = _sampled_python(HEATMAP_SCRIPT, out, patches, str(PATCH), str(rows))
    (row,) = pq.read_table(os.path.join(out, "heatmaps")).to_pylist()
    grid = {k: row[k] for k in (CELL, GRID_HEIGHT, GRID_WIDTH)}
    return {"seconds": round(time.perf_counter() - started, 1), "patches": rows, **grid, **run}


def _sampled_python(script: str, *args: str) -> dict[str, Any]:
    """Peak RSS of `python -c script args` and of the processes below it (Ray's workers):
    the largest, with its name."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", script, *args])
    peaks: dict[str, float] = {}
    while proc.poll() is None:
        try:
            root = psutil.Process(proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for p in tree:
            try:
                name = "driver" if p.pid == proc.pid else " ".join(p.cmdline())[:60]
                peaks[name] = max(peaks.get(name, 0.0), p.memory_info().rss / 2**20)
            except psutil.Error:
                continue
        time.sleep(0.2)
    if proc.wait():
        raise RuntimeError(f"the heatmap process failed ({proc.returncode})")
    largest = max(peaks, key=peaks.get)
    return {
        "largest_process": largest.strip(),
        "largest_process_peak_rss_mb": round(peaks[largest], 1),
        "driver_peak_rss_mb": round(peaks.get("driver", 0.0), 1),
    }
