"""`anogan-batch bench`: throughput figures of the latent search and of the Ray job.

Measured in one run, on one model and one set of patches (real MNIST digits from the bundled
sample, resized to the model's patch size):

- batched: the product's batched search, patches/s in process;
- loop: the per-patch way of public implementations (one z, one optimiser, one patch at a
  time), same G, D and Γ; `batched_vs_loop` is the ratio;
- job: the end-to-end `score` job on a local Ray; `job_vs_inprocess` = job ÷ in-process
  scorer (same rows, batch size and threads), at score's defaults (a model with an encoder:
  start at E(x), then the 10-step polish); `job_vs_inprocess_gamma<N>` is the same for the
  random-start search of Γ = N that the other figures use;
- flop_efficiency: the batched search's FLOP/s (FLOPs of one step counted by
  torch.utils.flop_counter, times the steps) ÷ dense fp32 matmul FLOP/s measured in the same
  run; `loop_flop_efficiency` is the same for the per-patch loop, and bounds what batching can
  ever gain (batched_vs_loop <= 1 / loop_flop_efficiency);
- geval_reduction: on the demo's one-class MNIST validation split (bundled model, held-out
  digits, 0 normal), G evaluations per patch of the paper's 500-step search ÷ those of the
  cheapest fast search whose AUROC is no more than 0.5 points below it;
- peak_rss_ratio_10x: peak memory of driver and actors at 10x the patches ÷ at 1x.

Timings are figures, not tests: nothing here asserts a speed.
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import tempfile
import time
from dataclasses import replace
from typing import Any

import numpy as np

from anogan_batch.io.columns import PATCH_ID, REASON


def bench_model(size: int, width: int, seed: int = 0, encoder: bool = False):
    """A DCGAN at its initialisation with BatchNorm statistics from a few train-mode passes,
    and an encoder E when asked (else None): -> cfg, g, d, e. Costs are a trained model's.
    As saved: `LoadedModel.for_scoring` readies them for scoring."""
    import torch

    from anogan_batch.core.model import build_encoder, build_models, freeze
    from anogan_batch.core.model_config import ModelConfig, TrainConfig

    torch.manual_seed(seed)
    # train's feature layer, so that the search measured is the one a trained model runs
    layer = TrainConfig.feature_layer
    cfg = ModelConfig(
        image_size=size, g_width=width, d_width=width, feature_layer=layer, encoder=encoder
    )
    g, d = build_models(cfg)
    e = build_encoder(cfg) if encoder else None
    with torch.no_grad():
        for _ in range(3):
            fake = g(torch.rand(32, cfg.latent_dim) * 2 - 1)
            d(fake)
            if e is not None:
                e(fake)
    freeze(*[n for n in (g, d, e) if n is not None])
    return cfg, g, d, e


def digit_patches(n: int, size: int) -> np.ndarray:
    """n real digits from the bundled sample, resized to size x size, uint8 (n, S, S, 1)."""
    from PIL import Image

    from anogan_batch.evaluation.demo import load_sample

    digits = load_sample()["test_images"]
    out = np.empty((n, size, size, 1), np.uint8)
    for i in range(n):
        img = Image.fromarray(digits[i % len(digits)]).resize((size, size), Image.BILINEAR)
        out[i, :, :, 0] = np.asarray(img)
    return out


HOST_REPEATS = 9  # batches timed for host_patches_per_s


def _rate(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def run_bench(*, quick: bool = False) -> dict[str, Any]:
    """Run the benchmark and return its figures (also printed as a table)."""
    import ray
    import torch

    from anogan_batch.core.model import to_model_space
    from anogan_batch.core.modeldir import LoadedModel
    from anogan_batch.core.search import latent_search
    from anogan_batch.core.search_config import SearchConfig

    size, width = (28, 8) if quick else (64, 64)
    iterations = 5 if quick else 100
    batch = 16 if quick else 64
    n_loop = 2 if quick else 4
    # the job's fixed start-up (actor start, model load, pipeline start) is paid once per job:
    # enough batches amortise it as a real archive would (docs/performance.md)
    n_job, n_job_default = (32, 32) if quick else (512, 2048)
    cfg, g, d, _ = bench_model(size, width)
    # G and D as a scorer holds them (BatchNorm folded, channels_last); g itself stays
    # savable for the job
    scorer = LoadedModel(cfg, copy.deepcopy(g), copy.deepcopy(d), "bench").for_scoring("cpu")
    g_search, d_search = scorer.generator, scorer.discriminator
    search = SearchConfig(iterations=iterations)
    pixels = digit_patches(max(batch, n_job, n_job_default), size)
    x = to_model_space(torch.from_numpy(pixels), "uint8")
    ids = [f"bench-{i}" for i in range(len(x))]

    latent_search(g_search, d_search, x[:2], ids[:2], SearchConfig(iterations=2))  # warm-up
    batched = _rate(
        lambda: latent_search(g_search, d_search, x[:batch], ids[:batch], search), batch
    )

    def loop() -> None:
        # one patch, one z, one optimiser at a time: what per-sample implementations do
        for i in range(n_loop):
            latent_search(g_search, d_search, x[i : i + 1], ids[i : i + 1], search)

    looped = _rate(loop, n_loop)

    figures: dict[str, Any] = {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "model": {"image_size": size, "g_width": width, "d_width": width},
        "iterations": iterations,
        "batch_size": batch,
        "batched_patches_per_s": batched,
        "loop_patches_per_s": looped,
        "batched_vs_loop": batched / looped,
    }
    figures.update(
        _flop_efficiency(g_search, d_search, x[:batch], ids[:batch], search, batched, looped)
    )
    bf16 = replace(search, precision="bf16")
    latent_search(g_search, d_search, x[:2], ids[:2], replace(bf16, iterations=2))  # warm-up
    figures["bf16_patches_per_s"] = _rate(
        lambda: latent_search(g_search, d_search, x[:batch], ids[:batch], bf16), batch
    )
    figures["bf16_vs_fp32"] = figures["bf16_patches_per_s"] / batched
    figures["batch_sweep"] = _batch_sweep(
        g_search, d_search, x, ids, [4, 8, 16] if quick else [16, 32, 64, 128]
    )
    # score's defaults (encoder start + polish) on a model with an encoder: what users run
    cfg_e, g_e, d_e, e = bench_model(size, width, encoder=True)
    job = _job_vs_inprocess(cfg_e, g_e, d_e, e, pixels[:n_job_default], SearchConfig(), batch)
    figures.update(job)
    # the random-start search of the figures above: the actor's share of a longer batch
    job = _job_vs_inprocess(cfg, g, d, None, pixels[:n_job], search, batch)
    figures.update({f"{k}_gamma{iterations}": v for k, v in job.items()})
    figures.update(_host_work(cfg_e, g_e, d_e, e, pixels, 64 if quick else 1_024))
    figures.update(_peak_memory(200 if quick else 2_000))
    figures.update(_geval_reduction(quick))
    _print_table(figures)
    return figures


def matmul_flops_per_s(n: int = 2048, reps: int = 8) -> float:
    """Dense fp32 matmul FLOP/s on this device: the roofline the search is measured against."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def step_flops(g, d, batch: int) -> int:
    """FLOPs of one search step (G and D forward, backward to z) for a batch, counted."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    z = torch.zeros(batch, g.latent_dim, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        gz = g(z)
        features = d.feature(gz)
        (gz.abs().sum() + features.abs().sum()).backward()
    return counter.get_total_flops()


def _flop_efficiency(g, d, x, ids, search, batched: float, looped: float) -> dict[str, Any]:
    per_patch_step = step_flops(g, d, len(x)) / len(x)
    peak = matmul_flops_per_s()
    search_rate = batched * search.iterations * per_patch_step
    loop_rate = looped * search.iterations * per_patch_step
    return {
        "gflop_per_patch_step": per_patch_step / 1e9,
        "matmul_gflops": peak / 1e9,
        "search_gflops": search_rate / 1e9,
        "flop_efficiency": search_rate / peak,
        "loop_flop_efficiency": loop_rate / peak,
    }


def _batch_sweep(g, d, x, ids, sizes: list[int]) -> dict[str, float]:
    """Patches x steps per second of the batched search at several batch sizes."""
    from anogan_batch.core.search import latent_search
    from anogan_batch.core.search_config import SearchConfig

    cfg = SearchConfig(iterations=3)
    out = {}
    for b in sizes:
        xb = x.repeat((b + len(x) - 1) // len(x), 1, 1, 1)[:b]
        ib = [f"sweep-{i}" for i in range(b)]
        start = time.perf_counter()
        latent_search(g, d, xb, ib, cfg)
        out[str(b)] = b * cfg.iterations / (time.perf_counter() - start)
    return out


def _geval_reduction(quick: bool) -> dict[str, Any]:
    """G evaluations per patch: the paper's search vs the cheapest one that keeps its AUROC."""
    import torch

    from anogan_batch.core.model import model_input
    from anogan_batch.core.modeldir import load_model
    from anogan_batch.core.search import latent_search, resolve_search
    from anogan_batch.core.search_config import SearchConfig
    from anogan_batch.evaluation.demo import bundled_model_dir, load_sample
    from anogan_batch.evaluation.evaluate import auroc

    model = load_model(bundled_model_dir()).for_scoring("cpu")
    sample = load_sample()
    n = 40 if quick else len(sample["test_images"])
    x = model_input(torch.from_numpy(sample["test_images"][:n, :, :, None].copy()), model.config)
    positive = sample["test_labels"][:n] != 0
    ids = [f"val-{i}" for i in sample["test_index"][:n]]
    # the paper's search: random start, Γ = 500
    reference = SearchConfig(iterations=20 if quick else 500, start="prior")
    prior = [
        SearchConfig(iterations=k, start="prior") for k in ((2, 5) if quick else (5, 10, 20, 50))
    ]
    candidates = [*prior, SearchConfig()]  # SearchConfig(): score's default for this model
    if not quick:
        candidates.append(
            SearchConfig(
                iterations=500, start="prior", stop_tol=0.01, stop_window=10, min_iterations=20
            )
        )

    def run(cfg: SearchConfig) -> dict[str, Any]:
        start = time.perf_counter()
        r = latent_search(model.generator, model.discriminator, x, ids, cfg, model.encoder)
        cfg = resolve_search(cfg, has_encoder=model.encoder is not None)
        return {
            "start": cfg.start,
            "iterations": cfg.iterations,
            "stop_tol": cfg.stop_tol,
            "auroc": auroc(r.anomaly_score, positive),
            # + the final forward; an encoder start costs about one more (E is D-sized)
            "g_evals_per_patch": float(r.steps.mean()) + 1 + (cfg.start == "encoder"),
            "seconds": time.perf_counter() - start,
        }

    ref = run(reference)
    runs = [run(c) for c in candidates]
    keeping = [r for r in runs if r["auroc"] >= ref["auroc"] - 0.005]
    best = min(keeping, key=lambda r: r["g_evals_per_patch"]) if keeping else None
    return {
        "iterations_reference": reference.iterations,
        "geval_reference": ref,
        "geval_candidates": runs,
        "geval_fast": best,
        "geval_reduction": ref["g_evals_per_patch"] / best["g_evals_per_patch"] if best else 1.0,
    }


def _score_process(model_dir: str, table: str, out: str, args: list[str]) -> dict[str, Any]:
    """Run `anogan-batch score` as its own process and return its job.json's last run.

    A job per process, as users run it: a second Ray session in one process after
    `ray.shutdown()` can crash on Ray Data's leftover threads (ray-project/ray#31145), and each
    run's figures (peak memory above all) stay its own.
    """
    import subprocess
    import sys

    from anogan_batch.job.manifest import JobManifest

    cmd = [sys.executable, "-m", "anogan_batch", "score", model_dir, table, out, *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench job failed ({done.returncode}): {done.stderr[-2000:]}")
    manifest = JobManifest.load(out)
    return manifest.runs[-1] | {"patches_per_second": manifest.patches_per_second}


def _search_flags(search) -> list[str]:
    """`score` flags that give the job the same search as `search` in process."""
    from anogan_batch.fields import as_flags

    if search.stop_tol is not None or search.slots is not None:
        raise ValueError("the bench's job figures use the fixed-Γ search")
    return as_flags(search)


def _job_vs_inprocess(cfg, g, d, e, pixels, search, batch) -> dict[str, Any]:
    """End-to-end `score` job vs the in-process scorer, same rows, batch size, model and threads.

    The in-process rate is a warm one (first batch's one-off costs paid before timing); the
    job's rate includes its actor's start and warm-up, as a user's job does."""
    import pyarrow.dataset as pads
    import torch

    from anogan_batch.core.modeldir import load_model, save_model
    from anogan_batch.core.search import resolve_search
    from anogan_batch.io.tables import write_patch_table
    from anogan_batch.job.scorer import score_table

    with tempfile.TemporaryDirectory(prefix="anogan-bench-") as tmp:
        model_dir = os.path.join(tmp, "model")
        save_model(model_dir, cfg, g, d, {}, encoder=e)
        table = write_patch_table(os.path.join(tmp, "patches"), pixels, files=4)
        model = load_model(model_dir).for_scoring("cpu")
        rows = pads.dataset(table).to_table()
        threads = torch.get_num_threads()
        # as the job's actors score: compact maps, the job's default
        score = functools.partial(score_table, job_id="bench", device="cpu", encoding="compact")
        score(model, rows.slice(0, 2), search)  # warm-up

        def inprocess() -> None:
            for start in range(0, rows.num_rows, batch):
                score(model, rows.slice(start, batch), search)

        in_rate = _rate(inprocess, rows.num_rows)
        # scoring throughput only; heatmaps are a separate phase
        flags = ["--batch-size", str(batch), "--no-progress", "--no-heatmaps"]
        run = _score_process(
            model_dir, table, os.path.join(tmp, "job"), flags + _search_flags(search)
        )
    job_rate = run["patches_per_second"] or 0.0
    resolved = resolve_search(search, has_encoder=e is not None)
    return {
        "job_search": {"start": resolved.start, "iterations": resolved.iterations},
        "job_rows": int(rows.num_rows),
        "inprocess_patches_per_s": in_rate,
        "inprocess_threads": threads,
        "job_patches_per_s": job_rate,
        "job_vs_inprocess": job_rate / in_rate,
        # where a job's time goes: scoring inside the actor vs everything around it
        "job_score_seconds": run.get("seconds"),
        "job_actor_busy_seconds": run.get("actor_busy_seconds"),
        "job_resources": run.get("resources"),
        "job_actor_peak_rss_mb": run.get("actor_peak_rss_mb"),
        # the whole command's phases (connect, score, scans...): end to end, not only scoring
        "job_phase_seconds": run.get("phase_seconds"),
    }


def _host_work(cfg, g, d, e, pixels, batch: int) -> dict[str, Any]:
    """An actor's work per patch outside the search, on one thread, at score's defaults
    (compact maps): rows decoded to the model's input, the search's results encoded as Arrow
    rows. A GPU searching 12,000 patches/s must never wait on it. Also the bytes a scored row
    takes leaving the actor (Arrow), at the bench's 64 x 64 in the full run."""
    import pyarrow as pa
    import torch

    from anogan_batch.core import scoring
    from anogan_batch.core.modeldir import LoadedModel
    from anogan_batch.core.search import resolve_search
    from anogan_batch.core.search_config import SearchConfig
    from anogan_batch.io.tables import patch_table
    from anogan_batch.job.scorer import score_table

    model = LoadedModel(cfg, copy.deepcopy(g), copy.deepcopy(d), "bench",
                        encoder=copy.deepcopy(e)).for_scoring("cpu")  # fmt: skip
    pixels = np.concatenate([pixels] * -(-batch // len(pixels)))[:batch]
    rows = patch_table(pixels, ids=[f"host-{i}" for i in range(batch)])
    search = resolve_search(SearchConfig(iterations=0), has_encoder=True)
    device_search = scoring.device_search
    x, _ = scorer_input(rows, model)
    done = device_search(model, x, rows.column(PATCH_ID).to_pylist(), search, "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # the device's part (transfer, normalisation, blur, search) replaced by its result: what
    # is timed is the actor's host work around it
    scoring.device_search = lambda *args, **kwargs: done
    try:
        score = functools.partial(score_table, job_id="bench", device="cpu", encoding="compact")
        out = score(model, rows, search)
        # the median of several batches: one batch is ~10 ms, within the timer's noise here
        rate = float(np.median([_rate(lambda: score(model, rows, search), batch)
                                for _ in range(HOST_REPEATS)]))  # fmt: skip
    finally:
        scoring.device_search = device_search
        torch.set_num_threads(threads)
    assert isinstance(out, pa.Table) and out.column(REASON).null_count == batch
    return {
        "host_patches_per_s": rate,
        "host_batch": batch,
        "bytes_per_patch": out.nbytes / out.num_rows,
        "bytes_per_patch_model": {"image_size": cfg.image_size, "latent_dim": cfg.latent_dim},
    }


def scorer_input(rows, model):
    """The stored pixels of a table of patch rows as the scorer hands them to the device."""
    import torch

    from anogan_batch.io.patches import decode_patches

    pixels, reasons = decode_patches(rows, model.patch_spec)
    return torch.from_numpy(pixels), reasons


def _peak_memory(n: int) -> dict[str, Any]:
    """Peak RSS of the driver and of the scoring actors for n and 10 n patches.

    Each size runs as its own `anogan-batch score` process (a fresh driver and local Ray), so
    each peak is that job's own. Streaming means the 10x job's peaks stay where the 1x job's are.
    """
    from anogan_batch.core.modeldir import save_model
    from anogan_batch.io.tables import write_patch_table

    cfg, g, d, _ = bench_model(28, 8)
    digits = digit_patches(500, 28)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="anogan-bench-mem-") as tmp:
        model_dir = os.path.join(tmp, "model")
        save_model(model_dir, cfg, g, d, {})
        peaks = {}
        for scale in (1, 10):
            rows = n * scale
            table = write_patch_table(
                os.path.join(tmp, f"p{scale}"),
                digits[np.arange(rows) % len(digits)],
                scan_ids=[f"s{i}" for i in range(rows)],
                files=4 * scale,  # same file size at both scales
            )
            run = _score_process(
                model_dir,
                table,
                os.path.join(tmp, f"job{scale}"),
                [
                    *("--iterations", "1", "--batch-size", "64", "--target-file-mb", "4"),
                    *("--no-progress", "--no-heatmaps"),
                ],
            )
            peaks[scale] = (run["driver_peak_rss_mb"], run["actor_peak_rss_mb"])
            out[f"peak_rss_mb_{scale}x"] = {
                "patches": rows,
                "driver": peaks[scale][0],
                "actor": peaks[scale][1],
            }
    out["peak_rss_ratio_10x"] = max(peaks[10][0] / peaks[1][0], peaks[10][1] / peaks[1][1])
    return out


def _print_table(figures: dict[str, Any]) -> None:
    rows = [(k, v) for k, v in figures.items() if not isinstance(v, dict)]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        text = f"{v:,.3f}" if isinstance(v, float) else str(v)
        print(f"{k:<{width}}  {text}")
