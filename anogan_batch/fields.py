"""How a config field is declared and checked: the one place a field's flag, help and default
come from (`option`), and the validation helpers each config's `__post_init__` calls.

Each config (ModelConfig, SearchConfig, TrainConfig, IngestConfig, ScoreJobConfig,
WarehouseTarget) is a frozen dataclass; a field declared with `option` carries its `Flag`, from
which the CLI builds the field's option (anogan_batch/flags.py). A bad value fails where it
enters the system and the error names the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from anogan_batch.errors import ConfigError

T = TypeVar("T")

# How stored pixels become model input (model.model_input); here so that light modules
# (training's config, the CLI) can validate it without importing torch.
INPUT_NORMS = ("none", "contrast")
# Full scale of each stored pixel dtype: model space is p / PIXEL_MAX * 2 - 1 (docs/schema.md).
PIXEL_MAX = {"uint8": 255.0, "uint16": 65535.0, "float32": 1.0}


@dataclass(frozen=True)
class Flag:
    """A config field on the command line: `--<field-name>` (or `name`) with this help. The
    option's default is the field's; `default_text` says what a None default means (shown as
    "[default: ...]"), `parse` reads the option's text into the field's value (the option then
    takes a string), and an `argument` is positional (MODEL_DIR ...)."""

    help: str
    name: str | None = None
    default_text: str | None = None
    parse: Callable[[str], Any] | None = None
    argument: bool = False

    def option_name(self, field: str) -> str:
        return self.name or "--" + field.replace("_", "-")


def option(default: Any = dataclasses.MISSING, help: str = "", **flag: Any) -> Any:
    """A dataclass field (default `default`; none: required) with its command-line `Flag`."""
    return dataclasses.field(default=default, metadata={"flag": Flag(help, **flag)})


def flag_of(field: dataclasses.Field) -> Flag | None:
    return field.metadata.get("flag")


def as_flags(config: Any) -> list[str]:
    """The command-line words that give a command `config`'s values (a None keeps the
    command's default): what a program that runs a command for a config passes it."""
    words: list[str] = []
    for f in dataclasses.fields(config):
        flag, value = flag_of(f), getattr(config, f.name)
        if flag is None or flag.argument or value is None:
            continue
        if flag.parse is not None:
            raise ValueError(f"{f.name}: a field read by a parser has no flag form here")
        name = flag.option_name(f.name)
        if isinstance(value, bool):
            words += [name] if value else ([f"--no-{name[2:]}"] if f.default is True else [])
        else:
            words += [name, str(value)]
    return words


def check_int(field: str, value: Any, *, min_value: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, value, "must be an integer")
    if min_value is not None and value < min_value:
        raise ConfigError(field, value, f"must be >= {min_value}")


def check_float(
    field: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(field, value, "must be a finite number")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(field, value, f"must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise ConfigError(field, value, f"must be <= {high}")


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(field, value, f"must be one of {', '.join(map(str, choices))}")


def from_dict(cls: type[T], data: dict[str, Any], *, where: str) -> T:
    """Build dataclass `cls` from a dict, rejecting unknown keys (typos, other versions)."""
    if not isinstance(data, dict):
        raise ConfigError(where, data, "must be a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", data[unknown[0]], "unknown field")
    return cls(**data)
