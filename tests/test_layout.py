"""The package's structure: stages in folders, imports that resolve, flow one way, and stay
public.

Every ``from .x import y`` in the package (at module level or inside a function) is read
from the source: it must name a module that exists and a public name it defines, and the
graph of these imports must have no cycle.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "esmc_lens"
STAGES = ("models", "data", "residual", "lens", "localization", "cluster", "report", "apps")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(name: str) -> bool:
    return (PKG.parent / Path(*name.split(".")) / "__init__.py").exists()


def _imports(path: Path) -> list[tuple[str, str, int]]:
    """(target module, imported name, line) of every relative ``from`` import in ``path``."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            assert not (node.module or "").startswith("esmc_lens"), (
                f"{path.name}:{node.lineno}: import esmc_lens modules relatively")
            continue
        base = package.split(".")
        base = base[: len(base) - node.level + 1]
        target = ".".join([*base, *([node.module] if node.module else [])])
        out.extend((target, alias.name, node.lineno) for alias in node.names)
    return out


MODULES = sorted(PKG.rglob("*.py"))


def test_stages_are_folders():
    assert [s for s in STAGES if not (PKG / s / "__init__.py").exists()] == []
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "errors.py", "pipeline.py", "validate.py"]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_resolve_to_public_names(path):
    bad = []
    for target, name, line in _imports(path):
        if name.startswith("_"):
            bad.append(f"line {line}: private name {name} from {target}")
            continue
        if _is_package(target) and (PKG.parent / Path(*target.split(".")) / f"{name}.py"
                                    ).exists():
            continue  # a submodule
        if not hasattr(importlib.import_module(target), name):
            bad.append(f"line {line}: {target} has no {name}")
    assert bad == []


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        me = _module_name(path)
        edges = graph.setdefault(me, set())
        for target, name, _ in _imports(path):
            sub = f"{target}.{name}"
            edges.add(sub if (PKG.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                      else target)
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if nxt == "esmc_lens" or nxt not in graph:
                continue
            if state.get(nxt) == "open":
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_console_scripts_name_functions_that_exist():
    """``esmc-lens`` (``make demo``, the README) runs the function pyproject.toml names."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    scripts = tomllib.loads((PKG.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts, "pyproject.toml declares no console script"
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert (PKG.parent / Path(*module.split("."))).with_suffix(".py").is_file(), (
            f"{name} = {target!r}: no module {module}")
        assert callable(getattr(importlib.import_module(module), attr, None)), (name, target)
