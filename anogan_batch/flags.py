"""Command-line options derived from the configs, so that a config field is declared once.

Each field declared with `fields.option` carries its `Flag` (help, option name, what a None
default means, how its text is read). `configured(cfg=ScoreJobConfig)` decorates a typer
command: the parameter `cfg` is replaced by one option (or argument) per field of the config, a
field that is itself a config adding its own fields, each with the field's default; the
command is called with the config built from them, which validates itself (a bad value is a
ConfigError naming the field, exit 2). tests/test_flags.py holds every config to one flag a
field with its default shown.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer

from anogan_batch.fields import Flag, flag_of


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A config field that is one option: its name is the command's parameter name."""

    name: str
    field: dataclasses.Field
    flag: Flag | None  # None: declared without `option` (tests/test_flags.py refuses it)
    annotation: Any

    @property
    def required(self) -> bool:
        return (
            self.field.default is dataclasses.MISSING
            and self.field.default_factory is dataclasses.MISSING
        )

    @property
    def default(self) -> Any:
        return inspect.Parameter.empty if self.required else self.field.default


def leaves(cls: type) -> Iterator[Leaf]:
    """The option fields of config `cls`, a nested config's in its place."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaves(hints[f.name])
        else:
            yield Leaf(f.name, f, flag_of(f), hints[f.name])


def build(cls: type, values: dict[str, Any]) -> Any:
    """Config `cls` from the command's option values (taken out of `values`)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], values)
            continue
        if f.name not in values:
            continue  # no flag: the field keeps its default
        value, flag = values.pop(f.name), flag_of(f)
        if flag is not None and flag.parse is not None and value is not None:
            value = flag.parse(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def parameter(leaf: Leaf) -> inspect.Parameter:
    """The typer parameter of one field: its option name, help, default shown."""
    flag = leaf.flag
    annotation = leaf.annotation
    if flag.parse is not None:  # the option takes text, the field reads it
        annotation = str if leaf.required else str | None
    help_text = flag.help + (f"  [default: {flag.default_text}]" if flag.default_text else "")
    if flag.argument:
        info = typer.Argument(metavar=leaf.name.upper(), help=help_text, show_default=False)
    else:
        name = flag.option_name(leaf.name)
        if annotation is bool and leaf.default is True:
            name = f"{name}/--no-{name[2:]}"
        info = typer.Option(name, help=help_text, show_default=flag.default_text is None)
    return inspect.Parameter(
        leaf.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=leaf.default,
        annotation=Annotated[annotation, info],
    )


def configured(**groups: type) -> Callable[[Callable], Callable]:
    """Replace each parameter named in `groups` by the options of its config class; the
    command receives the built config under that name."""

    def decorate(command: Callable) -> Callable:
        params = []
        for p in inspect.signature(command, eval_str=True).parameters.values():
            if p.name in groups:
                params += [parameter(leaf) for leaf in leaves(groups[p.name]) if leaf.flag]
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise TypeError(f"{command.__name__}: two options named {names}")

        def run(**values: Any) -> Any:
            for name, cls in groups.items():
                values[name] = build(cls, values)
            return command(**values)

        run.__name__, run.__qualname__ = command.__name__, command.__qualname__
        run.__doc__, run.__module__ = command.__doc__, command.__module__
        run.__signature__ = inspect.Signature(params)  # what typer reads
        run.configs = groups  # for tests/test_flags.py
        return run

    return decorate
