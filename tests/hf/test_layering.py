"""The package's layering, read from the source with ``ast``: imports go one way,
kernels <- ops <- prefix <- hf <- distill <- cli / serve (the two top layers: neither imports the other, except the
command's lazy load of ``prefixattn serve``), there is no import cycle, and no function hides an import of a
prefixattn module (the usual way to dodge a cycle).

Modules directly under prefixattn/ belong to the ops layer unless they are listed in ``CLI_LAYER``; the
package facade (prefixattn/__init__.py, which loads hf and prefix lazily) counts as the cli layer, so
nothing below may import it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("kernels", "ops", "prefix", "hf", "distill", "cli", "serve")
# cli and serve: both the top; distill (context distillation, on the transformers layer) below the command
RANK = {"kernels": 0, "ops": 1, "prefix": 2, "hf": 3, "distill": 3.5, "cli": 4, "serve": 4}
CLI_LAYER = {"prefixattn", "prefixattn.tasks", "prefixattn.__main__"}  # and the prefixattn.cli package (see _layer)

# Function-level imports of prefixattn modules that are lazy loads, not cycle dodges: the command loads
# its subcommands on use. The prefix and hf layers have none.
LAZY_LOADERS = {
    ("prefixattn.cli", "prefixattn.cli.train"),  # `prefixattn info` does not load transformers
    ("prefixattn.cli", "prefixattn.serve.cli"),  # `prefixattn train` does not load vLLM
    ("prefixattn.cli", "prefixattn.cli.distill"),  # `prefixattn info` does not load the distill layer
}


def _modules() -> dict[str, Path]:
    """Module name -> file, for prefixattn/ and kernels/ (installed as prefixattn.kernels)."""
    out = {}
    for base, package in ((ROOT / "prefixattn", "prefixattn"), (ROOT / "kernels", "prefixattn.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _layer(name: str) -> str:
    if name in CLI_LAYER or name == "prefixattn.cli" or name.startswith("prefixattn.cli."):
        return "cli"
    for layer in ("kernels", "prefix", "hf", "distill", "serve"):
        if name == f"prefixattn.{layer}" or name.startswith(f"prefixattn.{layer}."):
            return layer
    return "ops"


def _known(target: str) -> str | None:
    """The most specific prefixattn module that ``target`` (a module or module.attribute) names."""
    if not (target == "prefixattn" or target.startswith("prefixattn.")):
        return None
    while target not in MODULES and "." in target:
        target = target.rsplit(".", 1)[0]
    return target if target in MODULES else None


def _resolve(importer: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The prefixattn modules an import statement loads."""
    if isinstance(node, ast.Import):
        return [t for t in (_known(alias.name) for alias in node.names) if t]
    if node.level:
        parts = importer.split(".")
        base = parts if is_package else parts[:-1]
        base = base[: len(base) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    submodules = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES]
    attributes = len(submodules) < len(node.names)
    found = submodules + ([_known(module)] if attributes and _known(module) else [])
    return found


def _imports(name: str, source: str | None = None, is_package: bool = False) -> list[tuple[str, int, bool]]:
    """(imported prefixattn module, line, inside a function) for every import in the module (or in
    ``source``, read as if it were module ``name``)."""
    if source is None:
        source, is_package = MODULES[name].read_text(), MODULES[name].name == "__init__.py"
    tree = ast.parse(source)
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.extend((target, child.lineno, in_function) for target in _resolve(name, is_package, child))
            visit(child, inner)

    visit(tree, False)
    return out


def test_the_layers_are_all_there():
    layers = {_layer(name) for name in MODULES}
    assert layers == set(LAYERS), layers
    assert _layer("prefixattn.hf.attention") == "hf" and _layer("prefixattn.prefix.module") == "prefix"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_the_layers(name):
    rank = RANK[_layer(name)]
    upward = [f"line {line}: {target} ({_layer(target)})" for target, line, _ in _imports(name)
              if RANK[_layer(target)] > rank]
    assert not upward, (f"{name} ({_layer(name)} layer) imports up the layers: {upward} (a new command-layer "
                        "module belongs in CLI_LAYER)")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_the_top_layers_stay_apart(name):
    """Nothing imports the serve layer but itself and the command's lazy dispatch; serve never imports cli."""
    crossing = [f"line {line}: {target}" for target, line, local in _imports(name)
                if {_layer(name), _layer(target)} == {"cli", "serve"}
                and not ((name, target) in LAZY_LOADERS and local)]
    assert not crossing, f"{name} ({_layer(name)}) imports the other top layer: {crossing}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_function_level_imports_of_prefixattn_modules(name):
    hidden = [f"line {line}: {target}" for target, line, local in _imports(name)
              if local and (name, target) not in LAZY_LOADERS]
    assert not hidden, f"{name} imports prefixattn modules inside functions: {hidden}"
    if _layer(name) in ("prefix", "hf"):
        assert not [t for t, _, local in _imports(name) if local]


def test_no_import_cycle():
    graph = {name: {t for t, _, _ in _imports(name) if t != name} for name in MODULES}
    # a package's own __init__ importing its submodules is not a cycle through them: edges from a
    # submodule to its parent package are implicit in Python and are not listed here
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name)


def test_the_checker_sees_violations():
    """The resolver finds relative, absolute and function-level imports (the checks above can fail)."""
    source = ("from ..hf import plan\nimport prefixattn.ops\nfrom . import module\n"
              "def f():\n    from .config import PrefixConfig\n    import torch\n")
    found = _imports("prefixattn.prefix.fake", source)
    assert found == [("prefixattn.hf.plan", 1, False), ("prefixattn.ops", 2, False),
                     ("prefixattn.prefix.module", 3, False), ("prefixattn.prefix.config", 5, True)]
    assert _imports("prefixattn.prefix", "from .module import PrefixKV\n", is_package=True) == [
        ("prefixattn.prefix.module", 1, False)]
    # the command's lazy load of its train subcommand is a real function-level import
    assert ("prefixattn.cli.train", True) in {(t, local) for t, _, local in _imports("prefixattn.cli")}
