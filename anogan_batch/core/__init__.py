"""The method, torch and no Ray (may import io/, errors, config).

- `configs`: ModelConfig, SearchConfig, TrainConfig: every model and search default.
- `model`: G, D, E (DCGAN) and the model input. `search`: the latent search.
- `scoring`: `search_batch`, the one loop that scores arrays, through OOM and faults.
- `devices`: which device, per-device settings, which failures are the machine's.
- `training`: fitting the GAN and encoder, and calibrating. `modeldir`: MODEL_DIR.
- `calibration`: conformal p-values, FDR, and the overlays' heat scale and cells.
"""
