"""The package's shape: layers import downwards only, and the CLI's light commands stay torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "entrenar_cli"


def _module_graph() -> dict[str, set[str]]:
    """Module -> entrenar_cli modules it imports at module level (TYPE_CHECKING blocks excluded)."""
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = path

    def owner(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names if a.name.startswith("entrenar_cli")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("entrenar_cli"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else owner(node.module)
                         for a in node.names}
        graph[name] = {d for d in deps if d and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    def related(a: str, b: str) -> bool:  # a package importing its own submodule (or back) is not a circle
        return a.startswith(b + ".") or b.startswith(a + ".")

    found: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if related(dep, node):
                continue
            if dep in stack:
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, [*stack, dep])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    return found


def test_no_import_circle_in_the_package() -> None:
    graph = _module_graph()
    assert "entrenar_cli.estimate" in graph and "entrenar_cli.pipeline.common" in graph  # the walk saw the package
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"p": {"p.sub"}, "p.sub": {"p"}}) == []


def test_estimate_and_help_never_import_torch() -> None:
    code = ("import sys\nfrom entrenar_cli import estimate\n"
            "estimate.estimate_training(estimate.catalogue.lookup('llama', '7b').config, method='qlora')\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
