"""Training: deterministic on CPU, trains on normal rows only, writes its artefacts."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from anogan_batch.core.model_config import TrainConfig
from anogan_batch.core.patch_data import load_training_patches
from anogan_batch.core.training import fit_gan, train_gan
from anogan_batch.errors import InputError
from tests.conftest import make_patch_table

FAST = {
    "epochs": 1,
    "g_width": 4,
    "d_width": 4,
    "latent_dim": 8,
    "batch_size": 32,
    "encoder_epochs": 1,
}


@pytest.fixture(scope="module")
def mixed_table(tmp_path_factory, sample):
    images = sample["test_images"][:120]
    labels = [str(v) for v in sample["test_labels"][:120]]
    return str(make_patch_table(tmp_path_factory.mktemp("mixed") / "t", images, labels))


def test_same_seed_same_model_other_seed_other_model(tmp_path, mixed_table):
    ids = [
        train_gan(mixed_table, str(tmp_path / f"m{i}"), TrainConfig(**FAST), progress=False)
        for i in range(2)
    ]
    other = train_gan(
        mixed_table, str(tmp_path / "m3"), TrainConfig(**FAST, seed=1), progress=False
    )
    assert ids[0] == ids[1]
    assert other != ids[0]


def test_trains_only_on_the_normal_label(tmp_path, mixed_table, sample):
    data = load_training_patches(mixed_table, TrainConfig(normal_label="0"))
    expected = int((sample["test_labels"][:120] == 0).sum())
    assert len(data.pixels) == expected > 0
    train_gan(
        mixed_table, str(tmp_path / "m"), TrainConfig(**FAST, normal_label="0"), progress=False
    )
    doc = json.loads((tmp_path / "m" / "model.json").read_text())
    assert doc["data"]["n_patches"] == expected
    assert doc["training"]["normal_label"] == "0"
    assert (tmp_path / "m" / "losses.csv").read_text().startswith("step,loss_d,loss_g")


def test_fingerprint_follows_the_data(mixed_table):
    a = load_training_patches(mixed_table, TrainConfig(normal_label="0"))
    b = load_training_patches(mixed_table, TrainConfig(normal_label="1"))
    assert a.fingerprint != b.fingerprint
    assert (
        a.fingerprint
        == load_training_patches(mixed_table, TrainConfig(normal_label="0")).fingerprint
    )


def test_no_rows_with_label(mixed_table):
    with pytest.raises(InputError, match="no rows with label 'cat'"):
        load_training_patches(mixed_table, TrainConfig(normal_label="cat"))


def test_bad_config():
    from anogan_batch.errors import ConfigError

    with pytest.raises(ConfigError, match="'epochs'"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="'input_norm'"):
        TrainConfig(input_norm="zscore")
    with pytest.raises(ConfigError, match="'augment_shift'"):
        TrainConfig(augment_shift=-1)
    assert np.isclose(TrainConfig().lr, 2e-4) and TrainConfig().beta1 == 0.5


def test_shift_augmentation_moves_each_patch_within_its_bound():
    from anogan_batch.core.training import _shifted

    x = torch.zeros(64, 1, 12, 12)
    x[:, :, 6, 6] = 1.0  # one bright pixel in the middle of a dark patch
    rng = torch.Generator().manual_seed(0)
    assert _shifted(x, TrainConfig(augment_shift=0), rng) is x
    moved = _shifted(x, TrainConfig(augment_shift=2), rng)
    assert moved.shape == x.shape
    where = [tuple(torch.nonzero(p[0])[0].tolist()) for p in moved]
    assert all(abs(r - 6) <= 2 and abs(c - 6) <= 2 for r, c in where)
    assert len(set(where)) > 10  # each patch its own shift, not one for the batch
    assert torch.all(moved.sum(dim=(1, 2, 3)) == 1)  # moved, never cut or duplicated


def _windowed_scans(root, window_ok=True):
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_training_records_the_tables_normalisation(tmp_path):
    from anogan_batch.job.ingest import ingest
    from anogan_batch.job.ingest_config import IngestConfig

    src = _windowed_scans(tmp_path / "scans")
    ingest(str(src), str(tmp_path / "p"), IngestConfig(patch_size=16, window=(128.0, 200.0)))
    fast = {**FAST, "g_width": 4, "d_width": 4}
    train_gan(str(tmp_path / "p"), str(tmp_path / "m"), TrainConfig(**fast), progress=False)
    norm = json.loads((tmp_path / "m" / "model.json").read_text())["normalisation"]
    assert (norm["pixel_dtype"], norm["window"]) == ("uint16", [128.0, 200.0])


def test_a_table_mixing_bit_depths_is_refused(tmp_path):
    from PIL import Image

    from anogan_batch.job.ingest import ingest
    from anogan_batch.job.ingest_config import IngestConfig

    src = _windowed_scans(tmp_path / "scans")
    Image.fromarray(np.full((16, 16), 4000, np.uint16)).save(src / "deep.png")
    ingest(str(src), str(tmp_path / "p"), IngestConfig(patch_size=16))
    with pytest.raises(InputError, match="mixes pixel normalisations"):
        train_gan(str(tmp_path / "p"), str(tmp_path / "m"), TrainConfig(**FAST), progress=False)


def test_encoder_trains_after_the_gan_and_leaves_it_alone(sample):
    from anogan_batch.core.training import fit_gan

    pixels = sample["train_images"][:256, :, :, None]
    cfg = {**FAST, "epochs": 2}
    plain = fit_gan(pixels, "uint8", TrainConfig(**cfg | {"encoder_epochs": 0}), progress=False)
    with_e = fit_gan(pixels, "uint8", TrainConfig(**cfg | {"encoder_epochs": 6}), progress=False)
    assert plain.encoder is None and not plain.config.encoder
    assert with_e.config.encoder and not with_e.encoder.training
    assert not any(p.requires_grad for p in with_e.encoder.parameters())
    # G and D are exactly those of the run without an encoder: E's training never touches them
    for a, b in ((plain.generator, with_e.generator), (plain.discriminator, with_e.discriminator)):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(v, w), k


def test_encoder_inverts_the_generator(loaded_tiny, sample):
    """The tiny model's encoder (3 epochs): G(E(x)) is far closer to x than G at random z."""
    from anogan_batch.core.model import model_input

    pixels = torch.from_numpy(sample["train_images"][:256, :, :, None].copy())
    x = model_input(pixels, loaded_tiny.config)
    g, e = loaded_tiny.generator, loaded_tiny.encoder
    with torch.no_grad():
        via_e = (g(e(x)) - x).square().mean()
        at_random = (g(torch.rand(256, g.latent_dim) * 2 - 1) - x).square().mean()
    assert via_e < 0.7 * at_random, (via_e, at_random)


def test_contrast_range_is_fitted_on_the_training_patches(loaded_tiny, sample):
    """train's default: contrast normalisation whose fitted range maps the training patches'
    extremes to G's [-1, 1], so the normal data fills the tanh range and nothing of it clips."""
    from anogan_batch.core.model import model_input

    cfg = replace(loaded_tiny.config, input_blur=0.0)  # the range is fitted before the blur
    assert cfg.input_norm == "contrast" and cfg.norm_low < 0 < cfg.norm_high
    x = model_input(torch.from_numpy(sample["train_images"][:2048, :, :, None].copy()), cfg)
    assert x.min().item() == pytest.approx(-1.0, abs=1e-5)
    assert x.max().item() == pytest.approx(1.0, abs=1e-5)


def test_flat_training_patches_cannot_be_contrast_normalised():
    flat = np.full((64, 16, 16, 1), 7, np.uint8)
    with pytest.raises(InputError, match="all flat.*--input-norm none"):
        fit_gan(flat, "uint8", TrainConfig(**FAST), progress=False)


def test_input_norm_none_reads_pixels_as_stored(sample):
    from anogan_batch.core.model import model_input, to_model_space

    fit = fit_gan(
        sample["train_images"][:128, :, :, None],
        "uint8",
        TrainConfig(
            **{**FAST, "g_width": 4, "d_width": 4, "input_norm": "none", "input_blur": 0.0}
        ),
        progress=False,
    )
    assert fit.config.input_norm == "none"
    pixels = torch.from_numpy(sample["test_images"][:4, :, :, None].copy())
    assert torch.equal(model_input(pixels, fit.config), to_model_space(pixels, "uint8"))


def test_encoder_is_saved_and_recorded(tmp_path, mixed_table):
    from anogan_batch.core.modeldir import load_model

    train_gan(mixed_table, str(tmp_path / "m"), TrainConfig(**FAST), progress=False)
    doc = json.loads((tmp_path / "m" / "model.json").read_text())
    assert doc["architecture"]["encoder"] is True
    assert doc["training"]["encoder"]["epochs"] == 1
    assert load_model(str(tmp_path / "m")).encoder is not None
    train_gan(
        mixed_table,
        str(tmp_path / "n"),
        TrainConfig(**FAST | {"encoder_epochs": 0}),
        progress=False,
    )
    assert load_model(str(tmp_path / "n")).encoder is None
