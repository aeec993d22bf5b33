"""The package layout: no import circles in ``agents``, and no layer importing a higher one.

Every ``import`` statement counts, including those inside functions: a lazy import still ties
two modules together, it only hides the circle until run time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "agents"

# Lowest first. A module may import its own layer and the layers before it, never a later one.
LAYERS = (
    ("agents._lazy", "agents._extensions"),
    ("agents.generation",),
    ("agents.policy",),
    ("agents.baselines", "agents.trl_adapter", "agents.trl_template", "agents.trl_sft", "agents.trl_play"),
    ("agents.rl",),
    ("agents.presets",),
    ("agents.commands", "agents.cli"),
)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def agents_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The ``agents`` modules a file imports (``from pkg import mod`` resolves to ``pkg.mod``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = agents_modules()
    known = set(modules)
    return {name: imports_of(path, known) - {name} for name, path in modules.items()}


def layer_of(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None  # the package root, which re-exports lazily from every layer


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules, or None. Package ``__init__`` edges to their own
    submodules are re-exports, and submodules naming their package are not circles."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep.startswith(node + ".") or node.startswith(dep + "."):
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_walker_sees_circles_and_lazy_imports(tmp_path):
    pkg = tmp_path / "agents"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("def f():\n    from agents.low.b import g\n")
    (pkg / "low" / "b.py").write_text("from agents.low import a\n")
    names = {module_name(p, pkg): p for p in pkg.rglob("*.py")}
    graph = {name: imports_of(p, set(names)) - {name} for name, p in names.items()}
    assert graph["agents.low.a"] == {"agents.low.b"}
    assert graph["agents.low.b"] == {"agents.low.a", "agents.low"}
    assert find_cycle(graph) is not None


def test_agents_has_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_module_belongs_to_a_layer():
    unplaced = [m for m in agents_modules() if m != "agents" and layer_of(m) is None]
    assert not unplaced, f"add these modules to a layer in tests/test_layout.py: {unplaced}"


@pytest.mark.parametrize("module", sorted(m for m in agents_modules() if m != "agents"))
def test_no_layer_imports_a_higher_one(module):
    graph = import_graph()
    upward = sorted(dep for dep in graph[module] if dep != "agents" and layer_of(dep) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports higher layers: {upward}"


def test_public_names_import_from_the_package_root():
    import agents

    for name in agents.__all__:
        assert getattr(agents, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        agents.Nope  # noqa: B018


def test_the_command_line_builds_without_importing_torch():
    """``memr2 eval`` with a scripted agent runs without torch: building the parser (which
    imports every subcommand) must not import it."""
    code = "import sys, agents.cli; agents.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
