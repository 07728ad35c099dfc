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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from anogan_batch.config import from_dict
from anogan_batch.errors import AnoganError, ModelError
from anogan_batch.io import storage
from anogan_batch.io.patches import PatchSpec

if TYPE_CHECKING:
    import torch

    from anogan_batch.core.model import Discriminator, Encoder, Generator, ModelConfig

FORMAT = "anogan-batch/model/1"
WEIGHTS = "weights.safetensors"
MODEL_JSON = "model.json"


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

    def to(self, device: torch.device | str) -> LoadedModel:
        """Ready for scoring on `device`: G's BatchNorm folded into its convolutions (the
        model can no longer be saved) and every network in channels_last."""
        import torch

        from anogan_batch.core.model import fold_batchnorm

        fold_batchnorm(self.generator)
        # channels_last: the convolutions' fast layout on CPU (oneDNN) and GPU (tensor cores);
        # +18% search throughput on the bench's CPU, scores equal to 3e-7
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
        raise ValueError("a generator with folded BatchNorm (LoadedModel.to) cannot be saved")
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


def load_model(model_dir: str, *, expect_model_id: str | None = None) -> LoadedModel:
    """Rebuild G and D from MODEL_DIR, frozen (eval mode, no gradients) for scoring.

    Raises ModelError naming the file and field at fault.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    from anogan_batch.core.model import ModelConfig, build_encoder, build_models, freeze

    doc = read_model_json(model_dir)
    json_path = storage.join(model_dir, MODEL_JSON)
    try:
        config = from_dict(ModelConfig, doc.get("architecture"), where="architecture")
    except AnoganError as e:
        raise ModelError(f"'{json_path}': {e}") from e

    weights_path = storage.join(model_dir, WEIGHTS)
    if not storage.exists(weights_path):
        raise ModelError(f"'{weights_path}' is missing")
    blob = storage.read_bytes(weights_path)
    model_id = hashlib.sha256(blob).hexdigest()
    if model_id != doc.get("model_id"):
        raise ModelError(
            f"'{weights_path}' has sha256 {model_id[:12]}..., but model.json says model_id "
            f"{str(doc.get('model_id'))[:12]}...: the weights are corrupt or were replaced"
        )
    if expect_model_id is not None and model_id != expect_model_id:
        raise ModelError(
            f"'{model_dir}' holds model {model_id[:12]}..., expected {expect_model_id[:12]}..."
        )
    try:
        tensors = load(blob)
    except (SafetensorError, ValueError) as e:
        raise ModelError(f"'{weights_path}' is not a valid safetensors file: {e}") from e

    generator, discriminator = build_models(config)
    encoder = build_encoder(config) if config.encoder else None
    parts = {"generator.": generator, "discriminator.": discriminator, "encoder.": encoder}
    stray = [k for k in tensors if not any(k.startswith(p) for p, m in parts.items() if m)]
    if stray:
        raise ModelError(
            f"'{weights_path}' holds tensor {stray[0]}, which the architecture in model.json "
            f"does not have (encoder: {config.encoder})"
        )
    for prefix, module in parts.items():
        if module is not None:
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            _load_state(module, state, weights_path, prefix)
    freeze(*(m for m in parts.values() if m is not None))
    return LoadedModel(config, generator, discriminator, model_id, doc, encoder)


def _load_state(module: torch.nn.Module, state: dict, path: str, prefix: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {prefix}{missing[0]}" if missing else f"unexpected {prefix}{unexpected[0]}"
        raise ModelError(
            f"'{path}' does not fit the architecture in model.json ({what}): "
            "the weights belong to another architecture"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ModelError(
                f"'{path}': tensor {prefix}{k} has shape {tuple(v.shape)}, the architecture in "
                f"model.json needs {tuple(expected[k].shape)}"
            )
    module.load_state_dict(state, strict=True)
