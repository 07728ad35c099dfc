"""GAN training on the normal patches of a patch table (DCGAN recipe), then the encoder.

Adam(2e-4, β1 = 0.5), non-saturating generator loss, z ~ U(-1, 1). Deterministic on CPU for a
given seed: one torch.Generator drives shuffling and z, and deterministic kernels are enforced.

After the GAN, with G and D frozen, an encoder E is trained as in f-AnoGAN (Schlegl et al.
2019, izi_f): minimise mean (x - G(E(x)))^2 + κ · mean (f(x) - f(G(E(x))))^2 over the same
normal patches. The search then starts at z = E(x) instead of a random draw (docs/quality.md
has the measured effect); `encoder_epochs = 0` skips it.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from anogan_batch.core.devices import pick_device
from anogan_batch.core.model_config import TrainConfig
from anogan_batch.core.patch_data import TrainingData, load_training_patches
from anogan_batch.errors import InputError
from anogan_batch.io import storage
from anogan_batch.io.columns import (
    DTYPE,
)

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    config: Any  # ModelConfig
    generator: Any
    discriminator: Any
    history: list[tuple[int, float, float]]  # (step, loss_d, loss_g)
    device: str
    seconds: float
    encoder: Any = None  # frozen Encoder, or None when encoder_epochs == 0
    encoder_history: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)


def fit_gan(
    pixels: np.ndarray, dtype: str, cfg: TrainConfig, *, progress: bool = True
) -> FitResult:
    """Train G and D on pixels (N, S, S, C) of `dtype`; returns frozen CPU models."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from anogan_batch.core.model import (
        ModelConfig,
        build_models,
        contrast_range,
        freeze,
        model_input,
    )

    n, size, _, channels = pixels.shape
    pixels_t = torch.from_numpy(np.ascontiguousarray(pixels))
    norm_range = {}
    if cfg.input_norm == "contrast":
        low, high = contrast_range(pixels_t, dtype)
        if not high > low:
            raise InputError(
                "the training patches are all flat (no contrast to normalise); "
                "train with --input-norm none"
            )
        norm_range = {"norm_low": low, "norm_high": high}
    model_cfg = ModelConfig(
        image_size=size,
        channels=channels,
        latent_dim=cfg.latent_dim,
        g_width=cfg.g_width,
        d_width=cfg.d_width,
        d_norm=cfg.d_norm,
        pixel_dtype=dtype,
        encoder=cfg.encoder_epochs > 0,
        input_norm=cfg.input_norm,
        input_blur=cfg.input_blur,
        feature_layer=cfg.feature_layer,
        **norm_range,
    )
    device = torch.device(pick_device(cfg.device or "auto"))
    torch.manual_seed(cfg.seed)
    rng = torch.Generator().manual_seed(cfg.seed)
    g, d = build_models(model_cfg)
    g.to(device).train()
    d.to(device).train()
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    # the saved G is an EMA of the trained one (docs/quality.md: better fits of normal patches)
    ema = copy.deepcopy(g).requires_grad_(False) if cfg.g_ema else None
    ema_params = list(ema.parameters()) if ema is not None else []
    g_params = list(g.parameters())
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    x_all = model_input(pixels_t, model_cfg)  # (N, C, S, S)

    batch = min(cfg.batch_size, n)
    steps_per_epoch = n // batch  # drop the ragged last batch: BatchNorm dislikes tiny ones
    history: list[tuple[int, float, float]] = []
    started = time.time()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="train", unit="step", disable=not progress)
    try:
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=rng)
            for s in range(steps_per_epoch):
                real = _shifted(x_all[order[s * batch : (s + 1) * batch]], cfg, rng).to(device)
                z = (torch.rand(batch, cfg.latent_dim, generator=rng) * 2 - 1).to(device)
                fake = g(z)
                # D: real -> 1, fake -> 0
                logit_real, _ = d(real)
                logit_fake, _ = d(fake.detach())
                loss_d = F.binary_cross_entropy_with_logits(
                    logit_real, torch.ones_like(logit_real)
                ) + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                # G: non-saturating loss, maximise log D(G(z))
                logit_gen, _ = d(fake)
                loss_g = F.binary_cross_entropy_with_logits(logit_gen, torch.ones_like(logit_gen))
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                if ema is not None:
                    with torch.no_grad():
                        # warm-up (t+1)/(t+10): short runs average recent weights, not the init
                        t = epoch * steps_per_epoch + s
                        decay = min(cfg.g_ema, (t + 1) / (t + 10))
                        torch._foreach_lerp_(ema_params, g_params, 1.0 - decay)
                history.append((epoch * steps_per_epoch + s, loss_d.item(), loss_g.item()))
                bar.update(1)
                bar.set_postfix(
                    epoch=epoch + 1, loss_d=f"{history[-1][1]:.3f}", loss_g=f"{history[-1][2]:.3f}"
                )
    finally:
        bar.close()
        torch.use_deterministic_algorithms(previous)
    if ema is not None:
        g = _recalibrate_batchnorm(ema, cfg, rng, device)
    freeze(g, d)
    encoder, encoder_history = None, []
    if cfg.encoder_epochs:
        encoder, encoder_history = fit_encoder(g, d, model_cfg, x_all, cfg, progress=progress)
        encoder.cpu()
    return FitResult(
        model_cfg,
        g.cpu(),
        d.cpu(),
        history,
        str(device),
        time.time() - started,
        encoder,
        encoder_history,
    )


def _shifted(x, cfg: TrainConfig, rng):
    """x (B, C, S, S) with each patch moved by up to cfg.augment_shift pixels each way, the
    border repeated into the gap (TrainConfig.augment_shift)."""
    import torch
    import torch.nn.functional as F

    k = cfg.augment_shift
    if k == 0:
        return x
    size = x.shape[-1]
    padded = F.pad(x, (k, k, k, k), mode="replicate")  # (B, C, S + 2k, S + 2k)
    dy, dx = torch.randint(0, 2 * k + 1, (2, len(x)), generator=rng).tolist()
    return torch.stack(
        [
            padded[i, :, a : a + size, b : b + size]
            for i, (a, b) in enumerate(zip(dy, dx, strict=True))
        ]
    )


def _recalibrate_batchnorm(g, cfg: TrainConfig, rng, device, batches: int = 50):
    """BatchNorm statistics for averaged weights: the running stats G kept belong to its last
    weights, not to their average, so they are re-estimated from prior draws."""
    import torch
    from torch import nn

    for m in g.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below
    g.train()
    with torch.no_grad():
        for _ in range(batches):
            g((torch.rand(cfg.batch_size, cfg.latent_dim, generator=rng) * 2 - 1).to(device))
    for m in g.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    return g


def fit_encoder(g, d, model_cfg, x_all, cfg: TrainConfig, *, progress: bool = True):
    """izi_f: train E so that G(E(x)) matches x in pixels and in D's features; G, D frozen.

    x_all (N, C, S, S) in model space; G and D frozen on the training device; model_cfg the
    ModelConfig of G and D. -> (frozen E, history).
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from anogan_batch.core.model import build_encoder, freeze

    device = next(g.parameters()).device
    torch.manual_seed(cfg.seed + 1)
    rng = torch.Generator().manual_seed(cfg.seed + 1)
    e = build_encoder(model_cfg).to(device).train()
    opt = torch.optim.Adam(e.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    n = len(x_all)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = n // batch
    history: list[tuple[int, float]] = []
    bar = tqdm(
        total=cfg.encoder_epochs * steps_per_epoch,
        desc="encoder",
        unit="step",
        disable=not progress,
    )
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for epoch in range(cfg.encoder_epochs):
            order = torch.randperm(n, generator=rng)
            for s in range(steps_per_epoch):
                x = _shifted(x_all[order[s * batch : (s + 1) * batch]], cfg, rng).to(device)
                gz = g(e(x))
                fx, fgz = d.feature(x), d.feature(gz)
                loss = F.mse_loss(gz, x) + cfg.kappa * F.mse_loss(fgz, fx)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # G and D are frozen: only E's weights get gradients
                opt.step()
                history.append((epoch * steps_per_epoch + s, loss.item()))
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{history[-1][1]:.4f}")
    finally:
        bar.close()
        torch.use_deterministic_algorithms(previous)
    freeze(e)
    return e, history


def train_gan(patches: str, model_dir: str, cfg: TrainConfig, *, progress: bool = True) -> str:
    """Train on the normal patches of the table `patches`; write MODEL_DIR; return model_id."""
    from anogan_batch.core.modeldir import save_model
    from anogan_batch.io.tables import table_normalisation

    norm = table_normalisation(patches)  # read first: a mixed table fails before training
    data = load_training_patches(patches, cfg)
    if norm is not None and norm[DTYPE] != data.dtype:
        raise InputError(f"patch table '{patches}' records {norm} but holds {data.dtype} pixels")
    held_out = calibration_split(data, cfg)
    fit = fit_gan(data.pixels[~held_out], data.dtype, cfg, progress=progress)
    history = fit.history
    meta = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "training": {
            **{k: v for k, v in asdict(cfg).items() if k != "device"},
            "device": fit.device,
            "recipe": "DCGAN: Adam, non-saturating G loss, z ~ U(-1,1)",
            "steps": len(history),
            "duration_s": round(fit.seconds, 1),
            "final_loss_d": history[-1][1] if history else None,
            "final_loss_g": history[-1][2] if history else None,
        },
        "data": {
            "source": patches,
            "n_patches": int((~held_out).sum()),
            "n_calibration_patches": int(held_out.sum()),
            "skipped_rows": data.skipped,
            "fingerprint_sha256": data.fingerprint,
        },
        "versions": _versions(),
        "normalisation": {"window": None if norm is None else norm["window"]},
    }
    if fit.encoder is not None:
        meta["training"]["encoder"] = {
            "recipe": "f-AnoGAN izi_f: MSE(x, G(E(x))) + kappa * MSE(f(x), f(G(E(x))))",
            "epochs": cfg.encoder_epochs,
            "kappa": cfg.kappa,
            "steps": len(fit.encoder_history),
            "final_loss": fit.encoder_history[-1][1] if fit.encoder_history else None,
        }
    model_id = save_model(
        model_dir, fit.config, fit.generator, fit.discriminator, meta, encoder=fit.encoder
    )
    _write_artefacts(model_dir, fit.generator, fit.config, history, cfg.seed)
    if held_out.any():
        from anogan_batch.core.calibrating import calibrate_arrays

        calibrate_arrays(
            model_dir,
            data.pixels[held_out],
            [data.patch_ids[i] for i in np.flatnonzero(held_out)],
            data={
                "source": patches,
                "held_out_by": "train",
                "fraction": cfg.calibration_fraction,
                "scans": len({data.scan_ids[i] for i in np.flatnonzero(held_out)}),
            },
            device=cfg.device,
        )
    return model_id


def calibration_split(data: TrainingData, cfg: TrainConfig) -> np.ndarray:
    """True for the patches held out for calibration: whole scans, about
    `calibration_fraction` of them; none when that leaves fewer than MIN_CALIBRATION patches
    (too few for a p-value to decide with) or too few to train on."""
    from anogan_batch.core.calibration import MIN_CALIBRATION, split_by_scan

    none = np.zeros(len(data.pixels), dtype=bool)
    if cfg.calibration_fraction == 0:
        return none
    held_out = split_by_scan(data.scan_ids, cfg.calibration_fraction, cfg.seed)
    if held_out.sum() < MIN_CALIBRATION or (~held_out).sum() < 2 * cfg.batch_size:
        return none
    return held_out


def _versions() -> dict[str, Any]:
    import torch

    from anogan_batch import __version__

    return {"anogan_batch": __version__, "torch": torch.__version__}


def _write_artefacts(model_dir, g, model_cfg, history, seed: int) -> None:
    """samples.png (64 draws of G), losses.csv and loss_curve.svg."""
    import torch

    from anogan_batch.core.model import to_pixel_space
    from anogan_batch.io.plots import image_grid, line_chart_svg, png_bytes

    rng = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        z = torch.rand(64, model_cfg.latent_dim, generator=rng) * 2 - 1
        samples = to_pixel_space(g(z)).numpy()
    storage.write_bytes(storage.join(model_dir, "samples.png"), png_bytes(image_grid(samples)))

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "loss_d", "loss_g"])
    writer.writerows((s, f"{a:.6f}", f"{b:.6f}") for s, a, b in history)
    storage.write_bytes(storage.join(model_dir, "losses.csv"), buf.getvalue().encode())
    steps = [h[0] for h in history]
    svg = line_chart_svg(
        {"D loss": (steps, [h[1] for h in history]), "G loss": (steps, [h[2] for h in history])},
        title="GAN training losses",
        xlabel="step",
        ylabel="BCE loss",
    )
    storage.write_bytes(storage.join(model_dir, "loss_curve.svg"), svg.encode())
