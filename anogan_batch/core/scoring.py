"""Searching a batch of stored patches on a device, through the device's faults: the one loop
that scores arrays (the job's actors through job/scorer.py, the Python `Detector`, and
`calibrate`).

A failure halves the batch and retries each half: out of memory, until the halves fit (the
size that fit is kept in a SearchLimit for the next batches); any other failure of the search,
until the rows that fail on their own are found (`BatchScores.failed`: a reason of their own
data). A patch's result does not depend on its batch, so a split changes nothing. A fault of
the device (a CUDA error; out of memory with one patch) is raised: it is never the data's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from anogan_batch.core.modeldir import LoadedModel
    from anogan_batch.core.search import SearchResult
    from anogan_batch.core.search_config import SearchConfig

log = logging.getLogger(__name__)


@dataclass
class SearchLimit:
    """The most patches one search holds on this device (None: no limit met yet)."""

    rows: int | None = None

    def lower_to(self, rows: int) -> None:
        self.rows = max(1, min(self.rows or rows, rows))


@dataclass
class BatchScores:
    """Per-patch outputs of `search_batch`; row i belongs to input patch i. Rows in `failed`
    (and only those) hold NaN scores and zero maps."""

    anomaly: np.ndarray  # (B,) float64
    residual: np.ndarray  # (B,) float64
    discrimination: np.ndarray  # (B,) float64
    residual_map: np.ndarray  # (B, C, S, S) float32
    z: np.ndarray  # (B, latent) float32
    steps: np.ndarray  # (B,) int32
    failed: dict[int, str] = field(default_factory=dict)  # row -> why its search failed alone

    @classmethod
    def empty(cls, n: int, channels: int, size: int, latent: int) -> BatchScores:
        return cls(
            *(np.full(n, np.nan) for _ in range(3)),
            np.zeros((n, channels, size, size), np.float32),  # zeros: a failed row's map
            np.zeros((n, latent), np.float32),
            np.zeros(n, np.int32),
        )

    def put(self, at: np.ndarray, result: SearchResult) -> None:
        self.anomaly[at] = result.anomaly_score
        self.residual[at] = result.residual_score
        self.discrimination[at] = result.discrimination_score
        self.residual_map[at] = result.residual_map
        self.z[at] = result.z
        self.steps[at] = result.steps


def search_batch(
    model: LoadedModel,
    pixels: torch.Tensor,
    ids: list[str],
    cfg: SearchConfig,
    device: str,
    limit: SearchLimit | None = None,
) -> BatchScores:
    """Search `pixels` (stored pixels on the CPU, (B, H, W, C); row i is `ids[i]`) in chunks
    of `limit` (kept by the caller from batch to batch; None: the whole batch at once)."""
    c = model.config
    out = BatchScores.empty(len(ids), c.channels, c.image_size, c.latent_dim)
    limit = limit if limit is not None else SearchLimit()
    start = 0
    while start < len(ids):  # chunks of the limit as it stands (an OOM may lower it)
        stop = start + (limit.rows or len(ids))
        rows = np.arange(start, min(stop, len(ids)))
        _search_into(out, model, pixels[start:stop], ids[start:stop], rows, cfg, device, limit)
        start = stop
    return out


def _search_into(out, model, x, ids: list[str], at: np.ndarray, cfg, device, limit) -> None:
    """Search patches `x` (row i is `ids[i]`, output row `at[i]`) into `out`, splitting on a
    failure (the module's docstring)."""
    from anogan_batch.core import devices

    try:
        devices.inject_oom(ids)
        result = device_search(model, x, ids, cfg, device)
    except Exception as e:
        oom = devices.is_out_of_memory(e)
        if devices.is_device_fault(e) and not (oom and len(ids) > 1):
            raise
        if len(ids) == 1:
            log.warning("patch %r fails on its own (%s)", ids[0], e)
            out.failed[int(at[0])] = f"scoring failed: {type(e).__name__}: {e}"
            return
        half = len(ids) // 2
        if oom:
            _release_cache(device)
            limit.lower_to(len(ids) - half)  # the larger half: what the next search tries
        else:
            log.warning("a search of %d patches failed (%s); narrowing it down", len(ids), e)
        _search_into(out, model, x[:half], ids[:half], at[:half], cfg, device, limit)
        _search_into(out, model, x[half:], ids[half:], at[half:], cfg, device, limit)
        return
    out.put(at, result)


def device_search(model, pixels, ids: list[str], cfg, device: str) -> SearchResult:
    """The device's part of a batch: the stored pixels moved to it as they are (uint8 for
    8-bit scans: a quarter of float32's bytes; from pinned memory to a GPU), normalised and
    blurred there (core/model.model_input), then searched."""
    from anogan_batch.core.model import model_input
    from anogan_batch.core.search import latent_search

    if device.startswith("cuda"):
        pixels = pixels.pin_memory()
    x = model_input(pixels.to(device, non_blocking=True), model.config)
    return latent_search(model.generator, model.discriminator, x, ids, cfg, model.encoder)


def _release_cache(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
