"""The scoring actor: loads the frozen model once, then scores batches of patch rows.

`PatchScorer` is the callable class Ray Data runs in an actor pool (`map_batches`); it is also
usable in process (the benchmark's baseline). Each output row carries either scores (`reason`
null) or a `reason` why the row could not be scored; the job's sink routes the latter to
`quarantine`, only for reasons of the row's own data: a row that cannot be decoded, whose search
gives a non-finite score, or whose search fails on its own (a failing batch is narrowed down to
such rows). Faults of the machine never quarantine (CONTRACT.md): out of memory splits the
batch; a CUDA error ends the actor so that Ray restarts it and retries the batch, and a batch
that failed on DEVICE_ATTEMPTS devices fails the job (exit 1; a rerun resumes and retries it).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from anogan_batch.core.search_config import SearchConfig
from anogan_batch.io.columns import (
    ANOMALY_SCORE,
    CHANNELS,
    DISCRIMINATION_SCORE,
    FLAGGED,
    HEAT,
    HEIGHT,
    JOB_ID,
    LABEL,
    LATENT,
    MODEL_ID,
    P_VALUE,
    PATCH_ID,
    REASON,
    RESIDUAL_MAP,
    RESIDUAL_SCORE,
    SCAN_ID,
    SEARCH_STEPS,
    SLICE,
    THUMB,
    WIDTH,
    X,
    Y,
    scorer_schema,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from anogan_batch.core.modeldir import LoadedModel, ModelCard
    from anogan_batch.core.scoring import SearchLimit

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class DeviceThread:
    """The one thread that runs an actor's searches, and the seconds it spent in them (the
    device's busy time). Batches of one actor arrive on CONCURRENT_CALLS threads
    (job/pipeline): while this thread searches one, another decodes its rows or encodes its
    results. One thread, not a lock, so that the search's large temporaries always come from
    the same allocator arena (two threads taking turns kept two arenas at peak: +300 MB an
    actor, docs/performance.md)."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        self._count = threading.Lock()
        self.busy = 0.0

    def run(self, fn, *args):
        """fn(*args) on the device thread, after the searches queued before it."""
        return self._pool.submit(self._timed, fn, *args).result()

    def _timed(self, fn, *args):
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            with self._count:
                self.busy += time.perf_counter() - started

    def take_busy(self) -> float:
        """Busy seconds since the last call."""
        with self._count:
            busy, self.busy = self.busy, 0.0
        return busy


# Calls one GPU scoring actor runs at once: the device thread searches one batch while the
# host decodes the next or encodes the last (docs/performance.md).
CONCURRENT_CALLS = 2

# A batch that met a device fault this many times (on whichever devices) fails the job: a
# fault that follows one batch around the cluster is not the cluster's.
DEVICE_ATTEMPTS = 3


def score_table(
    model: LoadedModel,
    table: pa.Table,
    cfg: SearchConfig,
    *,
    job_id: str,
    device: str,
    calibration: np.ndarray | None = None,
    fpr: float | None = None,
    limit: SearchLimit | None = None,
    encoding: str = "float32",
    searcher: DeviceThread | None = None,
) -> pa.Table:
    """Score one batch of patch rows in process; returns rows of `io/columns.scorer_schema()`.
    `calibration`: the model's calibration scores for `cfg` (p-values; flags under `fpr`).
    `limit`: the most patches one search may hold, learnt from out-of-memory errors and kept
    by the caller from batch to batch (None: the whole batch at once). `encoding`: how
    `residual_map` is stored (job/score_config.RESIDUAL_MAPS). `searcher`: the thread the search
    runs on, so that other calls' decoding and encoding overlap it (PatchScorer); None: this
    one."""
    import pyarrow as pa
    import torch

    from anogan_batch.core.scoring import search_batch
    from anogan_batch.fields import PIXEL_MAX
    from anogan_batch.io.patches import decode_patches, int32_or_null
    from anogan_batch.job.heatmaps import patch_cells, patch_thumbs

    spec = model.patch_spec
    n = table.num_rows
    pixels, reasons = decode_patches(table, spec)
    ok = np.array([r is None for r in reasons], dtype=bool)
    ids = table.column(PATCH_ID).to_pylist()

    idx = np.flatnonzero(ok)
    # stored pixels, (B, H, W, C): the device converts them (core/scoring.device_search)
    search = searcher.run if searcher is not None else lambda fn, *a: fn(*a)
    found = search(
        search_batch, model, torch.from_numpy(pixels[idx]), [ids[i] for i in idx], cfg, device,
        limit,
    )  # fmt: skip
    for k, why in found.failed.items():
        reasons[idx[k]] = why
    bad = ~np.isfinite(found.anomaly)
    for k in np.flatnonzero(bad):
        reasons[idx[k]] = reasons[idx[k]] or "search produced a non-finite score"
    anomaly, residual, discrimination = (np.full(n, np.nan) for _ in range(3))
    anomaly[idx], residual[idx] = found.anomaly, found.residual
    discrimination[idx] = found.discrimination
    steps = np.zeros(n, dtype=np.int32)
    steps[idx] = found.steps
    maps: list[bytes | None] = [None] * n
    latents: list[bytes | None] = [None] * n
    heats: list[bytes | None] = [None] * n
    thumbs: list[bytes | None] = [None] * n
    cells = patch_cells(found.residual_map, spec.size)
    shades = patch_thumbs(pixels[idx], spec.size, PIXEL_MAX[spec.dtype])
    for k, (j, raw) in enumerate(zip(idx, encode_maps(found.residual_map, encoding), strict=True)):
        maps[j], latents[j] = raw, found.z[k].astype("<f4").tobytes()
        heats[j], thumbs[j] = cells[k].tobytes(), shades[k].tobytes()

    scored = np.array([r is None for r in reasons], dtype=bool)
    nulls = ~scored
    p_values, flagged = _decisions(anomaly, nulls, calibration, fpr)

    def col(name: str, typ: pa.DataType) -> pa.Array:
        if name in table.column_names:
            return table.column(name).combine_chunks().cast(typ)
        return pa.nulls(n, typ)

    s = spec.size
    return pa.table(
        {
            PATCH_ID: col(PATCH_ID, pa.string()),
            SCAN_ID: col(SCAN_ID, pa.string()),
            X: int32_or_null(table, X),
            Y: int32_or_null(table, Y),
            SLICE: int32_or_null(table, SLICE),
            LABEL: col(LABEL, pa.string()),
            ANOMALY_SCORE: pa.array(anomaly, pa.float64(), mask=nulls),
            RESIDUAL_SCORE: pa.array(residual, pa.float64(), mask=nulls),
            DISCRIMINATION_SCORE: pa.array(discrimination, pa.float64(), mask=nulls),
            RESIDUAL_MAP: pa.array(
                [m if k else None for m, k in zip(maps, scored, strict=True)], pa.binary()
            ),
            LATENT: pa.array(
                [z if k else None for z, k in zip(latents, scored, strict=True)], pa.binary()
            ),
            HEAT: pa.array(
                [h if k else None for h, k in zip(heats, scored, strict=True)], pa.binary()
            ),
            THUMB: pa.array(
                [t if k else None for t, k in zip(thumbs, scored, strict=True)], pa.binary()
            ),
            SEARCH_STEPS: pa.array(steps, pa.int32(), mask=nulls),
            P_VALUE: p_values,
            FLAGGED: flagged,
            HEIGHT: pa.array(np.full(n, s, np.int32), pa.int32()),
            WIDTH: pa.array(np.full(n, s, np.int32), pa.int32()),
            CHANNELS: pa.array(np.full(n, spec.channels, np.int32), pa.int32()),
            JOB_ID: pa.array([job_id] * n, pa.string()),
            MODEL_ID: pa.array([model.model_id] * n, pa.string()),
            REASON: pa.array(reasons, pa.string()),
        },
        schema=scorer_schema(),
    )


def encode_maps(maps: np.ndarray, encoding: str = "float32") -> list[bytes | None]:
    """(B, C, S, S) float32 maps from the search -> `residual_map` values: (S, S, C) layout,
    float16 ("compact") or float32 little-endian (io/patches.MAP_DTYPES); "none": no map.
    torch converts: its float16 conversion is vectorised, 3x numpy's (docs/performance.md)."""
    import torch

    from anogan_batch.io.patches import MAP_DTYPES

    if encoding == "none":
        return [None] * len(maps)
    dtype = torch.float16 if MAP_DTYPES[encoding].itemsize == 2 else torch.float32
    hwc = torch.from_numpy(maps).permute(0, 2, 3, 1).to(dtype).contiguous().numpy()
    return [row.tobytes() for row in hwc]


def _decisions(anomaly, nulls, calibration, fpr) -> tuple[pa.Array, pa.Array]:
    """(p_value, flagged) columns: conformal p-values against the calibration, and p <= fpr."""
    import pyarrow as pa

    from anogan_batch.core.calibration import conformal_p_values

    n = len(anomaly)
    if calibration is None:
        return pa.nulls(n, pa.float64()), pa.nulls(n, pa.bool_())
    p = conformal_p_values(anomaly, calibration)
    p_values = pa.array(p, pa.float64(), mask=nulls)
    if fpr is None:
        return p_values, pa.nulls(n, pa.bool_())
    return p_values, pa.array(p <= fpr, pa.bool_(), mask=nulls)


class PatchScorer:
    """Ray Data callable class: one frozen G/D per actor, `__call__` per batch of rows."""

    def __init__(
        self,
        model: str | ModelCard,
        search: SearchConfig,
        job_id: str,
        device: str = "auto",
        threads: int | None = None,
        progress=None,
        calibration: np.ndarray | None = None,
        fpr: float | None = None,
        residual_maps: str = "compact",
    ) -> None:
        """`model`: a MODEL_DIR, or the job's ModelCard (model.json already read and checked
        by the driver; the weights are checked against its model_id as they load).
        `progress`: the job's Progress counter actor (rows done, telemetry, device faults)."""
        import torch

        from anogan_batch.core import devices
        from anogan_batch.core.modeldir import ModelCard, load_model
        from anogan_batch.core.scoring import SearchLimit

        if threads:
            torch.set_num_threads(threads)
        self.device = devices.pick_device(device or "auto", devices.granted_gpus())
        settings = devices.configure(self.device)
        card = model if isinstance(model, ModelCard) else None
        loaded = load_model(card.model_dir if card else str(model), card=card)
        self.model = loaded.for_scoring(self.device)
        self.search = search
        self.job_id = job_id
        self.calibration, self.fpr = calibration, fpr
        self.progress = progress
        self.residual_maps = residual_maps
        self.searcher = DeviceThread()
        fit, per_patch = self._rows_that_fit()
        # from the device's free memory, then lowered by any out-of-memory error
        self.limit = SearchLimit(fit)
        self.info = {
            "where": devices.where(),
            "node_id": devices.node_id(),
            "gpu_ids": devices.granted_gpus(),
            "pid": os.getpid(),
            **devices.describe(self.device),
            "settings": settings,
            "patch_footprint_mb": per_patch and round(per_patch / 2**20, 3),
            "memory_limit": fit,
        }
        if progress is not None:
            progress.register.remote(self.info)
        log.info("scorer %s: model %s", self.info, self.model.model_id[:12])

    def _rows_that_fit(self) -> tuple[int | None, float | None]:
        """On a GPU: (patches one search may hold in the free memory, measured bytes per
        patch); elsewhere (None, None), no limit."""
        from dataclasses import replace

        from anogan_batch.core import devices
        from anogan_batch.core.scoring import device_search

        if not self.device.startswith("cuda"):
            return None, None
        probe = replace(self.search, iterations=min(self.search.iterations or 1, 2))
        c = self.model.config

        def search(pixels):
            ids = [f"probe-{i}" for i in range(len(pixels))]
            return device_search(self.model, pixels, ids, probe, self.device)

        per_patch = devices.search_footprint(search, c.channels, c.image_size, self.device)
        return devices.rows_that_fit(devices.free_memory(self.device), per_patch), per_patch

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            self._inject_sticky(batch)
            out = score_table(
                self.model,
                batch,
                self.search,
                job_id=self.job_id,
                device=self.device,
                calibration=self.calibration,
                fpr=self.fpr,
                limit=self.limit,
                encoding=self.residual_maps,
                searcher=self.searcher,
            )
        except Exception as e:
            from anogan_batch.core.devices import is_device_fault

            if not is_device_fault(e):
                raise
            self._device_fault(batch, e)
        if self.progress is not None:
            busy = self.searcher.take_busy()
            self.progress.add.remote(
                out.num_rows, os.getpid(), peak_rss_mb(), busy, self.limit.rows
            )
        return out

    def _device_fault(self, batch: pa.Table, error: Exception) -> NoReturn:
        """A device fault scoring `batch`: record it; then end this process, so that Ray
        restarts the actor (a fresh CUDA context) and retries the batch, or, when the batch
        has failed DEVICE_ATTEMPTS times, raise MachineError to fail the job."""
        import ray

        from anogan_batch.errors import MachineError

        if self.progress is None:  # in process: the caller decides
            raise error
        first = batch.column(PATCH_ID)[0].as_py() if batch.num_rows else None
        key = f"{first}|{batch.num_rows}"
        failures = ray.get(self.progress.device_fault.remote(key, self.info["where"], str(error)))
        if len(failures) >= DEVICE_ATTEMPTS:
            tried = "; ".join(f"{w}: {e}" for w, e in failures)
            raise MachineError(
                f"a batch of {batch.num_rows} patches (first patch_id {first!r}) failed on "
                f"{len(failures)} devices: {tried}. Nothing was quarantined; rerun the same "
                "command to resume the job and retry the batch"
            ) from error
        log.warning("device fault on %s: %s; ending this actor to retry the batch",
                  self.info["where"], error)  # fmt: skip
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(1)

    def _inject_sticky(self, batch: pa.Table) -> None:
        """The test-only `sticky` failpoint (core/devices.py), given this batch's attempt."""
        import ray

        from anogan_batch.core import devices

        if not devices.faults_injected() or not batch.num_rows:
            return
        ids = batch.column(PATCH_ID).to_pylist()
        key = f"{ids[0]}|{batch.num_rows}"
        attempt = ray.get(self.progress.faults_of.remote(key)) if self.progress else 0
        devices.inject_sticky(ids, attempt)
