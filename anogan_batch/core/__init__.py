"""The method, torch and no Ray (may import io/, errors, fields).

- `model_config`: ModelConfig, TrainConfig. `search_config`: SearchConfig and the fields that
  change a score (SCORE_FIELDS: the search key).
- `model`: G, D, E (DCGAN) and the model input. `search`: the latent search.
- `scoring`: `search_batch`, the one loop that scores arrays, through OOM and faults.
- `devices`: which device, per-device settings, which failures are the machine's.
- `training`: fitting the GAN and encoder. `patch_data`: a patch table's patches in memory.
- `calibrating`: normal patches scored as a job does, stored as the model's calibration.
- `calibration`: conformal p-values, FDR, and the overlays' heat scale and cells.
- `modeldir`: MODEL_DIR (model.json, weights, calibrations).
"""
