"""The CLI's options are derived from the configs (anogan_batch/flags.py): every field of each
config a command takes has exactly one option, whose help shows the config's default, and the
option's value reaches the config."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import typer.main

from anogan_batch.cli import app
from anogan_batch.core.search_config import SearchConfig
from anogan_batch.flags import leaves

COMMANDS = {c.callback.__name__: c for c in app.registered_commands}
CONFIGURED = {
    name: c.callback.configs for name, c in COMMANDS.items() if hasattr(c.callback, "configs")
}


def click_command(name: str):
    return typer.main.get_command(app).commands[name]


def help_text(param, command) -> str:
    ctx = command.make_context(command.name, [], resilient_parsing=True)
    record = param.get_help_record(ctx)
    text = record[1] if record else ""
    return re.sub(r"\s+", " ", text)


def shown_default(value) -> str:
    return str(value)


def test_the_commands_that_take_configs_are_derived_from_them():
    assert set(CONFIGURED) == {"ingest", "train", "calibrate", "score", "publish"}


@pytest.mark.parametrize("command_name", sorted(CONFIGURED))
def test_every_config_field_has_exactly_one_option_showing_its_default(command_name):
    command = click_command(command_name)
    for cls in CONFIGURED[command_name].values():
        for leaf in leaves(cls):
            where = f"{command_name}: {cls.__name__}.{leaf.name}"
            assert leaf.flag is not None, f"{where} has no flag: declare it with fields.option"
            params = [p for p in command.params if p.name == leaf.name]
            assert len(params) == 1, f"{where}: {len(params)} options"
            (param,) = params
            spelled = [p for p in command.params if set(p.opts) & set(param.opts)]
            assert spelled == [param], f"{where}: {param.opts} spelled by several options"
            text = help_text(param, command)
            assert leaf.flag.help.split()[0] in text, where
            if leaf.required:
                assert "[required]" in text, where
            elif leaf.flag.default_text is not None:
                assert f"[default: {leaf.flag.default_text}]" in text, where
            elif leaf.annotation is bool:
                wanted = leaf.flag.option_name(leaf.name)[2:]
                assert leaf.default is False or f"[default: {wanted}]" in text, where
                assert not param.secondary_opts if leaf.default is False else param.secondary_opts
            else:
                assert leaf.default is not None, f"{where}: say what None means (default_text)"
                assert f"[default: {shown_default(leaf.default)}]" in text, where


def test_option_values_reach_the_config(monkeypatch):
    """Each option of score (a nested config's too) sets its field, and only its field."""
    from anogan_batch import cli
    from anogan_batch.job import runner

    seen = []
    monkeypatch.setattr(runner, "run_score_job", lambda cfg: seen.append(cfg) or _stop())
    argv = ["score", "m", "p", "o", "--lambda", "0.25", "--actors", "2-4", "--catalog-db",
            "c.db", "--batch-size", "auto", "--no-heatmaps", "--residual-maps", "none",
            "--stop-tol", "0.01", "--gpu-wait", "5"]  # fmt: skip
    assert cli.run(argv) == 3
    (cfg,) = seen
    from anogan_batch.job.score_config import ScoreJobConfig

    default = ScoreJobConfig("m", "p", "o")
    changed = {
        (path, name)
        for path, obj, ref in (
            ("", cfg, default),
            ("search", cfg.search, default.search),
            ("published", cfg.published, default.published),
        )
        for name in (f.name for f in dataclasses.fields(obj))
        if not dataclasses.is_dataclass(getattr(obj, name))
        and getattr(obj, name) != getattr(ref, name)
    }
    assert changed == {
        ("search", "lam"), ("search", "stop_tol"), ("", "actors"), ("published", "catalog_db"),
        ("", "heatmaps"), ("", "residual_maps"), ("", "gpu_wait_s"),
    }  # fmt: skip
    assert (cfg.search.lam, cfg.actors, cfg.batch_size) == (0.25, (2, 4), None)


def _stop():
    raise typer.Exit(3)


def test_a_bad_option_value_names_the_field(capsys):
    from anogan_batch import cli

    assert cli.run(["score", "m", "p", "o", "--actors", "two"]) == 2
    assert "actors" in capsys.readouterr().err
    assert cli.run(["ingest", "s", "o", "--patch-size", "8", "--window", "40"]) == 2
    assert "--window" in capsys.readouterr().err


@pytest.mark.parametrize(
    "search",
    [
        SearchConfig(),
        SearchConfig(iterations=7, lam=0.3, lr=0.01, seed=4, start="prior", precision="bf16"),
        SearchConfig(stop_tol=0.02, stop_window=5, min_iterations=3, slots=8, start="encoder"),
    ],
)
def test_a_config_as_flags_reads_back_as_the_same_config(search, monkeypatch):
    """fields.as_flags (what the bench passes its `score` jobs) round-trips through the CLI."""
    from anogan_batch import cli
    from anogan_batch.fields import as_flags
    from anogan_batch.job import runner

    seen = []
    monkeypatch.setattr(runner, "run_score_job", lambda cfg: seen.append(cfg) or _stop())
    assert cli.run(["score", "m", "p", "o", *as_flags(search)]) == 3
    assert seen[0].search == search


# The flags CONTRACT.md's command table promises (renamed or dropped: never).
CONTRACT_FLAGS = {
    "ingest": ("--patch-size", "--stride", "--label-from-parent"),
    "train": ("--epochs", "--seed", "--normal-label"),
    "score": (
        "--iterations",
        "--lambda",
        "--batch-size",
        "--actors",
        "--gpus-per-actor",
        "--seed",
        "--job-id",
    ),
    "eval": ("--normal-label",),
    "report": ("--html",),
    "demo": ("--out",),
    "bench": ("--json",),
}
CONTRACT = Path(__file__).resolve().parents[2] / "shared" / "CONTRACT.md"


def test_every_flag_the_contract_names_is_an_option_of_its_command():
    group = typer.main.get_command(app)
    for command, flags in CONTRACT_FLAGS.items():
        options = {o for p in group.commands[command].params for o in (*p.opts, *p.secondary_opts)}
        assert set(flags) <= options, f"{command}: {set(flags) - options}"


def test_the_contract_names_no_flag_this_test_does_not_hold():
    if not CONTRACT.exists():
        pytest.skip("CONTRACT.md is not beside this checkout")
    for line in CONTRACT.read_text().splitlines():
        m = re.match(r"\| `anogan-batch (\w+) ([^`]*)`", line)
        if m:
            named = set(re.findall(r"--[a-z][a-z0-9-]*", m.group(2)))
            assert named <= set(CONTRACT_FLAGS[m.group(1)]), (m.group(1), named)
