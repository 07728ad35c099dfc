"""DCGAN generator and discriminator for square patches (Radford et al. 2016; Schlegl et al. 2017).

Pure model code: no file or CLI I/O. A model is rebuilt from its `ModelConfig` alone, which is
saved in `model.json` next to the weights (see `modeldir.py`).

Shapes for image size S, C channels, width w, n = number of stride-2 stages, base = S / 2**n:

    G: z (B, latent) -> (B, w*2**(n-1), base, base) -> ... -> (B, w, S/2, S/2) -> (B, C, S, S)
    D: x (B, C, S, S) -> (B, w, S/2, S/2) -> ... -> (B, w*2**(n-1), base, base) -> logit (B,)
    E: x (B, C, S, S) -> (B, w, S/2, S/2) -> ... -> (B, w*2**(n-1)*base*base) -> z (B, latent)

f(x), the output of one of D's convolutional blocks (`feature_layer`: 0 the first, of shape
(B, w, S/2, S/2); -1 the last, (B, w*2**(n-1), base, base)), is the feature layer of the AnoGAN
discrimination loss, never D's sigmoid output.
"""

from __future__ import annotations

import math
from itertools import islice

import torch
from torch import nn

from anogan_batch.core.model_config import ModelConfig
from anogan_batch.fields import PIXEL_MAX

# Floor on a patch's mean absolute deviation (model units) in contrast normalisation, so that
# a flat patch's sensor noise is not blown up to the contrast of a real structure.
CONTRAST_FLOOR = 0.02


class Generator(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n, w = cfg.stages, cfg.g_width
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(cfg.latent_dim, w * 2 ** (n - 1), cfg.base, 1, 0, bias=False),
            nn.BatchNorm2d(w * 2 ** (n - 1)),
            nn.ReLU(True),
        ]
        for i in reversed(range(n - 1)):  # each block doubles the side, halves the channels
            layers += [
                nn.ConvTranspose2d(w * 2 ** (i + 1), w * 2**i, 4, 2, 1, bias=False),
                nn.BatchNorm2d(w * 2**i),
                nn.ReLU(True),
            ]
        layers += [nn.ConvTranspose2d(w, cfg.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.latent_dim = cfg.latent_dim

    @property
    def batchnorm_folded(self) -> bool:
        """True after fold_batchnorm (every block has BatchNorm when built): scoring only."""
        return not any(isinstance(m, nn.BatchNorm2d) for m in self.net)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: (B, latent) -> (B, latent, 1, 1) -> image (B, C, S, S) in [-1, 1]
        return self.net(z[:, :, None, None])


def _maybe_sn(conv: nn.Conv2d, norm: str) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(conv) if norm == "spectral" else conv


class Discriminator(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n, w = cfg.stages, cfg.d_width
        layers: list[nn.Module] = [
            _maybe_sn(nn.Conv2d(cfg.channels, w, 4, 2, 1, bias=False), cfg.d_norm),
            nn.LeakyReLU(0.2, True),
        ]
        block_ends = [len(layers)]
        for i in range(1, n):  # each block halves the side, doubles the channels
            layers.append(
                _maybe_sn(nn.Conv2d(w * 2 ** (i - 1), w * 2**i, 4, 2, 1, bias=False), cfg.d_norm)
            )
            if cfg.d_norm == "batch":
                layers.append(nn.BatchNorm2d(w * 2**i))
            layers.append(nn.LeakyReLU(0.2, True))
            block_ends.append(len(layers))
        self.features = nn.Sequential(*layers)  # every block (the name keeps old weights loading)
        self.head = _maybe_sn(
            nn.Conv2d(w * 2 ** (n - 1), 1, cfg.base, 1, 0, bias=False), cfg.d_norm
        )
        self.feature_end = block_ends[cfg.feature_layer]  # modules of `features` that f spans

    def feature(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) alone (what the latent search needs): D's blocks up to `feature_layer`."""
        for module in islice(self.features, self.feature_end):
            x = module(x)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logit (B,), f(x), the output of block `feature_layer`)."""
        f = self.feature(x)
        h = f
        # the module after f is a convolution, never an in-place activation, so f stays intact
        for module in islice(self.features, self.feature_end, None):
            h = module(h)
        return self.head(h).flatten(), f


class Encoder(nn.Module):
    """E: x -> z, trained after the GAN so that G(E(x)) reconstructs normal patches.

    D's convolutional layout (BatchNorm, run in eval mode when frozen) and a linear map to the
    latent; tanh keeps E(x) inside the U(-1, 1) prior's box, where the search keeps z too.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n, w = cfg.stages, cfg.d_width
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels, w, 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, n):
            layers += [
                nn.Conv2d(w * 2 ** (i - 1), w * 2**i, 4, 2, 1, bias=False),
                nn.BatchNorm2d(w * 2**i),
                nn.LeakyReLU(0.2),
            ]
        self.net = nn.Sequential(
            *layers,
            nn.Flatten(),  # (B, w*2**(n-1), base, base) -> (B, w*2**(n-1)*base*base)
            nn.Linear(w * 2 ** (n - 1) * cfg.base**2, cfg.latent_dim),
            nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, C, S, S) -> (B, latent) in (-1, 1)


def build_encoder(cfg: ModelConfig) -> Encoder:
    """A fresh encoder with the DCGAN initialisation."""
    e = Encoder(cfg)
    _dcgan_init(e)
    return e


def build_models(cfg: ModelConfig) -> tuple[Generator, Discriminator]:
    """Fresh G and D with the DCGAN initialisation (N(0, 0.02) convs, N(1, 0.02) BN scales)."""
    g, d = Generator(cfg), Discriminator(cfg)
    _dcgan_init(g, d)
    return g, d


def _dcgan_init(*nets: nn.Module) -> None:
    for module in (m for net in nets for m in net.modules()):
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            weight = getattr(module, "parametrizations", None)
            target = weight.weight.original if weight is not None else module.weight
            nn.init.normal_(target, 0.0, 0.02)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)


def fold_batchnorm(generator: Generator) -> Generator:
    """Fold each eval-mode BatchNorm of a frozen G into the transposed convolution before it.

    In eval mode BatchNorm is a per-channel affine map, so conv -> BN is one conv with scaled
    weights and a bias: the same G(z) (to float rounding) without BN's forward and backward
    passes in every search step (+5 % search throughput on the bench's CPU). Scoring only: the
    folded G has other weights' names, and `save_model` refuses it.
    """
    if generator.training:
        raise ValueError("fold_batchnorm needs a frozen (eval-mode) generator")
    layers, folded = list(generator.net), []
    while layers:
        m = layers.pop(0)
        if isinstance(m, nn.ConvTranspose2d) and layers and isinstance(layers[0], nn.BatchNorm2d):
            bn = layers.pop(0)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (out,)
            conv = nn.ConvTranspose2d(
                m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, bias=True
            ).to(m.weight.device)
            with torch.no_grad():
                # ConvTranspose2d weights are (in, out, k, k): scale the output channels
                conv.weight.copy_(m.weight * scale[None, :, None, None])
                bias = m.bias if m.bias is not None else torch.zeros_like(scale)
                conv.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
            m = conv.eval().requires_grad_(False)
        folded.append(m)
    generator.net = nn.Sequential(*folded)
    return generator


def freeze(*modules: nn.Module) -> None:
    """Eval mode (BatchNorm uses running statistics) and no parameter gradients.

    Eval mode is what makes a patch's score independent of its batch-mates.
    """
    for m in modules:
        m.eval()
        m.requires_grad_(False)


def to_model_space(pixels: torch.Tensor, pixel_dtype: str) -> torch.Tensor:
    """Stored pixels (B, H, W, C) of `pixel_dtype` -> float32 (B, C, H, W) in [-1, 1]."""
    x = pixels.to(torch.float32).permute(0, 3, 1, 2)
    return x * (2.0 / PIXEL_MAX[pixel_dtype]) - 1.0


def contrast_normalize(x: torch.Tensor) -> torch.Tensor:
    """Global contrast normalisation with the L1 norm (the preprocessing of Ruff et al. 2018):
    per patch, subtract the mean and divide by the mean absolute deviation. (B, C, S, S) -> same.

    Why: a summed L1 residual ranks a faint or thin anomaly (a 1 against 8s) as normal because it
    has little ink to miss; after normalisation every patch carries the same total contrast, so
    thin strokes become bright ones that a generator of normal patches cannot reproduce.
    """
    centred = x - x.mean(dim=(1, 2, 3), keepdim=True)
    spread = centred.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(CONTRAST_FLOOR)
    return centred / spread


def contrast_range(pixels: torch.Tensor, pixel_dtype: str) -> tuple[float, float]:
    """(norm_low, norm_high): the extremes of the contrast-normalised training patches, which
    `model_input` maps onto [-1, 1] (Ruff et al.'s min-max scaling)."""
    normalized = contrast_normalize(to_model_space(pixels, pixel_dtype))
    return normalized.min().item(), normalized.max().item()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """x (B, C, H, W) blurred per channel by a Gaussian of σ = sigma pixels (radius ⌈3σ⌉, the
    border repeated outwards, so a patch's background stays its background). -> same shape."""
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    padded = nn.functional.pad(x, (radius,) * 4, mode="replicate")
    rows = nn.functional.conv2d(padded, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return nn.functional.conv2d(rows, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def model_input(pixels: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Stored pixels (B, H, W, C) -> float32 (B, C, H, W): what G, D and E of `cfg` read."""
    x = to_model_space(pixels, cfg.pixel_dtype)
    if cfg.input_norm == "contrast":
        scale = 2.0 / (cfg.norm_high - cfg.norm_low)
        x = (contrast_normalize(x) - cfg.norm_low) * scale - 1.0
    if cfg.input_blur:
        x = gaussian_blur(x, cfg.input_blur)
    return x


def describe_input(cfg: ModelConfig) -> str:
    """`model_input` in words, for model.json."""
    plain = "p = x / max(pixel_dtype) * 2 - 1, in [-1, 1] (G ends in tanh)"
    text = plain
    if cfg.input_norm == "contrast":
        text += (
            f"; then per patch c = (p - mean p) / max(mean |p - mean p|, {CONTRAST_FLOOR}); "
            "input = (c - norm_low) / (norm_high - norm_low) * 2 - 1 (architecture.norm_*)"
        )
    if cfg.input_blur:
        text += (
            f"; then a Gaussian blur of σ = {cfg.input_blur} px per channel "
            "(radius ceil(3σ), border repeated)"
        )
    return text


def to_pixel_space(x: torch.Tensor) -> torch.Tensor:
    """Model space (B, C, H, W) in [-1, 1] -> float (B, H, W, C) in [0, 1] for display."""
    return ((x.clamp(-1, 1) + 1.0) / 2.0).permute(0, 2, 3, 1)
