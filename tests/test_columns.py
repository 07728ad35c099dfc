"""One spelling per column and search key: a table's column names are written as strings only
in io/columns.py, the search's fields only in core/search_config.py; every other module uses
their constants (io/columns.py) or derives from SCORE_FIELDS, so renaming one is one edit."""

from __future__ import annotations

import ast
from pathlib import Path

from anogan_batch.core.search_config import PUBLIC_NAMES, SCORE_FIELDS
from anogan_batch.io import columns

PACKAGE = Path(__file__).resolve().parents[1] / "anogan_batch"
COLUMN_NAMES = {v for k, v in vars(columns).items() if k.isupper() and isinstance(v, str)}
SEARCH_KEYS = set(SCORE_FIELDS) | set(PUBLIC_NAMES.values())
# The same word with another meaning, in the module that owns that meaning.
OTHER_MEANINGS = {
    # model.json and the calibration files: the model directory's own format, versioned apart
    # from the job's tables
    ("core/modeldir.py", "model_id"),
    ("core/modeldir.py", "channels"),
    ("core/modeldir.py", "heat"),
    ("core/modeldir.py", "anomaly_score"),
    ("core/training.py", "n_patches"),  # model.json's count of training patches
    ("core/training.py", "source"),  # model.json: the table trained / calibrated on
    ("core/calibrating.py", "source"),
    ("core/training.py", "normalisation"),  # model.json: the pixel normalisation learnt
    ("core/modeldir.py", "normalisation"),
    ("job/runner.py", "heat"),  # the calibration record's heat scale (core/modeldir.py)
    ("core/calibration.py", "cell"),  # the heat scale's record
    ("io/readers.py", "image"),  # the size check's name for a decoded image
    ("io/readers.py", "dtype"),  # a reader's normalisation record
    ("evaluation/slide_bench.py", "level"),  # tifffile's JPEG quality argument
}
# Names a config field in a validation error (the field, not a column or a key).
FIELD_ERRORS = {"check_int", "check_float", "check_choice", "ConfigError"}


def spelled(words: set[str], *, skip: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """word -> the modules (relative to the package) that hold it as a string literal, not
    counting f-string text, docstrings' words or a validation error's field name."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(skip):
            continue
        tree = ast.parse(path.read_text())
        ignored = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                ignored |= {id(c) for c in ast.walk(node)}
            if isinstance(node, ast.Call) and node.args:
                f = node.func
                name = getattr(f, "id", None) or getattr(f, "attr", None)
                if name in FIELD_ERRORS:
                    ignored.add(id(node.args[0]))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and node.value in words
                and id(node) not in ignored
                and (rel, node.value) not in OTHER_MEANINGS
            ):
                found.setdefault(node.value, set()).add(rel)
    return found


def test_every_column_is_spelled_in_io_columns_only():
    elsewhere = {
        word: sorted(modules - {"io/columns.py"})
        for word, modules in spelled(COLUMN_NAMES).items()
        if modules - {"io/columns.py"}
    }
    assert not elsewhere, f"use io/columns.py's constants: {elsewhere}"


def test_every_search_key_is_spelled_in_search_config_only():
    # the benches name their figures after the search's fields (tests/test_bench.py)
    found = spelled(SEARCH_KEYS, skip=("evaluation/",))
    elsewhere = {
        word: sorted(modules - {"core/search_config.py"})
        for word, modules in found.items()
        if modules - {"core/search_config.py"}
    }
    assert not elsewhere, f"derive from core/search_config.py: {elsewhere}"


def test_the_columns_module_spells_each_column_once():
    tree = ast.parse((PACKAGE / "io" / "columns.py").read_text())
    literals = [
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in COLUMN_NAMES
    ]
    twice = sorted({w for w in literals if literals.count(w) > 1})
    assert not twice, f"spelled twice in io/columns.py: {twice}"


def test_the_schemas_are_built_from_the_constants():
    """The tables' schemas hold exactly the names the module declares, each once."""
    used = set()
    for schema in (
        columns.patch_schema(),
        columns.ingest_schema(),
        columns.scorer_schema(),
        columns.scan_schema(heatmaps=True),
    ):
        assert len(set(schema.names)) == len(schema.names)
        used |= set(schema.names)
    assert used <= COLUMN_NAMES
    assert set(columns.SUMMARY_COLUMNS) == set(columns.scan_schema(heatmaps=False).names)
    maps = set(columns.scan_schema(heatmaps=True).names) - set(columns.SUMMARY_COLUMNS)
    assert maps == set(columns.MAP_COLUMNS) - set(columns.SUMMARY_COLUMNS)
    assert set(columns.QUARANTINE_COLUMNS) <= set(columns.scorer_schema().names)
