"""`anogan-batch bench --quick`: runs end to end and writes every figure (never a timing check)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

KEYS = {
    "batched_vs_loop": float,
    "flop_efficiency": float,
    "loop_flop_efficiency": float,
    "job_vs_inprocess": float,
    "job_vs_inprocess_gamma5": float,
    "job_search": dict,
    "job_phase_seconds": dict,
    "peak_rss_ratio_10x": float,
    "geval_reduction": float,
    "batched_patches_per_s": float,
    "loop_patches_per_s": float,
    "job_patches_per_s": float,
    "inprocess_patches_per_s": float,
    "matmul_gflops": float,
    "search_gflops": float,
    "device": str,
    "batch_size": int,
    "iterations": int,
    "torch": str,
    "ray": str,
    "batch_sweep": dict,
    "geval_reference": dict,
    "geval_candidates": list,
    "bf16_vs_fp32": float,
    "host_patches_per_s": float,
    "bytes_per_patch": float,
}


@pytest.mark.slow  # four jobs, each its own process and local Ray: over a minute
def test_quick_bench_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli("bench", "--quick", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key, typ in KEYS.items():
        assert isinstance(figures.get(key), typ), (key, figures.get(key))
    for key in ("batched_vs_loop", "flop_efficiency", "job_vs_inprocess", "peak_rss_ratio_10x"):
        assert figures[key] > 0, key
    assert figures["geval_reference"]["g_evals_per_patch"] == figures["iterations_reference"] + 1
    assert 0.0 <= figures["geval_reference"]["auroc"] <= 1.0
    assert set(figures["peak_rss_mb_10x"]) == {"patches", "driver", "actor"}
    # the headline job figure is score's default search; the suffixed one the bench's Γ
    assert figures["job_search"] == {"start": "encoder", "iterations": 10}
    assert figures["job_search_gamma5"] == {"start": "prior", "iterations": 5}
    assert figures["job_phase_seconds"]["score"] > 0
    assert "batched_vs_loop" in r.stdout  # the human table


@pytest.mark.slow  # a Ray job of its own: about 40 s
def test_the_device_check_runs_here_on_the_cpu(tmp_path):
    """scripts/device_check.py is run on a lent GPU only now and then: it must keep working."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "device_check.py"
    r = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--rows", "128", "--actors", "1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    figures = json.loads((tmp_path / "device_check.json").read_text())
    assert set(figures["search_patches_per_s"]) >= {"64", "1024", "auto"}
    assert figures["ray_job"]["1"]["patches_per_s"] > 0
    assert figures["search_vs_matmul_peak"] > 0
