"""`anogan-batch bench --scale N[,N...]`: the real job at N rows, and what it holds as it grows.

For each N: a synthetic patch table (16 x 16 patches cut from real digits, SCAN_PATCHES patches
a scan, written file by file so that the table is never in memory), a tiny real model (G, D
and E of width 8, BatchNorm statistics from a few passes: a trained model's costs), then as
their own processes, as users run them:

- `anogan-batch score` at score's defaults (heatmaps on) but `--batch-size 1024`, on a local
  Ray: rows/s of each phase from job.json (check ids, resume, score, scans, decide);
- `anogan-batch publish --to delta` and `--to iceberg` into fresh warehouses.

Memory: the `score` driver's peak RSS is its own getrusage figure (job.json); the other
processes (a `publish` command, Ray's workers, named `ray::<task>`; the Delta child) are
sampled every SAMPLE_S seconds, and the largest peak below a command is reported with its
name, both as RSS and as private memory (RSS less shared pages: a Ray worker's RSS also counts
the object store's pages it wrote or read, which the store bounds). A figure, not a test:
nothing here asserts a speed or a size (docs/performance.md keeps the results).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from anogan_batch.io.columns import X, Y

SIZE = 16  # patch side of the scale model: the smallest a DCGAN here has
SCAN_PATCHES = 1_024  # patches a scan (a 32 x 32 grid of patches)
FILE_ROWS = 250_000  # rows a Parquet file of the synthetic table
SAMPLE_S = 0.25  # how often the other processes' memory is sampled
SCORE_FLAGS = ("--batch-size", "1024", "--no-progress")
SCORE_PHASES = ("check_ids", "resume", "score", "scans", "scans_and_heatmaps", "decide")


def run_scale(
    sizes: list[int], work: str | None = None, score_flags: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The figures of `score` (SCORE_FLAGS, then `score_flags`) and `publish` at each size in
    `sizes` (rows)."""
    with tempfile.TemporaryDirectory(prefix="anogan-scale-", dir=work) as tmp:
        model_dir = _write_model(os.path.join(tmp, "model"))
        results = {}
        for rows in sizes:
            folder = os.path.join(tmp, f"n{rows}")
            table = write_synthetic_table(os.path.join(folder, "patches"), rows)
            results[str(rows)] = _measure(model_dir, table, folder, rows, score_flags)
            _print(rows, results[str(rows)])
    return {"scale": results, "scale_ratios": _ratios(results)}


def write_synthetic_table(path: str, rows: int) -> str:
    """`rows` patches in files of FILE_ROWS rows: digits resized to SIZE x SIZE (each made
    unique by a little noise), each scan a
    grid of SCAN_PATCHES patches, labels '0' (scans of even index) and '1'."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from anogan_batch.evaluation.bench import digit_patches
    from anogan_batch.io.patches import patch_id_for
    from anogan_batch.io.tables import patch_table

    digits = digit_patches(512, SIZE)
    side = int(np.sqrt(SCAN_PATCHES))
    os.makedirs(path, exist_ok=True)
    for start in range(0, rows, FILE_ROWS):
        index = np.arange(start, min(rows, start + FILE_ROWS))
        scan, cell = index // SCAN_PATCHES, index % SCAN_PATCHES
        x, y = (cell % side) * SIZE, (cell // side) * SIZE
        scan_ids = [f"scan{s:07d}" for s in scan]
        ids = [
            patch_id_for(s, int(a), int(b), SIZE) for s, a, b in zip(scan_ids, x, y, strict=True)
        ]
        table = patch_table(_unique(digits[index % len(digits)], start),
                            [str(s % 2) for s in scan], ids=ids, scan_ids=scan_ids)  # fmt: skip
        for name, values in ((X, x), (Y, y)):  # patch_table puts a patch at (0, 0)
            table = table.set_column(
                table.schema.get_field_index(name), name, pa.array(values, pa.int32())
            )
        pq.write_table(table, os.path.join(path, f"part-{start // FILE_ROWS:05d}.parquet"))
    return path


def _unique(patches: np.ndarray, seed: int) -> np.ndarray:
    """The patches with a little noise each (0-3 grey levels), as real scans' patches are all
    different: repeated patches dictionary-encode to a few percent of their size, and Ray
    packs its read tasks by that encoded size (docs/performance.md)."""
    rng = np.random.default_rng(seed)
    return np.minimum(patches, 252) + rng.integers(0, 4, patches.shape, dtype=np.uint8)


def _write_model(model_dir: str) -> str:
    from anogan_batch.core.modeldir import save_model
    from anogan_batch.evaluation.bench import bench_model

    cfg, g, d, e = bench_model(SIZE, 8, encoder=True)
    save_model(model_dir, cfg, g, d, {}, encoder=e)
    return model_dir


def _measure(
    model_dir: str, table: str, folder: str, rows: int, flags: tuple[str, ...]
) -> dict[str, Any]:
    from anogan_batch.job.manifest import JobManifest

    out = os.path.join(folder, "job")
    score = _run_sampled(["score", model_dir, table, out, *SCORE_FLAGS, *flags])
    run = JobManifest.load(out).runs[-1]
    phases = run["phase_seconds"]
    figures: dict[str, Any] = {
        "rows": rows,
        "score_flags": [*SCORE_FLAGS, *flags],
        "score_command_seconds": score["seconds"],
        "driver_peak_rss_mb": run["driver_peak_rss_mb"],
        "driver_sampled_peak_rss_mb": score["root_peak_mb"],
        "largest_task_peak_rss_mb": score["largest_peak_mb"],
        "largest_task": score["largest"],
        "largest_task_private_peak_mb": score["largest_private_peak_mb"],
        "largest_private_task": score["largest_private"],
        "phase_seconds": phases,
        "phase_rows_per_s": {p: round(rows / phases[p], 1) for p in SCORE_PHASES if phases.get(p)},
    }
    for to in ("delta", "iceberg"):
        where = ["--warehouse", os.path.join(folder, f"wh-{to}")]
        publish = _run_sampled(["publish", out, "--to", to, *where])
        figures[f"publish_{to}"] = {
            "seconds": publish["seconds"],
            "rows_per_s": round(rows / publish["seconds"], 1),
            "process_peak_rss_mb": publish["root_peak_mb"],
            "largest_child_peak_rss_mb": publish["largest_peak_mb"],
        }
    return figures


def _run_sampled(args: list[str]) -> dict[str, Any]:
    """Run `anogan-batch ARGS` as its own process: its wall time, its sampled peak RSS, and the
    largest sampled peak among the processes below it (Ray's workers, a child), with its name."""
    import psutil

    # Through a shell that forks it: Linux hands a child the high-water RSS of the process it
    # was forked from (kept across exec), so a command started from this process would report
    # this process's memory as its own peak; forked from a small shell, its figure is its own.
    cmd = ["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-m", "anogan_batch", *args]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    peaks: dict[str, float] = {}
    private: dict[str, float] = {}  # RSS less shared pages: a Ray worker's RSS also counts
    done = threading.Event()  # the object store's pages it has touched (its own outputs)
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)

        def sample() -> None:
            root = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    children = root.children(recursive=True)
                except psutil.Error:
                    break
                for child in children:
                    try:
                        name = " ".join(child.cmdline())[:80]
                        info = child.memory_info()
                    except psutil.Error:
                        continue
                    if name.startswith(("ray::", sys.executable)):
                        peaks[name] = max(peaks.get(name, 0.0), info.rss / 2**20)
                        own = (info.rss - info.shared) / 2**20
                        private[name] = max(private.get(name, 0.0), own)
                done.wait(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        if proc.returncode != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"`anogan-batch {args[0]}` failed ({proc.returncode}): {tail}")
    command = " ".join([sys.executable, "-m", "anogan_batch", *args])[:80]
    root = peaks.pop(command, None)  # the command's own process; the others are below it
    private.pop(command, None)
    largest = max(peaks, key=peaks.get) if peaks else None
    largest_private = max(private, key=private.get) if private else None
    return {
        "seconds": round(seconds, 2),
        "root_peak_mb": round(root, 1) if root else None,
        "largest": largest,
        "largest_peak_mb": round(peaks[largest], 1) if largest else None,
        "largest_private": largest_private,
        "largest_private_peak_mb": round(private[largest_private], 1) if private else None,
    }


def _ratios(results: dict[str, Any]) -> dict[str, Any]:
    """The largest size's driver peak over the smallest's (the target: at most 1.2)."""
    if len(results) < 2:
        return {}
    sizes = sorted(results, key=int)
    small, large = results[sizes[0]], results[sizes[-1]]
    return {
        "rows": [int(sizes[0]), int(sizes[-1])],
        "driver_peak_rss": round(large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"], 3),
        "largest_task_peak_rss": round(
            large["largest_task_peak_rss_mb"] / small["largest_task_peak_rss_mb"], 3
        ),
        "largest_task_private_peak": round(
            large["largest_task_private_peak_mb"] / small["largest_task_private_peak_mb"], 3
        ),
    }


def _print(rows: int, figures: dict[str, Any]) -> None:
    print(f"--- {rows:,} rows", flush=True)
    print(json.dumps(figures, indent=2), flush=True)
