"""The typed configs of the model, its training and the latent search: the one owner of
their defaults. The CLI, the Python API, the bench and the demo take every default from here.

Light on purpose (no torch, numpy or pyarrow): the CLI reads these defaults for `--help`.
Each config validates itself in `__post_init__`, so a bad value fails where it enters and the
error names the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from anogan_batch.config import INPUT_NORMS, PIXEL_MAX, check_choice, check_float, check_int
from anogan_batch.errors import ConfigError

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


STARTS = ("auto", "prior", "encoder")
# (Γ, Adam step size) by start when not given: the paper's search from the prior, a short
# polish from E(x) (measured in docs/quality.md)
PAPER = (500, 0.05)
POLISH = (10, 0.003)


@dataclass(frozen=True)
class SearchConfig:
    """Parameters of the latent search.

    From a random start the defaults follow the paper (Γ = 500, λ = 0.1). From the encoder's
    start, z_0 = E(x) is already the mapping, and the search only polishes it: Γ and the step
    size default to `POLISH` (docs/quality.md: more steps from E(x) let G fit anomalies too,
    which lowers the AUROC). `resolve_search` fills the Nones in.
    """

    iterations: int | None = None  # Γ (the most steps a patch gets when early stopping is on)
    lam: float = 0.1  # λ, weight of the discrimination (feature) loss
    lr: float | None = None  # Adam step size on z in [-1, 1]^latent
    seed: int = 0
    stop_tol: float | None = None  # relative loss decrease over stop_window that means "done"
    stop_window: int = 10
    min_iterations: int = 20
    slots: int | None = None  # patches searched at once; None: the whole batch
    precision: str = "fp32"  # "bf16": G and D run under bf16 autocast during the search
    # z_0: "prior" (a seeded draw per patch), "encoder" (z_0 = E(x)), or "auto": the encoder
    # when the model has one (see `resolve_search`)
    start: str = "auto"

    def __post_init__(self) -> None:
        if self.iterations is not None:
            check_int("iterations", self.iterations, min_value=0)
        check_float("lambda", self.lam, low=0.0, high=1.0)
        if self.lr is not None:
            check_float("lr", self.lr, low=0.0, low_open=True)
        check_int("seed", self.seed, min_value=0)
        if self.stop_tol is not None:
            check_float("stop_tol", self.stop_tol, low=0.0, low_open=True)
        check_int("stop_window", self.stop_window, min_value=1)
        check_int("min_iterations", self.min_iterations, min_value=0)
        if self.slots is not None:
            check_int("slots", self.slots, min_value=1)
        check_choice("precision", self.precision, ("fp32", "bf16"))
        check_choice("start", self.start, STARTS)


# The search's fields that change a patch's score (batch size, actors and devices do not):
# the one declaration behind the calibration's search key (core/calibration.search_key) and
# job.json's params (job/manifest.SEARCH_KEYS), which spell `lam` as the CLI does.
SCORE_FIELDS = (
    "iterations", "lam", "lr", "seed", "stop_tol", "stop_window", "min_iterations",
    "precision", "start",
)  # fmt: skip
PUBLIC_NAMES = {"lam": "lambda"}


def public_name(field: str) -> str:
    """How job.json and the CLI spell a SearchConfig field."""
    return PUBLIC_NAMES.get(field, field)


def score_params(search: SearchConfig) -> dict:
    """A (resolved) search's SCORE_FIELDS under their public names, the stopping rule's knobs
    only when the rule is on (None otherwise)."""
    params = {public_name(f): getattr(search, f) for f in SCORE_FIELDS}
    if search.stop_tol is None:
        params["stop_window"] = params["min_iterations"] = None
    return params


@dataclass(frozen=True)
class TrainConfig:
    """Training parameters; saved in model.json under "training"."""

    epochs: int = 30  # the quality recipe (docs/quality.md, fourth step: 20 → 30)
    batch_size: int = 64
    lr: float = 2e-4
    beta1: float = 0.5
    seed: int = 0
    normal_label: str | None = None
    latent_dim: int = ModelConfig.latent_dim
    g_width: int = ModelConfig.g_width
    d_width: int = ModelConfig.d_width
    d_norm: str = ModelConfig.d_norm
    max_patches: int | None = None  # cap on training patches (first by patch_id)
    g_ema: float = 0.999  # decay of an exponential moving average of G's weights; 0: off
    encoder_epochs: int = 30  # epochs of the izi_f encoder after the GAN; 0: no encoder
    kappa: float = 1.0  # κ, weight of the D-feature term in the encoder's loss
    # training batches (GAN and encoder) shifted by up to this many pixels each way, a patch
    # at a time: augmentation that keeps a normal patch normal; 0: off
    augment_shift: int = 0
    input_norm: str = ModelConfig.input_norm  # how pixels become model input (model_input)
    input_blur: float = ModelConfig.input_blur  # σ of the blur that ends model_input
    feature_layer: int = ModelConfig.feature_layer  # D block whose output is the search's f
    # share of the normal scans held out of training and scored for calibrated p-values
    # (core/calibration.py); whole scans, so a scan's patches stay on one side; 0: none
    calibration_fraction: float = 0.1
    device: str | None = None  # None: CUDA when present, else CPU

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
