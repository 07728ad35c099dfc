"""anogan-batch: distributed batch anomaly scoring of image archives with AnoGAN on Ray.

The library API (heavy imports stay inside these modules, so importing the package is cheap):

- `anogan_batch.core.training.train_gan` / `TrainConfig`: fit the GAN on normal patches.
- `anogan_batch.core.modeldir.load_model`: rebuild a trained model from MODEL_DIR.
- `anogan_batch.core.search.latent_search` / `SearchConfig`: score patches in process.
- `anogan_batch.job.pipeline.run_score_job` / `ScoreJobConfig`: the distributed Ray job.
- `anogan_batch.evaluation.evaluate.evaluate_job`: AUROC / AUPRC of a finished job.
"""

__version__ = "0.1.0"
