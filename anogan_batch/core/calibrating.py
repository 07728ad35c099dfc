"""Calibrating a trained model: its normal patches scored the way a job scores them, the scores
stored in MODEL_DIR as the calibration of one search (core/calibration.py has what a job
then does with them: p-values, FDR, the heat scale). `train` calibrates on the scans it held
out; `calibrate` on a site's own normal patches, without retraining."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from anogan_batch.core.devices import pick_device
from anogan_batch.core.model_config import TrainConfig
from anogan_batch.core.patch_data import load_training_patches
from anogan_batch.core.search_config import SearchConfig
from anogan_batch.errors import InputError

log = logging.getLogger(__name__)


def calibrate(
    model_dir: str,
    patches: str,
    *,
    normal_label: str | None = None,
    search: SearchConfig | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """(Re)calibrate a trained model on a site's own normal patches (a patch table), without
    retraining: the weights and model_id stay, the calibration for `search` is replaced."""
    from datetime import UTC, datetime

    from anogan_batch.core.modeldir import read_model_card

    card = read_model_card(model_dir)
    data = load_training_patches(patches, TrainConfig(normal_label=normal_label))
    spec = card.patch_spec
    if data.pixels.shape[1:] != (spec.size, spec.size, spec.channels) or data.dtype != spec.dtype:
        raise InputError(
            f"patch table '{patches}' holds {data.pixels.shape[1:]} {data.dtype} patches; "
            f"model '{model_dir}' reads {(spec.size, spec.size, spec.channels)} {spec.dtype}"
        )
    record = {
        "source": patches,
        "normal_label": normal_label,
        "held_out_by": "calibrate",
        "fingerprint_sha256": data.fingerprint,
        "calibrated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return calibrate_arrays(
        model_dir, data.pixels, data.patch_ids, data=record, search=search, device=device
    )


def calibrate_arrays(
    model_dir: str,
    pixels: np.ndarray,
    patch_ids: list[str],
    *,
    data: dict[str, Any],
    search: SearchConfig | None = None,
    device: str | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Score normal patches (N, S, S, C) with `search` (default: score's default search for
    this model), the way a job scores them, and store the scores as the model's calibration
    for that search. -> {calibration_id, n, search_key}."""
    import torch

    from anogan_batch.core.calibration import (
        HEAT_PATCHES,
        MIN_CALIBRATION,
        normal_heat,
        search_key,
    )
    from anogan_batch.core.modeldir import load_model, write_calibration
    from anogan_batch.core.scoring import SearchLimit, search_batch
    from anogan_batch.core.search import resolve_search

    if len(pixels) < MIN_CALIBRATION:
        raise InputError(
            f"{len(pixels)} normal patches to calibrate with; a calibration needs at least "
            f"{MIN_CALIBRATION} (the smallest p-value is 1/(n+1))"
        )
    model = load_model(model_dir)
    search = resolve_search(search or SearchConfig(), has_encoder=model.encoder is not None)
    device = pick_device(device or "auto")
    model.for_scoring(device)
    # the job's own loop (core/scoring.py): a device fault is raised, never a missing score
    scores, maps, excluded, limit = [], [], {}, SearchLimit()
    for lo in range(0, len(pixels), batch_size):
        ids = patch_ids[lo : lo + batch_size]
        x = torch.from_numpy(pixels[lo : lo + batch_size])
        found = search_batch(model, x, ids, search, device, limit)
        for k, why in found.failed.items():
            excluded[ids[k]] = why
        for k in np.flatnonzero(~np.isfinite(found.anomaly)):
            excluded.setdefault(ids[k], "search produced a non-finite score")
        finite = np.isfinite(found.anomaly)
        scores.append(found.anomaly[finite])
        if sum(len(m) for m in maps) < HEAT_PATCHES:
            maps.append(found.residual_map[finite])
    values = np.concatenate(scores)
    if excluded:  # as the job would quarantine them: named, not dropped in silence
        first = next(iter(excluded.items()))
        log.warning("calibration: %d of %d patches not scored, e.g. %r: %s",
                    len(excluded), len(pixels), *first)  # fmt: skip
        data = {**data, "excluded": len(excluded), "excluded_example": list(first)}
    heat = normal_heat(maps, model.config.image_size)
    calibration_id = write_calibration(model_dir, search, values, data, heat=heat)
    return {"calibration_id": calibration_id, "n": len(values), "search_key": search_key(search)}
