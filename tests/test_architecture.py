"""The package's layers (docs/architecture.md): imports only go down, and there is no cycle.

Every import counts, the ones inside functions too: a lazy import upward is still a cycle
that a newcomer has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "anogan_batch"
# bottom to top; a module may import its own layer and the layers below it
LAYERS = {
    "anogan_batch.errors": 0,
    "anogan_batch.fields": 0,
    "anogan_batch.io": 1,
    "anogan_batch.core": 2,
    "anogan_batch.ingest": 2,
    "anogan_batch.job": 3,
    "anogan_batch.warehouse": 3,  # reads a finished job's folder; the job's runner calls it
    "anogan_batch.evaluation": 4,
    "anogan_batch.api": 5,
    "anogan_batch.cli": 6,
    "anogan_batch.flags": 6,
    "anogan_batch.__main__": 6,
    "anogan_batch": 6,  # __init__: the public names, lazily
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules and n.startswith("anogan_batch")}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    deps = {m: imports(p, modules) - {m} for m, p in files.items()}
    # importing a module imports its package's __init__ too; those hold docstrings only
    return {m: {d for d in ds if d not in ("anogan_batch",) and files[d].name != "__init__.py"}
            for m, ds in deps.items()}  # fmt: skip


def test_every_module_has_a_layer_and_imports_only_down():
    upward = [
        f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
        for m, ds in graph().items()
        for d in sorted(ds)
        if layer(d) > layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    deps = graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(deps[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, m, d]))
            if d not in state:
                visit(d, [*stack, m])
        state[m] = 2

    for m in sorted(deps):
        if m not in state:
            visit(m, [])


def test_the_cli_starts_without_heavy_imports():
    import subprocess
    import sys

    code = (
        "import sys, anogan_batch.cli; "
        "print(sorted(m for m in ('torch', 'ray', 'pyarrow', 'numpy') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
