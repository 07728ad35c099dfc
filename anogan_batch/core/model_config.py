"""The model's config (its architecture: everything needed to rebuild G, D and E) and the
training's (how it is fitted; its flags are `train`'s): the one owner of their defaults.

Light on purpose (no torch, numpy or pyarrow): the CLI reads these defaults for `--help`.
Each config validates itself in `__post_init__`, so a bad value fails where it enters and the
error names the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from anogan_batch.errors import ConfigError
from anogan_batch.fields import (
    INPUT_NORMS,
    PIXEL_MAX,
    check_choice,
    check_float,
    check_int,
    option,
)

PRIORS = ("uniform",)
D_NORMS = ("batch", "spectral", "none")
MAX_BLUR = 4.0  # σ of `input_blur`, pixels: beyond it a patch is a smear


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a G/D pair; everything needed to rebuild it, nothing else."""

    image_size: int = 64
    channels: int = 1
    # 32, not DCGAN's 100: a smaller latent reconstructs normal patches as well and the
    # anomalies worse, once the input is blurred (docs/quality.md, third step)
    latent_dim: int = 32
    g_width: int = 64  # channels of G's last hidden block, doubled per stage towards z
    d_width: int = 64  # channels of D's first block, doubled per stage
    d_norm: str = "batch"  # normalisation in D's hidden blocks
    prior: str = "uniform"  # z ~ U(-1, 1)^latent_dim; the search keeps z in that box
    pixel_dtype: str = "uint8"  # dtype of the patch table's `image` column this model reads
    encoder: bool = False  # an encoder E (x -> z, f-AnoGAN's izi_f) is saved with G and D
    # How stored pixels become G's space (`model_input`): "none" maps [0, max] linearly to
    # [-1, 1]; "contrast" normalises each patch's contrast, then maps [norm_low, norm_high]
    # (fitted on the training patches) to [-1, 1]. Values outside are possible for anomalies.
    input_norm: str = "contrast"
    norm_low: float = -1.0
    norm_high: float = 1.0
    # The D block whose output is f, Python-style: 0 the first, -1 the last. 0 is the quality
    # recipe (docs/quality.md): the first block has no BatchNorm, whose running statistics blow
    # the later blocks' feature distances up, so that they outweigh the residual.
    feature_layer: int = 0
    # σ in pixels of a Gaussian blur that ends `model_input` (0: none). G, D and E are trained
    # on blurred patches and the residual is taken between blurred ones: a normal stroke drawn
    # a pixel off leaves a +/- pair that the blur cancels, a missing or extra stroke stays.
    input_blur: float = 1.0

    def __post_init__(self) -> None:
        check_int("image_size", self.image_size, min_value=8)
        check_choice("channels", self.channels, (1, 3))
        check_int("latent_dim", self.latent_dim, min_value=1)
        check_int("g_width", self.g_width, min_value=1)
        check_int("d_width", self.d_width, min_value=1)
        check_choice("d_norm", self.d_norm, D_NORMS)
        check_choice("prior", self.prior, PRIORS)
        check_choice("pixel_dtype", self.pixel_dtype, tuple(PIXEL_MAX))
        check_choice("input_norm", self.input_norm, INPUT_NORMS)
        check_float("input_blur", self.input_blur, low=0.0, high=MAX_BLUR)
        if not self.norm_high > self.norm_low:
            bound = f"must exceed norm_low ({self.norm_low})"
            raise ConfigError("norm_high", self.norm_high, bound)
        if self.stages < 2:
            raise ConfigError(
                "image_size", self.image_size, "must be divisible by 4 with a quotient >= 4"
            )
        check_int("feature_layer", self.feature_layer, min_value=-self.stages)
        if self.feature_layer >= self.stages:
            bound = f"D has {self.stages} blocks: use -{self.stages}..{self.stages - 1}"
            raise ConfigError("feature_layer", self.feature_layer, bound)

    @property
    def stages(self) -> int:
        """Number of stride-2 stages: the most halvings that leave an integer side >= 4."""
        n, size = 0, self.image_size
        while size % 2 == 0 and size // 2 >= 4:
            n, size = n + 1, size // 2
        return n

    @property
    def base(self) -> int:
        """Side of the smallest feature map (4 for 32 and 64, 7 for 28)."""
        return self.image_size >> self.stages

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """Training parameters; saved in model.json under "training"."""

    # the quality recipe (docs/quality.md, fourth step: 20 → 30)
    epochs: int = option(30, "passes over the normal patches")
    batch_size: int = option(64, "patches a training step")
    lr: float = option(2e-4, "Adam learning rate of G and D")
    beta1: float = option(0.5, "Adam β1 of G and D (DCGAN's 0.5)")
    seed: int = option(0, "random seed (deterministic on CPU)")
    normal_label: str | None = option(
        None, "train only on rows with this label", default_text="every row"
    )
    latent_dim: int = option(ModelConfig.latent_dim, "length of z")
    g_width: int = option(ModelConfig.g_width, "generator width")
    d_width: int = option(ModelConfig.d_width, "discriminator width")
    d_norm: str = option(ModelConfig.d_norm, "discriminator normalisation: batch, spectral, none")
    max_patches: int | None = option(
        None, "cap on training patches (the first by patch_id)", default_text="all"
    )
    g_ema: float = option(0.999, "decay of the moving average of G's weights that is saved; 0: off")
    encoder_epochs: int = option(
        30, "epochs of the encoder (f-AnoGAN izi_f) trained after the GAN; 0 skips it"
    )
    kappa: float = option(1.0, "κ, weight of the D-feature term in the encoder's loss")
    augment_shift: int = option(
        0,
        "shift training patches (GAN and encoder) by up to this many pixels each way, a patch "
        "at a time: augmentation that keeps a normal patch normal; 0: off",
    )
    input_norm: str = option(
        ModelConfig.input_norm,
        "contrast: normalise each patch's contrast before G/D (docs/quality.md); none: pixels "
        "as stored, for archives where absolute brightness is the signal",
    )
    input_blur: float = option(
        ModelConfig.input_blur,
        "σ in pixels of a Gaussian blur that ends the model input, for training and scoring: a "
        "residual between blurred patches ignores strokes drawn a pixel off "
        "(docs/quality.md); 0: none",
    )
    feature_layer: int = option(
        ModelConfig.feature_layer,
        "D block whose output is the feature layer f of the search: 0 the first, -1 the last "
        "(docs/quality.md)",
    )
    calibration_fraction: float = option(
        0.1,
        "share of the normal scans held out of training and scored for calibrated p-values "
        "(whole scans, so a scan's patches stay on one side; 0: none; docs/calibration.md)",
    )
    device: str | None = option(
        None, "cpu, cuda, cuda:1 ...", default_text="CUDA when present, else the CPU"
    )

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, min_value=1)
        check_int("batch_size", self.batch_size, min_value=2)
        check_float("lr", self.lr, low=0.0, low_open=True)
        check_float("beta1", self.beta1, low=0.0, high=1.0)
        check_int("seed", self.seed, min_value=0)
        check_int("augment_shift", self.augment_shift, min_value=0)
        check_float("g_ema", self.g_ema, low=0.0, high=0.9999)
        check_int("encoder_epochs", self.encoder_epochs, min_value=0)
        check_float("kappa", self.kappa, low=0.0)
        check_choice("input_norm", self.input_norm, INPUT_NORMS)
        check_float("input_blur", self.input_blur, low=0.0, high=MAX_BLUR)
        check_int("feature_layer", self.feature_layer)  # range: ModelConfig, once S is known
        check_float("calibration_fraction", self.calibration_fraction, low=0.0, high=0.5)
        if self.max_patches is not None:
            check_int("max_patches", self.max_patches, min_value=1)
