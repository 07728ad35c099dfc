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
  does not depend on batch size, batch composition or order.
- z stays in the support of the U(-1, 1) prior: it is clamped to [-1, 1] after every step
  (projected gradient descent). Clamping keeps G in the region it was trained on; a
  reparametrisation like tanh(w) would slow the steps near the border.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from anogan_batch.config import check_float, check_int
from anogan_batch.model import Discriminator, Generator


@dataclass(frozen=True)
class SearchConfig:
    """Parameters of the latent search. Defaults follow the paper (Γ = 500, λ = 0.1)."""

    iterations: int = 500  # Γ
    lam: float = 0.1  # λ, weight of the discrimination (feature) loss
    lr: float = 0.05  # Adam step size on z in [-1, 1]^latent
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("iterations", self.iterations, min_value=0)
        check_float("lambda", self.lam, low=0.0, high=1.0)
        check_float("lr", self.lr, low=0.0, low_open=True)
        check_int("seed", self.seed, min_value=0)


@dataclass
class SearchResult:
    """Per-patch outputs of one batched search; row i belongs to input patch i."""

    anomaly_score: np.ndarray  # (B,) float64, (1-λ)·residual + λ·discrimination
    residual_score: np.ndarray  # (B,) float64, Σ|x - G(z)| over C·S·S pixels
    discrimination_score: np.ndarray  # (B,) float64, Σ|f(x) - f(G(z))| over D's feature layer
    residual_map: np.ndarray  # (B, C, S, S) float32, |x - G(z)|; sums to residual_score
    z: np.ndarray  # (B, latent) float32, the final latent
    generated: np.ndarray  # (B, C, S, S) float32, G(z) in model space


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


def _per_patch_losses(
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
) -> SearchResult:
    """Run the batched search on x (B, C, S, S) in model space, on x's device.

    G and D must be frozen (see `model.freeze`) and on the same device as x.
    """
    if generator.training or discriminator.training:
        raise RuntimeError("latent_search needs frozen models: call model.freeze(G, D) first")
    if len(patch_ids) != x.shape[0]:
        raise ValueError(f"{len(patch_ids)} patch ids for a batch of {x.shape[0]}")
    device = x.device
    z = initial_latents(patch_ids, cfg.seed, generator.latent_dim).to(device)
    z.requires_grad_(True)
    # foreach: one fused update for the whole (B, latent) tensor; the state is per element.
    optimiser = torch.optim.Adam([z], lr=cfg.lr, betas=(0.9, 0.999), foreach=True)
    with torch.no_grad():
        _, fx = discriminator(x)  # D's features of the patches: computed once, not per step

    for _ in range(cfg.iterations):
        optimiser.zero_grad(set_to_none=True)
        gz = generator(z)
        _, fgz = discriminator(gz)
        residual, discrimination = _per_patch_losses(x, fx, gz, fgz)
        loss = (1.0 - cfg.lam) * residual + cfg.lam * discrimination  # (B,)
        loss.sum().backward()  # Σ_i L_i: each z_i receives ∂L_i/∂z_i only
        optimiser.step()
        with torch.no_grad():
            z.clamp_(-1.0, 1.0)

    # Scores after the last step: one more forward at z_Γ.
    with torch.no_grad():
        gz = generator(z)
        _, fgz = discriminator(gz)
        residual_map = (x - gz).abs()
        # float64 sums of the float32 maps, so the stored map sums exactly to residual_score
        residual = residual_map.double().flatten(1).sum(1)
        discrimination = (fx - fgz).abs().double().flatten(1).sum(1)
        anomaly = (1.0 - cfg.lam) * residual + cfg.lam * discrimination

    return SearchResult(
        anomaly_score=anomaly.cpu().numpy(),
        residual_score=residual.cpu().numpy(),
        discrimination_score=discrimination.cpu().numpy(),
        residual_map=residual_map.float().cpu().numpy(),
        z=z.detach().cpu().numpy(),
        generated=gz.float().cpu().numpy(),
    )
