"""The Python API for notebooks: one detector with pyod's contract (fit, then score; higher is
more anomalous), on arrays of patches, in this process.

    det = Detector.load("model/")                  # or Detector.fit(normal_patches)
    s = det.score(patches)                         # (N, S, S[, C]) uint8 / uint16 / float32
    s.anomaly_score, s.residual_map                # (N,), (N, S, S, C)

`score` runs the job's own scoring code (job/scorer.py: the same model input, latent search
and scores), so a patch gets the numbers `anogan-batch score` gives it when it has the same
`patch_id` (the prior start is seeded by it). Use the Ray job for archives; this is for a
notebook's few thousand patches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from anogan_batch.core.model_config import TrainConfig
from anogan_batch.core.search_config import SearchConfig
from anogan_batch.io.columns import (
    ANOMALY_SCORE,
    DISCRIMINATION_SCORE,
    P_VALUE,
    REASON,
    RESIDUAL_MAP,
    RESIDUAL_SCORE,
)

if TYPE_CHECKING:
    import numpy as np

    from anogan_batch.core.modeldir import LoadedModel


class Scores(NamedTuple):
    """Per-patch outputs of `Detector.score`; row i belongs to input patch i."""

    anomaly_score: np.ndarray  # (N,) float64, (1-λ)·residual + λ·discrimination; NaN: not scored
    residual_score: np.ndarray  # (N,) float64, Σ|x - G(z)|
    discrimination_score: np.ndarray  # (N,) float64, Σ|f(x) - f(G(z))|
    residual_map: np.ndarray  # (N, S, S, C) float32, |x - G(z)|; NaN where not scored
    reason: list[str | None]  # why a patch was not scored (as in the job's quarantine)
    p_value: np.ndarray  # (N,) conformal p-value; NaN without a calibration for the search


class Detector:
    """A trained AnoGAN (G, D and, when trained, the encoder E) and the search that scores."""

    def __init__(
        self, model: LoadedModel, search: SearchConfig | None = None, device: str | None = None
    ) -> None:
        from anogan_batch.core.devices import pick_device
        from anogan_batch.core.search import resolve_search

        self.model = model
        self.search = resolve_search(
            search or SearchConfig(), has_encoder=model.encoder is not None
        )
        self.device = pick_device(device or "auto")
        self.model_dir: str | None = None  # where it was loaded from (its calibrations)
        self._scoring: LoadedModel | None = None  # folded copy on the device, made once

    @classmethod
    def load(
        cls, model_dir: str, search: SearchConfig | None = None, device: str | None = None
    ) -> Detector:
        """The model `anogan-batch train` (or `Detector.save`) wrote to MODEL_DIR."""
        from anogan_batch.core.modeldir import load_model

        detector = cls(load_model(model_dir), search, device)
        detector.model_dir = model_dir
        return detector

    def calibration(self) -> np.ndarray | None:
        """The model's calibration scores for this detector's search (sorted), or None."""
        from anogan_batch.core.modeldir import read_calibration, read_model_card

        if self.model_dir is None:
            return None
        return read_calibration(read_model_card(self.model_dir), self.search)[0]

    @classmethod
    def fit(
        cls,
        patches: np.ndarray,
        config: TrainConfig | None = None,
        *,
        search: SearchConfig | None = None,
        progress: bool = False,
    ) -> Detector:
        """Train on normal patches (N, S, S[, C]) with `train`'s recipe (TrainConfig)."""
        import hashlib

        from anogan_batch.core.modeldir import LoadedModel, weights_bytes
        from anogan_batch.core.training import fit_gan

        cfg = config or TrainConfig()
        pixels = patches if patches.ndim == 4 else patches[..., None]
        fit = fit_gan(pixels, pixels.dtype.name, cfg, progress=progress)
        blob = weights_bytes(fit.generator, fit.discriminator, fit.encoder)
        meta = {"training": {"device": fit.device, "steps": len(fit.history)}}
        model = LoadedModel(
            fit.config,
            fit.generator,
            fit.discriminator,
            hashlib.sha256(blob).hexdigest(),  # the model_id `save` will write
            meta,
            fit.encoder,
        )
        return cls(model, search, cfg.device)

    def save(self, model_dir: str) -> str:
        """Write MODEL_DIR for `anogan-batch score` and `Detector.load`; -> model_id."""
        from anogan_batch.core.modeldir import save_model

        m = self.model
        return save_model(model_dir, m.config, m.generator, m.discriminator, m.meta, m.encoder)

    def score(self, patches: np.ndarray, ids: list[str] | None = None) -> Scores:
        """Scores and residual maps of patches (N, S, S[, C]) of the model's pixel dtype.
        `ids`: the patches' patch_ids (they seed the prior start; default '0', '1', ...)."""
        import numpy as np

        from anogan_batch.io.patches import decode_map
        from anogan_batch.io.tables import patch_table
        from anogan_batch.job.scorer import score_table

        ids = ids if ids is not None else [str(i) for i in range(len(patches))]
        table = patch_table(patches, ids=ids, scan_ids=ids)
        out = score_table(
            self._scoring_model(),
            table,
            self.search,
            job_id="notebook",
            device=self.device,
            calibration=self.calibration(),
        )
        size, channels = self.model.config.image_size, self.model.config.channels
        maps = np.full((len(ids), size, size, channels), np.nan, np.float32)
        for i, raw in enumerate(out.column(RESIDUAL_MAP).to_pylist()):
            if raw is not None:
                maps[i] = decode_map(raw, size, size, channels)

        def column(name: str) -> np.ndarray:
            return out.column(name).to_numpy(zero_copy_only=False).astype(np.float64)

        return Scores(
            column(ANOMALY_SCORE),
            column(RESIDUAL_SCORE),
            column(DISCRIMINATION_SCORE),
            maps,
            out.column(REASON).to_pylist(),
            column(P_VALUE),
        )

    def decision_function(self, patches: np.ndarray) -> np.ndarray:
        """pyod's name: the anomaly score of each patch (higher is more anomalous)."""
        return self.score(patches).anomaly_score

    def _scoring_model(self) -> LoadedModel:
        """A scoring-only copy (BatchNorm folded, on the device); `self.model` stays saveable."""
        import copy

        if self._scoring is None:
            self._scoring = copy.deepcopy(self.model).for_scoring(self.device)
        return self._scoring
