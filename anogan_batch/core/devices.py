"""Which device a process scores on, what it is, and which failures are the machine's.

The one place that picks a device (the job's actors, the Python `Detector`, `calibrate`,
training). The contract: an actor granted a GPU scores on it or fails loudly; a fault of the
machine (out of memory, a CUDA error) never quarantines a row (job/scorer.py acts on the
classification here).

Test-only failpoint, FAULTS_ENV (never set in production), a comma-separated list of:

- `oom=P`: a search of more than one patch raises torch's OutOfMemoryError for a fraction P
  of (first patch id, patch count) pairs, as a GPU does when a batch does not fit;
- `oom_above=N`: a search of more than N patches runs out of memory (a GPU that holds N);
- `sticky=P`: a batch whose first patch id falls in a fraction P raises a sticky CUDA error
  (the kind after which every call in that process fails) on its first `repeat` attempts;
- `repeat=N`: see `sticky` (default 1);
- `always=TEXT`: a batch holding a patch id that contains TEXT raises a sticky CUDA error on
  every attempt, wherever it runs (a fault that follows the batch);
- `fake_gpu=1`: an actor granted a GPU that torch cannot see scores on the CPU instead of
  failing, so that GPU scheduling is testable on a machine without one.

The choices are a hash of the ids, not random: a test that injects faults is repeatable.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from anogan_batch.errors import ConfigError, MachineError

DEVICE_CHOICES = ("auto", "cpu", "cuda")  # and cuda:N
FAULTS_ENV = "ANOGAN_BATCH_TEST_FAULTS"
STICKY_MESSAGE = "CUDA error: an illegal memory access was encountered (injected)"

# Messages of failures that leave the CUDA context unusable, or that mean the device or its
# driver is faulty: the process must end (Ray restarts the actor) and the batch be retried.
_DEVICE_FAULT_MARKERS = (
    "CUDA error",
    "CUDA driver",
    "CUBLAS_STATUS",
    "CUDNN_STATUS",
    "cuDNN error",
    "NCCL error",
    "device-side assert",
    "illegal memory access",
    "uncorrectable ECC",
    "CUDA-capable device",
    "HIP error",
)


def check_device(value: str) -> None:
    """ConfigError unless `value` is auto, cpu, cuda or cuda:N."""
    if value in DEVICE_CHOICES:
        return
    head, _, index = value.partition(":")
    if head == "cuda" and index.isdigit():
        return
    raise ConfigError("device", value, "use auto, cpu, cuda or cuda:N")


def pick_device(requested: str = "auto", granted_gpus: list | None = None) -> str:
    """The torch device to score on. `requested`: auto, cpu, cuda or cuda:N. `granted_gpus`:
    the GPU ids Ray gave this actor (None outside Ray). auto is CUDA when torch sees a GPU,
    else the CPU; a GPU that was asked for or granted but that torch cannot use is a
    MachineError (never a silent fallback to the CPU)."""
    import torch

    check_device(requested)
    if requested == "cpu":
        return "cpu"
    if requested == "auto" and not granted_gpus:
        return "cuda" if torch.cuda.is_available() else "cpu"
    # a GPU asked for (cuda, cuda:N) or granted by Ray
    if torch.cuda.is_available():
        return "cuda" if requested == "auto" else requested
    if _faults().fake_gpu:
        return "cpu"
    granted = f"was granted GPU(s) {granted_gpus}" if granted_gpus else f"asked for {requested}"
    raise MachineError(
        f"{where()} {granted} but torch {torch.__version__} (CUDA build: "
        f"{torch.version.cuda or 'none, a CPU-only wheel'}) cannot use CUDA: install a CUDA "
        "build of torch that matches the node's driver, or run with --device cpu"
    )


def describe(device: str) -> dict[str, Any]:
    """What `device` is, for job.json: its name and memory (GPU), or the CPU."""
    import torch

    if not device.startswith("cuda"):
        return {"device": device, "name": "cpu", "torch_threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(torch.device(device))
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return {
        "device": device,
        "name": props.name,
        "memory_gb": round(total / 2**30, 1),
        "free_memory_gb": round(free / 2**30, 1),
    }


# Numeric settings per device kind, set in one place (configure) and recorded in job.json.
# Chosen by measurement (docs/performance.md, "Per-device settings"): bf16 gained 3-10 % on
# the H200 and moves scores, so every device searches in fp32; cuDNN's own TF32 (torch's
# default, under which the H200's figures were measured) stays; TF32 matmuls stay off (the
# networks are convolutions); cuDNN autotuning stays off: it picks kernels per batch shape,
# and a patch's score must not depend on its batch (CONTRACT.md).
CUDA_SETTINGS = {"cudnn_tf32": True, "matmul_tf32": False, "cudnn_benchmark": False}
# Share of a GPU's free memory the searches of one actor may fill (the rest: the CUDA
# context, the caching allocator's slack, a second actor's model copy).
MEMORY_SHARE = 0.6


def configure(device: str) -> dict[str, Any]:
    """Apply the per-device numeric settings for `device`; returns them, for job.json."""
    import torch

    if not device.startswith("cuda"):
        return {}
    torch.backends.cudnn.allow_tf32 = CUDA_SETTINGS["cudnn_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = CUDA_SETTINGS["matmul_tf32"]
    torch.backends.cudnn.benchmark = CUDA_SETTINGS["cudnn_benchmark"]
    return dict(CUDA_SETTINGS)


def rows_that_fit(free_bytes: int, per_patch_bytes: float, share: float = MEMORY_SHARE) -> int:
    """How many patches one search may hold: `share` of the free memory over the measured
    footprint of one patch (at least 1)."""
    if per_patch_bytes <= 0:
        raise ValueError(f"per-patch footprint must be positive, got {per_patch_bytes}")
    return max(1, int(free_bytes * share // per_patch_bytes))


def search_footprint(search, channels: int, size: int, device: str, probe: int = 32) -> float:
    """Bytes of device memory one patch of a search takes, measured: the peak allocation of
    `search(pixels)` on `probe` patches of zeros ((B, size, size, channels) uint8) over the
    allocation before it, per patch. CUDA only."""
    import torch

    dev = torch.device(device)
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    search(torch.zeros((probe, size, size, channels), dtype=torch.uint8))
    torch.cuda.synchronize(dev)
    return max(1.0, (torch.cuda.max_memory_allocated(dev) - before) / probe)


def free_memory(device: str) -> int:
    """Free bytes on a CUDA device."""
    import torch

    return int(torch.cuda.mem_get_info(torch.device(device))[0])


def granted_gpus() -> list[str]:
    """The GPU ids Ray granted this process ([] outside Ray or without GPUs)."""
    try:
        import ray

        if ray.is_initialized():
            return list(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))
    except Exception:  # not in a Ray worker
        pass
    return []


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # not in a Ray worker
        pass
    return None


def where() -> str:
    """This process as a message names it: its node (IP) and the GPUs Ray granted it."""
    try:
        import ray

        if ray.is_initialized():
            gpus = granted_gpus()
            node = (node_id() or "")[:12]
            return f"node {ray.util.get_node_ip_address()} {node} (GPU ids {gpus or 'none'})"
    except Exception:  # only a label for a message
        pass
    return f"pid {os.getpid()}"


def is_out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def is_device_fault(e: BaseException) -> bool:
    """A failure of the machine rather than of the batch's data: out of memory, a CUDA error,
    or a GPU torch cannot use."""
    if isinstance(e, MachineError) or is_out_of_memory(e):
        return True
    text = str(e)
    return any(m in text for m in _DEVICE_FAULT_MARKERS)


# ---- the test-only failpoint (FAULTS_ENV) -------------------------------------------------


@dataclass(frozen=True)
class _Faults:
    oom: float = 0.0
    oom_above: int = 0
    sticky: float = 0.0
    repeat: int = 1
    always: str = ""
    fake_gpu: bool = False

    @property
    def any(self) -> bool:
        return bool(self.oom or self.oom_above or self.sticky or self.always)


@lru_cache(maxsize=1)
def _faults() -> _Faults:
    spec = os.environ.get(FAULTS_ENV, "").strip()
    if not spec:
        return _Faults()
    values: dict[str, Any] = {}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in _Faults.__dataclass_fields__:
            raise ConfigError(FAULTS_ENV, spec, f"unknown fault {name!r}")
        parse = {
            "repeat": int,
            "oom_above": int,
            "always": str,
            "fake_gpu": lambda v: v.strip() not in ("", "0"),
        }
        values[name] = parse.get(name, float)(value)
    return _Faults(**values)


_poisoned: list[str] = []  # a sticky error happened in this process: every later call fails


def faults_injected() -> bool:
    return _faults().any


def inject_oom(patch_ids: list[str]) -> None:
    """The `oom` failpoint, called before each search."""
    import torch

    if _poisoned:
        raise RuntimeError(_poisoned[0])
    f = _faults()
    over = bool(f.oom_above) and len(patch_ids) > f.oom_above
    chosen = f.oom and len(patch_ids) > 1 and _fraction(f"{patch_ids[0]}|{len(patch_ids)}") < f.oom
    if over or chosen:
        raise torch.OutOfMemoryError(
            f"CUDA out of memory (injected) scoring {len(patch_ids)} patches"
        )


def inject_sticky(patch_ids: list[str], attempt: int) -> None:
    """The `sticky` failpoint, called before a batch on its `attempt`-th try (0 first)."""
    f = _faults()
    if _poisoned:
        raise RuntimeError(_poisoned[0])
    always = bool(f.always) and any(f.always in pid for pid in patch_ids)
    chosen = f.sticky and attempt < f.repeat and _fraction(patch_ids[0]) < f.sticky
    if patch_ids and (always or chosen):
        _poisoned.append(STICKY_MESSAGE)
        raise RuntimeError(STICKY_MESSAGE)


def _fraction(key: str) -> float:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
