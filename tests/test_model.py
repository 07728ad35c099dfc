"""DCGAN architecture: shapes for the supported sizes, the feature layer, config checks, input
normalisation."""

from __future__ import annotations

import pytest
import torch

from anogan_batch.core.model import (
    CONTRAST_FLOOR,
    ModelConfig,
    build_models,
    contrast_normalize,
    contrast_range,
    fold_batchnorm,
    freeze,
    gaussian_blur,
    model_input,
    to_model_space,
    to_pixel_space,
)
from anogan_batch.errors import ConfigError


@pytest.mark.parametrize(
    ("size", "channels", "base", "stages"),
    [(28, 1, 7, 2), (32, 3, 4, 3), (64, 1, 4, 4), (48, 3, 6, 3)],
)
def test_shapes(size, channels, base, stages):
    cfg = ModelConfig(
        image_size=size, channels=channels, latent_dim=10, g_width=4, d_width=4, feature_layer=-1
    )
    assert (cfg.base, cfg.stages) == (base, stages)
    g, d = build_models(cfg)
    freeze(g, d)
    x = g(torch.rand(3, 10) * 2 - 1)
    assert x.shape == (3, channels, size, size)
    assert x.min() >= -1 and x.max() <= 1
    logit, f = d(x)
    assert logit.shape == (3,)
    assert f.shape == (3, 4 * 2 ** (stages - 1), base, base)  # the layer the score uses


def test_spectral_norm_discriminator_builds():
    cfg = ModelConfig(
        image_size=28, g_width=4, d_width=4, latent_dim=8, d_norm="spectral", feature_layer=-1
    )
    g, d = build_models(cfg)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    assert d(g(torch.zeros(2, 8)))[1].shape == (2, 8, 7, 7)


@pytest.mark.parametrize(("layer", "shape"), [(0, (8, 16, 16)), (1, (16, 8, 8)), (-1, (32, 4, 4))])
def test_feature_layer_picks_the_block_and_leaves_the_logit_alone(layer, shape):
    """f is the output of block `feature_layer`; the weights and D's logit do not depend on it."""
    torch.manual_seed(0)
    ref_cfg = ModelConfig(image_size=32, latent_dim=8, g_width=4, d_width=8)
    _, ref = build_models(ref_cfg)
    _, d = build_models(
        ModelConfig(image_size=32, latent_dim=8, g_width=4, d_width=8, feature_layer=layer)
    )
    d.load_state_dict(ref.state_dict())  # same parameter names whatever the layer
    freeze(ref, d)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    logit, f = d(x)
    assert f.shape == (3, *shape)
    assert torch.equal(d.feature(x), f)
    torch.testing.assert_close(logit, ref(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_size", 30),
        ("image_size", 4),
        ("channels", 2),
        ("latent_dim", 0),
        ("prior", "gauss"),
        ("pixel_dtype", "int8"),
        ("d_norm", "layer"),
        ("input_norm", "zscore"),
        ("input_blur", -0.5),
        ("input_blur", 100.0),
        ("norm_high", -1.0),
        ("feature_layer", 4),  # the default 64x64 D has blocks 0..3 (or -4..-1)
        ("feature_layer", -5),
    ],
)
def test_bad_config_names_field(field, value):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        ModelConfig(**{field: value})


def test_pixel_normalisation_round_trip():
    pixels = torch.tensor([[[[0], [255]], [[128], [64]]]], dtype=torch.uint8)  # (1, 2, 2, 1)
    x = to_model_space(pixels, "uint8")
    assert x.shape == (1, 1, 2, 2)
    assert x.min() == -1 and x.max() == 1
    back = to_pixel_space(x) * 255
    torch.testing.assert_close(back, pixels.float(), atol=1e-4, rtol=0)
    assert to_model_space(torch.tensor([[[[65535]]]], dtype=torch.int32), "uint16").item() == 1


def test_contrast_normalisation_is_per_patch_and_brightness_free():
    """Zero mean and unit mean absolute deviation per patch; a patch's value does not depend
    on its brightness or contrast (a * x + b, a > 0) nor on the other patches in the batch."""
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    n = contrast_normalize(x)
    torch.testing.assert_close(n.mean(dim=(1, 2, 3)), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(n.abs().mean(dim=(1, 2, 3)), torch.ones(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(contrast_normalize(0.3 * x - 0.2), n, atol=1e-4, rtol=0)
    torch.testing.assert_close(contrast_normalize(x[2:3]), n[2:3])


def test_contrast_normalisation_does_not_blow_up_flat_patches():
    flat = torch.full((1, 1, 8, 8), -1.0)
    flat[0, 0, 0, 0] += 1e-3  # sensor noise on an empty patch
    n = contrast_normalize(flat)
    assert torch.isfinite(n).all()
    assert n.abs().max() < 1e-3 / CONTRAST_FLOOR + 1e-6


def test_model_input_maps_the_fitted_range_to_the_tanh_range():
    pixels = torch.randint(0, 256, (4, 28, 28, 1), dtype=torch.uint8)
    plain = ModelConfig(image_size=28, input_norm="none", input_blur=0.0)
    torch.testing.assert_close(model_input(pixels, plain), to_model_space(pixels, "uint8"))
    low, high = contrast_range(pixels, "uint8")
    cfg = ModelConfig(
        image_size=28, input_norm="contrast", norm_low=low, norm_high=high, input_blur=0.0
    )
    x = model_input(pixels, cfg)
    assert x.min().item() == pytest.approx(-1.0, abs=1e-5)
    assert x.max().item() == pytest.approx(1.0, abs=1e-5)


def test_input_blur_ends_the_model_input_per_patch():
    """The blur comes after the contrast map, patch by patch: a patch's input does not depend
    on its batch-mates, and a flat patch (a scan's background) stays exactly flat."""
    pixels = torch.randint(0, 256, (3, 28, 28, 1), dtype=torch.uint8)
    sharp = ModelConfig(image_size=28, input_blur=0.0)
    blurred = ModelConfig(image_size=28, input_blur=1.0)
    x = model_input(pixels, blurred)
    torch.testing.assert_close(x, gaussian_blur(model_input(pixels, sharp), 1.0))
    torch.testing.assert_close(model_input(pixels[1:2], blurred), x[1:2])
    flat = torch.full((1, 1, 28, 28), -0.25)
    torch.testing.assert_close(gaussian_blur(flat, 1.5), flat)


def test_blur_forgives_a_stroke_drawn_a_pixel_off_but_not_a_missing_one():
    """Why the model space is blurred: the residual of a stroke moved by one pixel shrinks
    under the blur (its +/- pair cancels), the residual of a stroke that is not there at all
    keeps its mass."""
    img = torch.full((1, 1, 28, 28), -1.0)
    img[..., 6:22, 12:14] = 1.0  # a vertical stroke
    moved = torch.roll(img, 1, dims=-1)
    extra = img.clone()
    extra[..., 13:15, 4:24] = 1.0  # a horizontal stroke across it

    def residual(a, b, sigma):
        if sigma:
            a, b = gaussian_blur(a, sigma), gaussian_blur(b, sigma)
        return (a - b).abs().sum().item()

    assert residual(img, moved, 1.0) < 0.7 * residual(img, moved, 0)
    assert residual(img, extra, 1.0) > 0.95 * residual(img, extra, 0)


def test_folding_batchnorm_keeps_g_and_drops_its_batchnorm():
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=32, g_width=8, d_width=8)
    g, _ = build_models(cfg)
    with torch.no_grad():  # BatchNorm statistics away from the (0, 1) defaults
        for _ in range(3):
            g(torch.rand(16, cfg.latent_dim) * 4 - 2)
    freeze(g)
    z = torch.rand(5, cfg.latent_dim) * 2 - 1
    before = g(z)
    assert fold_batchnorm(g) is g and g.batchnorm_folded
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in g.modules())
    assert not any(p.requires_grad for p in g.parameters())
    torch.testing.assert_close(g(z), before, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="frozen"):
        fold_batchnorm(build_models(cfg)[0])  # train mode: the statistics are not fixed yet
