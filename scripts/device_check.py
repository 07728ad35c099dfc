"""The GPU check of the Ray job (run by scripts/device_check.sh on a lent GPU; also on a CPU).

    python scripts/device_check.py --device cuda --rows 32768 --out DIR

The bench's model (64x64 patches, width 64, with an encoder) at score's defaults:

1. the search in process at batch 64, 1,024 and `auto` (the job's choice: 1,024 a task on a
   GPU, searched whole unless the GPU runs out of memory), patches/s and peak GPU memory;
2. the scorer's whole per-batch path in process (rows decoded, the device's part, rows
   encoded: `score_table`), patches/s at the job's batch;
3. the Ray job (`anogan-batch score`, its own process, a local Ray) on this device with one
   actor and with two actors sharing it, patches/s from job.json, and job ÷ in-process;
4. the search's achieved FLOP/s against this device's measured dense matmul peak;

and, on a GPU, the search at the job's batch under the settings to choose by measurement
(cuDNN autotuning, TF32 matmuls, bf16).

Prints each figure as it comes and writes them all to DIR/device_check.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace


def timed(fn, n: int, device: str, repeats: int = 2) -> float:
    """Patches/s of fn (n patches a call): the best of `repeats` calls after a warm-up."""
    import torch

    fn()
    best = 0.0
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = max(best, n / (time.perf_counter() - start))
    return best


def matmul_peak(device: str, n: int = 8192, reps: int = 10) -> float:
    """Dense fp32 matmul FLOP/s (TF32 as torch's defaults allow it) on `device`."""
    import torch

    n = n if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return timed(lambda: [a @ b for _ in range(reps)], 2 * n**3 * reps, device, repeats=3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=32_768, help="rows of the Ray job's table")
    ap.add_argument("--out", default=".")
    ap.add_argument("--actors", default="1,2", help="Ray job runs: actors sharing the device")
    args = ap.parse_args()

    import torch

    from anogan_batch.core.modeldir import LoadedModel, load_model, save_model
    from anogan_batch.core.scoring import device_search
    from anogan_batch.core.search import resolve_search
    from anogan_batch.core.search_config import SearchConfig
    from anogan_batch.evaluation.bench import bench_model, digit_patches, step_flops
    from anogan_batch.io.tables import patch_table, write_patch_table
    from anogan_batch.job.pipeline import AUTO_BATCH_CPU, AUTO_BATCH_GPU
    from anogan_batch.job.scorer import score_table

    device = args.device
    gpu = device.startswith("cuda")
    auto = AUTO_BATCH_GPU if gpu else AUTO_BATCH_CPU
    figures: dict = {
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "torch": torch.__version__,
        "model": {"image_size": 64, "g_width": 64, "d_width": 64, "encoder": True},
        "search": "score's default (encoder start + 10-step polish), fp32",
    }

    def report(key: str, value) -> None:
        figures[key] = value
        print(f"{key}: {value}", flush=True)

    cfg, g, d, e = bench_model(64, 64, encoder=True)
    search = resolve_search(SearchConfig(), has_encoder=True)
    model = LoadedModel(cfg, copy.deepcopy(g), copy.deepcopy(d), "check",
                        encoder=copy.deepcopy(e)).for_scoring(device)  # fmt: skip
    pixels = digit_patches(max(auto, 1_024), 64)
    ids = [f"check-{i}" for i in range(len(pixels))]

    # 1. the search in process
    search_rates = {}
    for label, b in (("64", 64), ("1024", 1_024), ("auto", auto)):
        x = torch.from_numpy(pixels[:b])
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        rate = timed(lambda x=x, b=b: device_search(model, x, ids[:b], search, device), b, device)
        search_rates[label] = round(rate, 1)
        if gpu:
            search_rates[f"{label}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    report("search_patches_per_s", search_rates)

    # 1b. settings to choose by measurement (a GPU only): cuDNN autotuning, TF32, bf16
    if gpu:
        x = torch.from_numpy(pixels[:auto])
        settings = {}
        for name, bench_mode, tf32, precision in (
            ("default", False, torch.backends.cuda.matmul.allow_tf32, "fp32"),
            ("cudnn_benchmark", True, torch.backends.cuda.matmul.allow_tf32, "fp32"),
            ("tf32_matmul", False, True, "fp32"),
            ("bf16", False, torch.backends.cuda.matmul.allow_tf32, "bf16"),
        ):
            saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = bench_mode, tf32
            run = replace(search, precision=precision)
            settings[name] = round(
                timed(lambda run=run: device_search(model, x, ids[:auto], run, device), auto,
                      device),
                1,
            )  # fmt: skip
            torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = saved
        report("settings_patches_per_s", settings)

    # 2. the scorer's whole per-batch path in process, at the job's batch
    rows = patch_table(pixels[:auto], ids=ids[:auto])
    scorer_rate = timed(
        lambda: score_table(model, rows, search, job_id="check", device=device,
                            encoding="compact"),
        auto,
        device,
    )  # fmt: skip
    report("scorer_patches_per_s", round(scorer_rate, 1))
    report("scorer_vs_search", round(scorer_rate / search_rates["auto"], 3))

    # 4. achieved FLOP/s of the search (one G and D pass and backward a step)
    peak = matmul_peak(device)
    flops = step_flops(g, d, 1) * (search.iterations + 1)  # + the encoder start's evaluation
    report("matmul_tflops", round(peak / 1e12, 2))
    report("search_tflops", round(search_rates["auto"] * flops / 1e12, 3))
    report("search_vs_matmul_peak", round(search_rates["auto"] * flops / peak, 4))

    # 3. the Ray job on this device
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        model_dir = os.path.join(tmp, "model")
        save_model(model_dir, cfg, g, d, {}, encoder=e)
        load_model(model_dir)  # the weights load as the actors will load them
        table = os.path.join(tmp, "patches")
        reps = -(-args.rows // len(pixels))
        write_patch_table(table, __import__("numpy").concatenate([pixels] * reps)[: args.rows],
                          files=8)  # fmt: skip
        jobs = {}
        for n in (int(a) for a in args.actors.split(",")):
            out = os.path.join(tmp, f"job-{n}")
            flags = ["--actors", str(n), "--no-progress", "--no-heatmaps"]
            if gpu:
                flags += ["--device", "cuda", "--gpus-per-actor", str(1 / n)]
            started = time.perf_counter()
            r = subprocess.run(
                [sys.executable, "-m", "anogan_batch", "score", model_dir, table, out, *flags],
                capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""},
            )  # fmt: skip
            if r.returncode != 0:
                print(r.stderr[-4000:], file=sys.stderr)
                jobs[n] = {"exit": r.returncode}
                continue
            with open(os.path.join(out, "job.json")) as f:
                run = json.load(f)["runs"][-1]
            job_rate = run["rows"] / run["seconds"]
            jobs[n] = {
                "patches_per_s": round(job_rate, 1),
                "job_vs_inprocess": round(job_rate / scorer_rate, 3),
                "command_seconds": round(time.perf_counter() - started, 1),
                "score_seconds": run["seconds"],
                "phase_seconds": run["phase_seconds"],
                "actors": run.get("actors"),
                "actor_busy_seconds": run.get("actor_busy_seconds"),
            }
            print(f"ray job, {n} actor(s): {jobs[n]}", flush=True)
        report("ray_job", jobs)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "device_check.json"), "w") as f:
        json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
