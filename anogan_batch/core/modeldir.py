"""MODEL_DIR: the trained model on disk (local or S3), saved and loaded without pickle.

    MODEL_DIR/
      weights.safetensors   G ("generator.*"), D ("discriminator.*") and, when trained, the
                            encoder E ("encoder.*") tensors
      model.json            architecture, patch spec, normalisation, training parameters,
                            training-data fingerprint, model_id = sha256(weights.safetensors)
      samples.png           a grid of G(z) for z from the prior
      loss_curve.svg        training losses per step (and losses.csv)

`load_model` rebuilds G and D from model.json alone, checks the weights against model_id, and
never unpickles: safetensors holds raw tensors, model.json is JSON.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from anogan_batch.errors import AnoganError, ModelError
from anogan_batch.fields import from_dict
from anogan_batch.io import storage
from anogan_batch.io.patches import PatchSpec

if TYPE_CHECKING:
    import torch

    from anogan_batch.core.model import Discriminator, Encoder, Generator
    from anogan_batch.core.model_config import ModelConfig
    from anogan_batch.core.search_config import SearchConfig

FORMAT = "anogan-batch/model/1"
WEIGHTS = "weights.safetensors"
MODEL_JSON = "model.json"
# Architecture fields added after the first models were written, with the value those models
# were trained with (the defaults of ModelConfig are today's recipe, not theirs).
LEGACY_ARCHITECTURE = {"input_norm": "none", "feature_layer": -1, "input_blur": 0.0}


@dataclass
class LoadedModel:
    """A frozen-ready G/D pair with its metadata."""

    config: ModelConfig
    generator: Generator
    discriminator: Discriminator
    model_id: str
    meta: dict[str, Any] = field(default_factory=dict)
    encoder: Encoder | None = None  # present when config.encoder

    @property
    def patch_spec(self) -> PatchSpec:
        return PatchSpec(self.config.image_size, self.config.channels, self.config.pixel_dtype)

    def for_scoring(self, device: torch.device | str) -> LoadedModel:
        """Make this model a scoring-only model on `device`, in place: G's BatchNorm folded
        into its convolutions (after which it can no longer be saved) and every network in
        channels_last. Scores are those of the unfolded model to float rounding."""
        import torch

        from anogan_batch.core.model import fold_batchnorm

        fold_batchnorm(self.generator)
        # channels_last: the convolutions' fast layout on CPU (oneDNN) and GPU (tensor cores);
        # its gain and the scores' agreement are in docs/performance.md
        self.generator.to(device, memory_format=torch.channels_last)
        self.discriminator.to(device, memory_format=torch.channels_last)
        if self.encoder is not None:
            self.encoder.to(device, memory_format=torch.channels_last)
        return self


def weights_bytes(
    generator: Generator,
    discriminator: Discriminator,
    encoder: Encoder | None = None,
    dtype: torch.dtype | None = None,
) -> bytes:
    """Serialise G, D (and E) to safetensors bytes (deterministic for the same tensors).

    `dtype` (e.g. torch.float16) stores floating tensors at that precision; loading casts them
    back to the modules' float32, so only the stored size and a rounding of the weights change.
    """
    from safetensors.torch import save

    if generator.batchnorm_folded:
        raise ValueError(
            "a generator with folded BatchNorm (LoadedModel.for_scoring) cannot be saved"
        )
    tensors = {f"generator.{k}": v for k, v in generator.state_dict().items()}
    tensors |= {f"discriminator.{k}": v for k, v in discriminator.state_dict().items()}
    if encoder is not None:
        tensors |= {f"encoder.{k}": v for k, v in encoder.state_dict().items()}

    def stored(v: torch.Tensor) -> torch.Tensor:
        v = v.detach().cpu()
        return (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()

    return save({k: stored(v) for k, v in sorted(tensors.items())})


def save_model(
    model_dir: str,
    config: ModelConfig,
    generator: Generator,
    discriminator: Discriminator,
    meta: dict[str, Any],
    encoder: Encoder | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Write weights and model.json; return the model_id. Extra artefacts are the caller's."""
    if (encoder is not None) != config.encoder:
        raise ValueError(
            f"config.encoder is {config.encoder}, encoder given: {encoder is not None}"
        )
    from anogan_batch.core.model import describe_input

    blob = weights_bytes(generator, discriminator, encoder, dtype)
    model_id = hashlib.sha256(blob).hexdigest()
    storage.makedirs(model_dir)
    storage.write_bytes(storage.join(model_dir, WEIGHTS), blob)
    doc = {
        "format": FORMAT,
        "model_id": model_id,
        "architecture": config.to_dict(),
        "patch": {"size": config.image_size, "channels": config.channels},
        **meta,
        # derived from the config, so written here only; callers may add fields (the window)
        "normalisation": {
            **meta.get("normalisation", {}),
            "pixel_dtype": config.pixel_dtype,
            "model_space": describe_input(config),
        },
    }
    storage.write_json(storage.join(model_dir, MODEL_JSON), doc)
    return model_id


def compact_model(model_dir: str) -> str:
    """Rewrite MODEL_DIR's weights as float16 (half the bytes; the bundled demo model uses it).
    Returns the new model_id; model.json keeps everything else."""
    import torch

    model = load_model(model_dir)
    written_by_save = ("format", "model_id", "architecture", "patch")
    meta = {k: v for k, v in model.meta.items() if k not in written_by_save}
    meta["weights_dtype"] = "float16"
    return save_model(
        model_dir,
        model.config,
        model.generator,
        model.discriminator,
        meta,
        encoder=model.encoder,
        dtype=torch.float16,
    )


def read_model_json(model_dir: str) -> dict[str, Any]:
    path = storage.join(model_dir, MODEL_JSON)
    if not storage.exists(model_dir):
        raise ModelError(f"model directory '{model_dir}' does not exist")
    if not storage.exists(path):
        raise ModelError(f"'{path}' is missing: '{model_dir}' is not a model directory")
    try:
        doc = storage.read_json(path)
    except AnoganError as e:
        raise ModelError(f"model file {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ModelError(f"'{path}' has format {found!r}; this version reads {FORMAT!r}")
    return doc


@dataclass(frozen=True)
class ModelCard:
    """model.json, read and checked once: what a job needs to know about a model before (and
    without) loading its weights. Small and picklable: the driver hands it to the actors."""

    model_dir: str
    doc: dict[str, Any]
    config: ModelConfig

    @property
    def model_id(self) -> str:
        return self.doc["model_id"]

    @property
    def patch_spec(self) -> PatchSpec:
        return PatchSpec(self.config.image_size, self.config.channels, self.config.pixel_dtype)

    @property
    def normalisation(self) -> dict[str, Any]:
        return self.doc.get("normalisation", {})

    @property
    def weights_path(self) -> str:
        return storage.join(self.model_dir, WEIGHTS)


def read_model_card(model_dir: str) -> ModelCard:
    """model.json of MODEL_DIR as a ModelCard; ModelError naming the file and field at fault."""
    from anogan_batch.core.model_config import ModelConfig

    doc = read_model_json(model_dir)
    json_path = storage.join(model_dir, MODEL_JSON)
    architecture = doc.get("architecture")
    if isinstance(architecture, dict):  # a field a model predates: the value it was built with
        architecture = {**LEGACY_ARCHITECTURE, **architecture}
    try:
        config = from_dict(ModelConfig, architecture, where="architecture")
    except AnoganError as e:
        raise ModelError(f"'{json_path}': {e}") from e
    if not isinstance(doc.get("model_id"), str):
        raise ModelError(f"'{json_path}' has no model_id")
    return ModelCard(model_dir, doc, config)


def check_weights(card: ModelCard) -> None:
    """The weights file is the one model.json names (sha256 = model_id) and fits its
    architecture (tensor names and shapes, from the safetensors header), checked without
    building the networks' tensors: the driver's fail-fast check before the actors load it."""
    import json
    import struct

    import torch

    from anogan_batch.core.model import build_encoder, build_models

    blob = _weights_blob(card)
    try:
        (size,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + size])
        shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (struct.error, ValueError, TypeError, KeyError) as e:
        raise ModelError(f"'{card.weights_path}' is not a valid safetensors file: {e}") from e
    with torch.device("meta"):  # shapes only, no memory
        generator, discriminator = build_models(card.config)
        encoder = build_encoder(card.config) if card.config.encoder else None
    for prefix, module in _parts(generator, discriminator, encoder).items():
        if module is not None:
            _check_state(module, _with_prefix(shapes, prefix), card.weights_path, prefix)
    _check_no_stray(shapes, _parts(generator, discriminator, encoder), card)


def load_model(
    model_dir: str, *, expect_model_id: str | None = None, card: ModelCard | None = None
) -> LoadedModel:
    """Rebuild G and D from MODEL_DIR (or from `card`, model.json already read), frozen (eval
    mode, no gradients) for scoring.

    Raises ModelError naming the file and field at fault.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    from anogan_batch.core.model import build_encoder, build_models, freeze

    card = card or read_model_card(model_dir)
    blob = _weights_blob(card)
    if expect_model_id is not None and card.model_id != expect_model_id:
        raise ModelError(
            f"'{card.model_dir}' holds model {card.model_id[:12]}..., "
            f"expected {expect_model_id[:12]}..."
        )
    try:
        tensors = load(blob)
    except (SafetensorError, ValueError) as e:
        raise ModelError(f"'{card.weights_path}' is not a valid safetensors file: {e}") from e

    config = card.config
    generator, discriminator = build_models(config)
    encoder = build_encoder(config) if config.encoder else None
    parts = _parts(generator, discriminator, encoder)
    _check_no_stray(tensors, parts, card)
    for prefix, module in parts.items():
        if module is not None:
            state = _with_prefix(tensors, prefix)
            _check_state(module, {k: tuple(v.shape) for k, v in state.items()},
                         card.weights_path, prefix)  # fmt: skip
            module.load_state_dict(state, strict=True)
    freeze(*(m for m in parts.values() if m is not None))
    return LoadedModel(config, generator, discriminator, card.model_id, card.doc, encoder)


def _weights_blob(card: ModelCard) -> bytes:
    """The weights file's bytes, checked against model_id."""
    if not storage.exists(card.weights_path):
        raise ModelError(f"'{card.weights_path}' is missing")
    blob = storage.read_bytes(card.weights_path)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != card.model_id:
        raise ModelError(
            f"'{card.weights_path}' has sha256 {digest[:12]}..., but model.json says model_id "
            f"{card.model_id[:12]}...: the weights are corrupt or were replaced"
        )
    return blob


def _parts(generator, discriminator, encoder) -> dict[str, Any]:
    return {"generator.": generator, "discriminator.": discriminator, "encoder.": encoder}


def _with_prefix(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_no_stray(tensors: dict, parts: dict, card: ModelCard) -> None:
    stray = [k for k in tensors if not any(k.startswith(p) for p, m in parts.items() if m)]
    if stray:
        raise ModelError(
            f"'{card.weights_path}' holds tensor {stray[0]}, which the architecture in "
            f"model.json does not have (encoder: {card.config.encoder})"
        )


def _check_state(module: torch.nn.Module, shapes: dict, path: str, prefix: str) -> None:
    """The weights' tensor names and shapes are exactly the module's."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        what = f"missing {prefix}{missing[0]}" if missing else f"unexpected {prefix}{unexpected[0]}"
        raise ModelError(
            f"'{path}' does not fit the architecture in model.json ({what}): "
            "the weights belong to another architecture"
        )
    for k, shape in shapes.items():
        if tuple(shape) != tuple(expected[k].shape):
            raise ModelError(
                f"'{path}': tensor {prefix}{k} has shape {tuple(shape)}, the architecture in "
                f"model.json needs {tuple(expected[k].shape)}"
            )


CALIBRATION_DIR = "calibration"  # <search_key>.parquet: the calibration scores of one search


def write_calibration(
    model_dir: str,
    search: SearchConfig,
    scores: np.ndarray,
    data: dict[str, Any],
    heat: dict[str, Any] | None = None,
) -> str:
    """Store the anomaly scores of held-out normal patches for `search` (resolved) in MODEL_DIR
    and record them in model.json (which data, when; `heat`: the overlay scale their residuals
    give, core/calibration.normal_heat). The weights and model_id are untouched.
    -> the calibration_id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from anogan_batch.core.calibration import search_key

    key = search_key(search)
    values = np.sort(np.asarray(scores, dtype=np.float64))
    calibration_id = hashlib.sha256(key.encode() + values.tobytes()).hexdigest()[:16]
    path = storage.join(model_dir, CALIBRATION_DIR, f"{key}.parquet")
    fs, inner = storage.filesystem_for(path)
    storage.makedirs(storage.join(model_dir, CALIBRATION_DIR))
    with fs.open_output_stream(inner) as f:
        pq.write_table(pa.table({"anomaly_score": values}), f)
    doc = read_model_json(model_dir)
    doc.setdefault("calibration", {})[key] = {
        "calibration_id": calibration_id,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "n": len(values),
        "search": asdict(search),
        "file": f"{CALIBRATION_DIR}/{key}.parquet",
        "data": data,
        **({"heat": heat} if heat else {}),
    }
    storage.write_json(storage.join(model_dir, MODEL_JSON), doc)
    return calibration_id


def read_calibration(card: ModelCard, search: SearchConfig) -> tuple[np.ndarray | None, dict]:
    """(sorted calibration scores, their record) for `search`, or (None, {"missing": why})."""
    import pyarrow.parquet as pq

    from anogan_batch.core.calibration import search_key
    from anogan_batch.core.search_config import describe

    key = search_key(search)
    records = card.doc.get("calibration") or {}
    if key not in records:
        have = ", ".join(describe(r["search"]) for r in records.values()) or "none"
        why = (
            f"the model has no calibration for this search (key {key}; calibrated: {have}); "
            "run `anogan-batch calibrate` with the same search flags"
        )
        return None, {"missing": why, "search_key": key}
    record = records[key]
    path = storage.join(card.model_dir, record["file"])
    fs, inner = storage.filesystem_for(path)
    with fs.open_input_file(inner) as f:
        scores = pq.read_table(f).column("anomaly_score").to_numpy()
    return np.sort(scores), {"search_key": key, **record}
