"""The latent search's config: its parameters, their defaults and flags, and which of them
change a patch's score (the search key of calibrations and job.json).

Light on purpose (no torch, numpy or pyarrow): the CLI reads these defaults for `--help`.
"""

from __future__ import annotations

from dataclasses import dataclass

from anogan_batch.fields import check_choice, check_float, check_int, option

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

    iterations: int | None = option(
        None,
        "Γ, latent search steps (the most a patch gets with early stopping)",
        default_text=f"{PAPER[0]} (the paper) from a random start; {POLISH[0]} from the "
        "encoder's start, which only polishes z = E(x)",
    )
    lam: float = option(0.1, "λ, weight of the feature (discrimination) loss", name="--lambda")
    lr: float | None = option(
        None,
        "Adam step size of the search on z in [-1, 1]^latent",
        default_text=f"{PAPER[1]} from a random start, {POLISH[1]} from the encoder's",
    )
    seed: int = option(0, "seed of the z initialisation")
    stop_tol: float | None = option(
        None,
        "early stopping: a patch stops when its loss fell by less than this fraction over "
        "--stop-window steps",
        default_text="off, the paper's fixed Γ",
    )
    stop_window: int = option(10, "steps over which --stop-tol is measured")
    min_iterations: int = option(20, "steps every patch takes before it may stop early")
    slots: int | None = option(
        None,
        "patches searched at once; stopped ones are replaced",
        default_text="the whole batch",
    )
    precision: str = option("fp32", "fp32, or bf16 (autocast during the search; scores in fp32)")
    start: str = option(
        "auto",
        "z_0 of the search: encoder (z_0 = E(x)), prior (a seeded draw per patch), or auto: "
        "the encoder when the model has one",
    )

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
# SCORE_FIELDS that change a score only when the stopping rule is on (stop_tol set)
STOPPING_KNOBS = ("stop_window", "min_iterations")


def public_name(field: str) -> str:
    """How job.json and the CLI spell a SearchConfig field."""
    return PUBLIC_NAMES.get(field, field)


def score_params(search: SearchConfig) -> dict:
    """A (resolved) search's SCORE_FIELDS under their public names, the stopping rule's knobs
    only when the rule is on (None otherwise)."""
    params = {public_name(f): getattr(search, f) for f in SCORE_FIELDS}
    if search.stop_tol is None:
        params |= dict.fromkeys(STOPPING_KNOBS)
    return params


def key_fields(search: SearchConfig) -> dict:
    """A (resolved) search's SCORE_FIELDS under the config's names, without the stopping
    rule's knobs when it is off: what core/calibration.search_key hashes."""
    stopping = search.stop_tol is not None
    return {f: getattr(search, f) for f in SCORE_FIELDS if stopping or f not in STOPPING_KNOBS}


def describe(params: dict) -> str:
    """A search's params (score_params) in a few words: its start and Γ."""
    return f"{params.get('start')}/Γ={params.get('iterations')}"
