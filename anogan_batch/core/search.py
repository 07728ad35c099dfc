"""The AnoGAN latent search: find z with G(z) close to a patch, batched over patches.

For a batch x (B, C, S, S) in model space, minimise per patch

    L_i(z_i) = (1 - λ) Σ|x_i - G(z_i)| + λ Σ|f(x_i) - f(G(z_i))|

with Adam for Γ steps, where f is D's feature layer. The batch is one tensor z (B, latent), and
the optimiser minimises Σ_i L_i: patch i's loss depends only on z_i, so ∂(Σ L)/∂z_i = ∂L_i/∂z_i,
and Adam's moments are element-wise, so every patch gets exactly its own gradient and its own
optimiser state. Batching changes the speed, not the answer.

Invariants the tests hold this module to:
- G and D are frozen (eval mode, requires_grad False): BatchNorm uses running statistics, so a
  patch's result never depends on its batch-mates, and no weight ever changes.
- z_i starts from a generator seeded by (seed, patch_id), not from a shared stream, so a result
  does not depend on batch size, batch composition or order. With `start="encoder"` it starts
  at E(x_i) instead (f-AnoGAN's izi_f); the frozen encoder maps each patch on its own too.
- z stays in the support of the U(-1, 1) prior: it is clamped to [-1, 1] after every step
  (projected gradient descent). Clamping keeps G in the region it was trained on; a
  reparametrisation like tanh(w) would slow the steps near the border.

Precision: with `precision="bf16"` the search steps run G and D under bf16 autocast (tensor
cores on GPU, AVX-512 BF16 / AMX on CPU); z, Adam's state and the final scoring forward stay
fp32, so only the path to z_Γ is approximate (docs/performance.md has the measured effect).

Early stopping (`stop_tol`, off by default, which is the paper's fixed Γ): a patch stops when
its loss fell by less than `stop_tol` (relative) over the last `stop_window` steps, after at
least `min_iterations` steps. The test looks at that patch's own losses only, and Adam's state
(including its step count, for the bias correction) is per patch, so early stopping keeps every
invariant above. Stopped patches leave the working set and waiting patches take their slots
(`slots` patches are searched at once), so the hardware stays busy until the batch is done.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from anogan_batch.core.model import Discriminator, Encoder, Generator
from anogan_batch.core.search_config import PAPER, POLISH, SearchConfig


@dataclass
class SearchResult:
    """Per-patch outputs of one batched search; row i belongs to input patch i."""

    anomaly_score: np.ndarray  # (B,) float64, (1-λ)·residual + λ·discrimination
    residual_score: np.ndarray  # (B,) float64, Σ|x - G(z)| over C·S·S pixels
    discrimination_score: np.ndarray  # (B,) float64, Σ|f(x) - f(G(z))| over D's feature layer
    residual_map: np.ndarray  # (B, C, S, S) float32, |x - G(z)|; sums to residual_score
    z: np.ndarray  # (B, latent) float32, the final latent
    steps: np.ndarray  # (B,) int32, search steps taken (G evaluations = steps + 1)


SUM_ROWS = 64  # patches whose float64 copy `_sums64` holds at once


def _sums64(values: torch.Tensor) -> torch.Tensor:
    """Per-patch float64 sums of float32 values (B, ...), SUM_ROWS patches at a time: a whole
    batch's float64 copy of D's first feature map is 512 MiB at batch 1,024 (64x64)."""
    flat = values.flatten(1)
    return torch.cat([chunk.double().sum(1) for chunk in flat.split(SUM_ROWS)])


def patch_seed(seed: int, patch_id: str) -> int:
    """A 63-bit seed from (seed, patch_id), the same on every machine and in every batch."""
    digest = hashlib.sha256(f"{seed}\x00{patch_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def initial_latents(patch_ids: Sequence[str], seed: int, latent_dim: int) -> torch.Tensor:
    """z_0 ~ U(-1, 1)^latent for each patch, drawn on the CPU so every device starts alike."""
    z = torch.empty(len(patch_ids), latent_dim)
    gen = torch.Generator()
    for i, pid in enumerate(patch_ids):
        gen.manual_seed(patch_seed(seed, pid))
        z[i].uniform_(-1.0, 1.0, generator=gen)
    return z


def resolve_search(cfg: SearchConfig, *, has_encoder: bool) -> SearchConfig:
    """The concrete search for a model: start="auto" becomes the encoder when the model has
    one, else the prior; an unset Γ or step size takes that start's default (PAPER, POLISH).
    Refuses start="encoder" for a model without an encoder."""
    from dataclasses import replace

    from anogan_batch.errors import ConfigError

    start = cfg.start
    if start == "auto":
        start = "encoder" if has_encoder else "prior"
    elif start == "encoder" and not has_encoder:
        raise ConfigError(
            "start", "encoder", "the model has no encoder (train it with --encoder-epochs > 0)"
        )
    iterations, lr = POLISH if start == "encoder" else PAPER
    return replace(
        cfg,
        start=start,
        iterations=iterations if cfg.iterations is None else cfg.iterations,
        lr=lr if cfg.lr is None else cfg.lr,
    )


def per_patch_losses(
    x: torch.Tensor, fx: torch.Tensor, gz: torch.Tensor, fgz: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # (B, ...) -> (B,): sums over every non-batch dimension, so nothing mixes across patches
    residual = (x - gz).abs().flatten(1).sum(1)
    discrimination = (fx - fgz).abs().flatten(1).sum(1)
    return residual, discrimination


def latent_search(
    generator: Generator,
    discriminator: Discriminator,
    x: torch.Tensor,
    patch_ids: Sequence[str],
    cfg: SearchConfig,
    encoder: Encoder | None = None,
) -> SearchResult:
    """Run the batched search on x (B, C, S, S) in model space, on x's device.

    G and D (and the encoder, needed when cfg.start == "encoder") must be frozen (see
    `model.freeze`) and on the same device as x.
    """
    if generator.training or discriminator.training or (encoder and encoder.training):
        raise RuntimeError("latent_search needs frozen models: call model.freeze(G, D) first")
    if len(patch_ids) != x.shape[0]:
        raise ValueError(f"{len(patch_ids)} patch ids for a batch of {x.shape[0]}")
    cfg = resolve_search(cfg, has_encoder=encoder is not None)
    x = x.contiguous(memory_format=torch.channels_last)  # see LoadedModel.for_scoring
    with torch.no_grad():
        fx = discriminator.feature(x)  # D's features of the patches: once, not per step
        if cfg.start == "encoder":
            z = encoder(x).float().clamp(-1.0, 1.0)
        else:
            z = initial_latents(patch_ids, cfg.seed, generator.latent_dim).to(x.device)
    steps = _search(generator, discriminator, x, fx, z, cfg)

    # Scores after the last step: one more forward at z_Γ.
    with torch.no_grad():
        gz = generator(z)
        fgz = discriminator.feature(gz)
        residual_map = (x - gz).abs()
        # float64 sums of the float32 maps, so the stored map sums exactly to residual_score
        residual = _sums64(residual_map)
        discrimination = _sums64((fx - fgz).abs())
        anomaly = (1.0 - cfg.lam) * residual + cfg.lam * discrimination

    return SearchResult(
        anomaly_score=anomaly.cpu().numpy(),
        residual_score=residual.cpu().numpy(),
        discrimination_score=discrimination.cpu().numpy(),
        residual_map=residual_map.float().cpu().numpy(),
        z=z.detach().cpu().numpy(),
        steps=steps.cpu().numpy().astype(np.int32),
    )


BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def _search(
    generator: Generator,
    discriminator: Discriminator,
    x: torch.Tensor,
    fx_all: torch.Tensor,
    z_all: torch.Tensor,
    cfg: SearchConfig,
) -> torch.Tensor:
    """Optimise z_all (B, latent) in place for patches x with D features fx_all.
    -> steps taken per patch (B,).

    Adam is written out (torch.optim.Adam's update, betas 0.9/0.999, eps 1e-8) because each
    patch needs its own step count: with early stopping, patches join the working set mid-way.
    """
    n = x.shape[0]
    device = x.device
    slots = min(n, cfg.slots or n)
    steps = torch.zeros(n, dtype=torch.int64, device=device)
    if cfg.iterations == 0 or n == 0:
        return steps
    active = torch.arange(slots, device=device)  # row of z_all held by each slot
    waiting = list(range(slots, n))
    z = z_all[active].clone()
    m, v = torch.zeros_like(z), torch.zeros_like(z)
    t = torch.zeros(slots, dtype=torch.float64, device=device)
    history = torch.full((slots, cfg.stop_window + 1), float("inf"), device=device)
    autocast = torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"
    )
    cohort_steps = 0  # steps since the working set last changed
    while active.numel():
        z.requires_grad_(True)
        with autocast:
            gz = generator(z)
            fgz = discriminator.feature(gz)
        gz, fgz = gz.float(), fgz.float()
        residual, discrimination = per_patch_losses(x[active], fx_all[active], gz, fgz)
        loss = (1.0 - cfg.lam) * residual + cfg.lam * discrimination  # (slots,)
        (grad,) = torch.autograd.grad(loss.sum(), z)  # Σ_i L_i: z_i gets ∂L_i/∂z_i only
        with torch.no_grad():
            z = z.detach()
            t += 1
            m.lerp_(grad, 1 - BETA1)
            v.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
            # bias corrections in float64, as torch computes them from a Python step count
            step_size = (cfg.lr / (1 - BETA1 ** t.double())).float()[:, None]
            bias2_sqrt = ((1 - BETA2 ** t.double()) ** 0.5).float()[:, None]
            z.sub_(step_size * (m / (v.sqrt() / bias2_sqrt).add_(EPS)))
            z.clamp_(-1.0, 1.0)
            cohort_steps += 1
            if cfg.stop_tol is None:
                # fixed Γ: the working set moves in lockstep, so the step count known here
                # says when it is done; asking the device (bool of a tensor) would stall a
                # GPU's queue once per step
                if cohort_steps < cfg.iterations:
                    continue
                done = torch.ones(active.numel(), dtype=torch.bool, device=device)
            else:
                history = torch.cat([history[:, 1:], loss.detach()[:, None]], dim=1)
                old, new = history[:, 0], history[:, -1]
                flat = (old - new) <= cfg.stop_tol * old.abs()
                done = (t >= cfg.iterations) | (
                    flat & (t >= cfg.min_iterations) & (t > cfg.stop_window)
                )
                if not bool(done.any()):
                    continue
        finished = active[done]
        z_all[finished] = z[done]
        steps[finished] = t[done].long()
        keep = ~done
        refill = waiting[: int(done.sum())]
        waiting = waiting[len(refill) :]
        new_rows = torch.tensor(refill, dtype=torch.int64, device=device)
        k = len(refill)
        active = torch.cat([active[keep], new_rows])
        z = torch.cat([z[keep], z_all[new_rows]])
        m = torch.cat([m[keep], torch.zeros(k, z.shape[1], device=device)])
        v = torch.cat([v[keep], torch.zeros(k, z.shape[1], device=device)])
        t = torch.cat([t[keep], torch.zeros(k, dtype=t.dtype, device=device)])
        fresh = torch.full((k, history.shape[1]), float("inf"), device=device)
        history = torch.cat([history[keep], fresh])
        cohort_steps = 0
    return steps
