"""The scoring actor: loads the frozen model once, then scores batches of patch rows.

`PatchScorer` is the callable class Ray Data runs in an actor pool (`map_batches`); it is also
usable in process (the benchmark's baseline). Each output row carries either scores (`reason`
null) or a `reason` why the row could not be scored; the job's sink routes the latter to
`quarantine`. A batch whose search raises is quarantined with the error rather than failing the
job: one poisoned batch must not cost a night's run.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import numpy as np

from anogan_batch.core.configs import SearchConfig

if TYPE_CHECKING:
    import pyarrow as pa

    from anogan_batch.core.modeldir import LoadedModel, ModelCard

log = logging.getLogger(__name__)


def output_schema() -> pa.Schema:
    """Rows leaving the scorer: patch_scores columns plus `reason` (null when scored)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("patch_id", pa.string()),
            ("scan_id", pa.string()),
            ("x", pa.int32()),
            ("y", pa.int32()),
            ("label", pa.string()),
            ("anomaly_score", pa.float64()),
            ("residual_score", pa.float64()),
            ("discrimination_score", pa.float64()),
            ("residual_map", pa.binary()),  # float32 LE, (height, width, channels)
            ("latent", pa.binary()),  # float32 LE, the final z (latent_dim,)
            ("search_steps", pa.int32()),  # steps the search took (fewer with early stopping)
            ("p_value", pa.float64()),  # conformal p-value; null without a calibration
            ("flagged", pa.bool_()),  # p_value <= --fpr; null without --fpr or a calibration
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("channels", pa.int32()),
            ("job_id", pa.string()),
            ("model_id", pa.string()),
            ("reason", pa.string()),
        ]
    )


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def pick_device(requested: str | None = None) -> str:
    import torch

    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def score_table(
    model: LoadedModel,
    table: pa.Table,
    cfg: SearchConfig,
    *,
    job_id: str,
    device: str,
    calibration: np.ndarray | None = None,
    fpr: float | None = None,
) -> pa.Table:
    """Score one batch of patch rows in process; returns rows of `output_schema()`.
    `calibration`: the model's calibration scores for `cfg` (p-values; flags under `fpr`)."""
    import pyarrow as pa
    import torch

    from anogan_batch.core.model import model_input
    from anogan_batch.core.search import latent_search
    from anogan_batch.io.patches import decode_patches, encode_maps, int32_or_null

    spec = model.patch_spec
    n = table.num_rows
    pixels, reasons = decode_patches(table, spec)
    ok = np.array([r is None for r in reasons], dtype=bool)
    ids = table.column("patch_id").to_pylist()

    anomaly = np.full(n, np.nan)
    residual = np.full(n, np.nan)
    discrimination = np.full(n, np.nan)
    maps: list[bytes | None] = [None] * n
    latents: list[bytes | None] = [None] * n
    steps = np.zeros(n, dtype=np.int32)
    idx = np.flatnonzero(ok)
    if len(idx):
        try:
            x = model_input(torch.from_numpy(pixels[idx]), model.config).to(device)
            result = latent_search(
                model.generator, model.discriminator, x, [ids[i] for i in idx], cfg, model.encoder
            )
            anomaly[idx] = result.anomaly_score
            residual[idx] = result.residual_score
            discrimination[idx] = result.discrimination_score
            steps[idx] = result.steps
            for j, raw in zip(idx, encode_maps(result.residual_map), strict=True):
                maps[j] = raw
            for j, z in zip(idx, result.z.astype("<f4"), strict=True):
                latents[j] = z.tobytes()
            bad = ~np.isfinite(anomaly[idx])
            for j in idx[bad]:
                reasons[j] = "search produced a non-finite score"
        except Exception as e:  # quarantine the batch, keep the job alive
            log.exception("scoring a batch of %d patches failed", len(idx))
            for j in idx:
                reasons[j] = f"scoring failed: {type(e).__name__}: {e}"

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
            "patch_id": col("patch_id", pa.string()),
            "scan_id": col("scan_id", pa.string()),
            "x": int32_or_null(table, "x"),
            "y": int32_or_null(table, "y"),
            "label": col("label", pa.string()),
            "anomaly_score": pa.array(anomaly, pa.float64(), mask=nulls),
            "residual_score": pa.array(residual, pa.float64(), mask=nulls),
            "discrimination_score": pa.array(discrimination, pa.float64(), mask=nulls),
            "residual_map": pa.array(
                [m if k else None for m, k in zip(maps, scored, strict=True)], pa.binary()
            ),
            "latent": pa.array(
                [z if k else None for z, k in zip(latents, scored, strict=True)], pa.binary()
            ),
            "search_steps": pa.array(steps, pa.int32(), mask=nulls),
            "p_value": p_values,
            "flagged": flagged,
            "height": pa.array(np.full(n, s, np.int32), pa.int32()),
            "width": pa.array(np.full(n, s, np.int32), pa.int32()),
            "channels": pa.array(np.full(n, spec.channels, np.int32), pa.int32()),
            "job_id": pa.array([job_id] * n, pa.string()),
            "model_id": pa.array([model.model_id] * n, pa.string()),
            "reason": pa.array(reasons, pa.string()),
        },
        schema=output_schema(),
    )


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
        device: str | None = None,
        threads: int | None = None,
        progress=None,
        calibration: np.ndarray | None = None,
        fpr: float | None = None,
    ) -> None:
        """`model`: a MODEL_DIR, or the job's ModelCard (model.json already read and checked
        by the driver; the weights are checked against its model_id as they load)."""
        import torch

        from anogan_batch.core.modeldir import ModelCard, load_model

        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(device)
        card = model if isinstance(model, ModelCard) else None
        loaded = load_model(card.model_dir if card else str(model), card=card)
        self.model = loaded.for_scoring(self.device)
        self.search = search
        self.job_id = job_id
        self.calibration, self.fpr = calibration, fpr
        self.progress = progress  # optional Ray actor counting rows done, for the driver's bar
        log.info(
            "scorer on pid %d: model %s on %s", os.getpid(), self.model.model_id[:12], self.device
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        out = score_table(
            self.model,
            batch,
            self.search,
            job_id=self.job_id,
            device=self.device,
            calibration=self.calibration,
            fpr=self.fpr,
        )
        if self.progress is not None:
            busy = time.perf_counter() - started
            self.progress.add.remote(out.num_rows, os.getpid(), peak_rss_mb(), busy)
        return out
