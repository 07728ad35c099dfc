"""MODEL_DIR: save -> load -> identical scores, no unpickling, clear errors for bad dirs."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from anogan_batch.core.model import model_input
from anogan_batch.core.modeldir import load_model, save_model
from anogan_batch.core.search import latent_search
from anogan_batch.core.search_config import SearchConfig
from anogan_batch.errors import ModelError


def test_model_dir_contents(tiny_model):
    from pathlib import Path

    files = {p.name for p in Path(tiny_model).iterdir()}
    assert {"weights.safetensors", "model.json", "samples.png", "loss_curve.svg"} <= files
    doc = json.loads((Path(tiny_model) / "model.json").read_text())
    assert doc["architecture"]["image_size"] == 28
    assert doc["normalisation"]["pixel_dtype"] == "uint8"
    assert doc["training"]["epochs"] == 4 and doc["training"]["lr"] == 5e-4
    assert len(doc["data"]["fingerprint_sha256"]) == 64
    import hashlib

    blob = (Path(tiny_model) / "weights.safetensors").read_bytes()
    assert doc["model_id"] == hashlib.sha256(blob).hexdigest()


def test_save_load_gives_identical_scores(tmp_path, loaded_tiny, sample):
    m = loaded_tiny
    x = model_input(torch.from_numpy(sample["test_images"][:8, :, :, None].copy()), m.config)
    ids = [str(i) for i in range(8)]
    cfg = SearchConfig(iterations=15)
    before = latent_search(m.generator, m.discriminator, x, ids, cfg, m.encoder)
    model_id = save_model(
        str(tmp_path / "m"), m.config, m.generator, m.discriminator, {}, encoder=m.encoder
    )
    assert model_id == loaded_tiny.model_id  # same tensors, same bytes, same id
    again = load_model(str(tmp_path / "m"))
    assert not again.generator.training and not any(
        p.requires_grad for p in again.discriminator.parameters()
    )
    assert before.steps[0] == 15 and not again.encoder.training
    after = latent_search(again.generator, again.discriminator, x, ids, cfg, again.encoder)
    np.testing.assert_array_equal(before.anomaly_score, after.anomaly_score)
    np.testing.assert_array_equal(before.residual_map, after.residual_map)


def test_loading_never_unpickles(tiny_model, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted while loading a model")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model = load_model(tiny_model)
    assert model.generator is not None


@pytest.fixture
def model_copy(tmp_path, tiny_model):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model, dst)
    return dst


def test_missing_directory():
    with pytest.raises(ModelError, match="does not exist"):
        load_model("/nonexistent/model")


def test_directory_without_model_json(tmp_path):
    with pytest.raises(ModelError, match="model.json' is missing"):
        load_model(str(tmp_path))


def test_corrupt_weights(model_copy):
    path = model_copy / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelError, match="corrupt or were replaced"):
        load_model(str(model_copy))


def test_pickled_weights_are_not_loaded(model_copy, loaded_tiny):
    (model_copy / "weights.safetensors").unlink()
    torch.save(loaded_tiny.generator.state_dict(), model_copy / "weights.pt")
    with pytest.raises(ModelError, match="weights.safetensors' is missing"):
        load_model(str(model_copy))


def test_model_json_of_another_architecture(model_copy):
    doc = json.loads((model_copy / "model.json").read_text())
    doc["architecture"]["g_width"] = 32
    (model_copy / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="another architecture|needs"):
        load_model(str(model_copy))


def test_model_json_with_unknown_field(model_copy):
    doc = json.loads((model_copy / "model.json").read_text())
    doc["architecture"]["depth"] = 12
    (model_copy / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="architecture.depth"):
        load_model(str(model_copy))


def test_input_map_and_feature_layer_round_trip_and_older_models_load_as_before(
    model_copy, loaded_tiny
):
    """The fitted contrast range and the feature layer come back from model.json; a model.json
    written before they existed loads as `none` and -1 (the only input map and layer then)."""
    back = load_model(str(model_copy)).config
    assert back.input_norm == "contrast" == loaded_tiny.config.input_norm
    assert (back.norm_low, back.norm_high) == (
        loaded_tiny.config.norm_low,
        loaded_tiny.config.norm_high,
    )
    assert back.feature_layer == 0 == loaded_tiny.config.feature_layer  # train's default
    assert back.input_blur == loaded_tiny.config.input_blur > 0  # train's default
    doc = json.loads((model_copy / "model.json").read_text())
    for key in ("input_norm", "norm_low", "norm_high", "feature_layer", "input_blur"):
        del doc["architecture"][key]
    (model_copy / "model.json").write_text(json.dumps(doc))
    old = load_model(str(model_copy)).config
    assert (old.input_norm, old.feature_layer, old.input_blur) == ("none", -1, 0.0)


def test_model_json_not_json(model_copy):
    (model_copy / "model.json").write_text("{ nope")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(str(model_copy))


def test_encoder_weights_without_encoder_in_model_json(model_copy):
    import hashlib

    doc = json.loads((model_copy / "model.json").read_text())
    assert doc["architecture"]["encoder"] is True  # the tiny model has one
    doc["architecture"]["encoder"] = False
    (model_copy / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="encoder.*does not have"):
        load_model(str(model_copy))
    blob = (model_copy / "weights.safetensors").read_bytes()
    assert doc["model_id"] == hashlib.sha256(blob).hexdigest()  # failed on content, not the id


def test_float16_weights_load_as_float32_and_score_alike(tmp_path, loaded_tiny, sample):
    from anogan_batch.core.modeldir import compact_model

    m = loaded_tiny
    d = str(tmp_path / "m")
    save_model(d, m.config, m.generator, m.discriminator, {"note": 1}, encoder=m.encoder)
    full = (tmp_path / "m" / "weights.safetensors").stat().st_size
    new_id = compact_model(d)
    assert (tmp_path / "m" / "weights.safetensors").stat().st_size < 0.55 * full
    half = load_model(d)
    assert half.model_id == new_id != m.model_id and half.meta["note"] == 1
    assert half.generator.net[0].weight.dtype == torch.float32
    x = model_input(torch.from_numpy(sample["test_images"][:16, :, :, None].copy()), m.config)
    ids = [str(i) for i in range(16)]
    cfg = SearchConfig(iterations=10)
    a = latent_search(m.generator, m.discriminator, x, ids, cfg, m.encoder)
    b = latent_search(half.generator, half.discriminator, x, ids, cfg, half.encoder)
    np.testing.assert_allclose(b.anomaly_score, a.anomaly_score, rtol=0.02)


def test_a_model_readied_for_scoring_scores_alike_and_cannot_be_saved(
    tmp_path, tiny_model, loaded_tiny, sample
):
    ready = load_model(tiny_model).for_scoring("cpu")  # BatchNorm folded into G, channels_last
    m = loaded_tiny
    x = model_input(torch.from_numpy(sample["test_images"][:16, :, :, None].copy()), m.config)
    ids = [str(i) for i in range(16)]
    cfg = SearchConfig(iterations=10)
    a = latent_search(m.generator, m.discriminator, x, ids, cfg, m.encoder)
    b = latent_search(ready.generator, ready.discriminator, x, ids, cfg, ready.encoder)
    np.testing.assert_allclose(b.anomaly_score, a.anomaly_score, rtol=1e-5)
    np.testing.assert_allclose(b.residual_map, a.residual_map, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="folded"):
        save_model(
            str(tmp_path / "m"),
            ready.config,
            ready.generator,
            ready.discriminator,
            {},
            encoder=ready.encoder,
        )
