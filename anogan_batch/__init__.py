"""anogan-batch: distributed batch anomaly scoring of image archives with AnoGAN on Ray.

For notebooks: `anogan_batch.Detector` (api.py), pyod's contract on arrays of patches:

    det = anogan_batch.Detector.load("model/")     # or Detector.fit(normal_patches)
    scores = det.score(patches)                    # .anomaly_score, .residual_map, ...

For archives: the `anogan-batch` commands (cli.py), or `anogan_batch.job.runner.run_score_job`
with a `ScoreJobConfig` (job/score_config.py). The layers are described in docs/architecture.md.
Importing the package is cheap: heavy libraries load when first used.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Detector", "Scores", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Detector", "Scores"):  # lazily: torch loads only when the API is used
        from anogan_batch import api

        return getattr(api, name)
    raise AttributeError(f"module 'anogan_batch' has no attribute {name!r}")
