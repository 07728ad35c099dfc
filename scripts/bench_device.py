"""The search's in-process speed on an accelerator (the CUDA column of docs/performance.md).

    python scripts/bench_device.py [--device cuda] [--json FILE]

The bench's own model (64x64 patches, width 64; `anogan-batch bench`) and search, run in this
process on `--device`: no Ray, so it runs where only torch is installed. Per batch size: patches
per second at Γ = 100 from the prior (fp32 and bf16) and at score's defaults (encoder start
plus polish), one patch at a time for the batched-vs-loop ratio, and the device's peak memory.
A GPU's patches/s keeps rising with the batch long after a CPU's stops, so the sweep is wide.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace


def rate(fn, n: int, device: str) -> float:
    import torch

    fn()  # warm-up at this size: kernels chosen, memory pooled
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()  # latent_search returns host arrays, so the device is done when it returns
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="64,256,1024,4096")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from anogan_batch.core.model import to_model_space
    from anogan_batch.core.modeldir import LoadedModel
    from anogan_batch.core.search import latent_search
    from anogan_batch.core.search_config import SearchConfig
    from anogan_batch.evaluation.bench import bench_model, digit_patches

    device = args.device
    batches = [int(b) for b in args.batches.split(",")]
    cfg, g, d, e = bench_model(64, 64, encoder=True)
    model = LoadedModel(cfg, copy.deepcopy(g), copy.deepcopy(d), "bench", encoder=e)
    scorer = model.for_scoring(device)
    gs, ds, es = scorer.generator, scorer.discriminator, scorer.encoder
    x_all = to_model_space(torch.from_numpy(digit_patches(max(batches), 64)), "uint8").to(device)
    ids_all = [f"bench-{i}" for i in range(len(x_all))]
    prior = SearchConfig(iterations=100, start="prior")
    searches = {
        "prior_g100_fp32": (prior, None),
        "prior_g100_bf16": (replace(prior, precision="bf16"), None),
        "default_encoder_polish": (SearchConfig(), es),
    }
    figures: dict = {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else device,
        "torch": torch.__version__,
        "model": {"image_size": 64, "g_width": 64, "d_width": 64},
        "patches_per_s": {},
    }
    for name, (search, encoder) in searches.items():
        row = {}
        for b in batches:
            x, ids = x_all[:b], ids_all[:b]
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()

            def run(x=x, ids=ids, search=search, encoder=encoder):
                return latent_search(gs, ds, x, ids, search, encoder)

            row[b] = round(rate(run, b, device), 1)
            if device.startswith("cuda"):
                row[f"{b}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            print(name, b, row[b], flush=True)
        figures["patches_per_s"][name] = row
    loop_n = 8
    looped = rate(
        lambda: [latent_search(gs, ds, x_all[i : i + 1], ids_all[i : i + 1], prior)
                 for i in range(loop_n)],
        loop_n,
        device,
    )  # fmt: skip
    figures["loop_prior_g100_patches_per_s"] = round(looped, 2)
    best = max(figures["patches_per_s"]["prior_g100_fp32"][b] for b in batches)
    figures["batched_vs_loop"] = round(best / looped, 1)
    print(json.dumps(figures, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
