"""The package's layers (README, "Layout"): no module imports from a layer above its own, and no cycles.

Every import counts, also those inside functions and under ``TYPE_CHECKING``: an arrow is an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tscm_ros"

# Bottom to top. A module may import its own subpackage and the layers below it; two subpackages in one
# layer do not import each other. The floor is tscm_ros/__init__.py, errors, atomic, progress and the
# messages rosidl generates (tscm_ros.msg).
LAYERS = [
    {"", "errors", "atomic", "progress", "msg"},
    {"io", "sim"},
    {"describe"},
    {"map"},
    {"detect"},
    {"graph"},
    {"evaluate", "node"},
    {"train"},
    {"cli"},
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def module_name(path: Path) -> str:
    parts = ("tscm_ros",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The tscm_ros modules ``path`` imports (``from tscm_ros.map import storage`` names tscm_ros.map.storage)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "tscm_ros"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "tscm_ros":
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known
            found |= submodules or {node.module}
    return found


def layer(module: str) -> str:
    """The subpackage (or floor module) a tscm_ros module belongs to: tscm_ros.map.storage -> 'map'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        own = layer(module)
        for target in sorted(targets):
            other = layer(target)
            if other != own and RANK[other] >= RANK[own]:
                problems.append(f"{module} ({own or 'floor'}) imports {target} ({other or 'floor'})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles between modules (a package's own __init__ importing its modules is not one)."""
    found, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target.startswith(module + "."):
                continue  # a package re-exporting its own modules
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {module: imports(path, set(found)) - {module} for module, path in found.items()}


def test_every_subpackage_has_a_layer():
    subpackages = {layer(module) for module in modules()}
    assert subpackages <= set(RANK), f"subpackages without a layer: {sorted(subpackages - set(RANK))}"


def test_no_module_imports_from_a_layer_above_its_own():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_nothing_outside_cli_imports_cli():
    graph = import_graph()
    assert [m for m, targets in graph.items() if layer(m) != "cli" and any(layer(t) == "cli" for t in targets)] == []


def test_the_checks_see_an_upward_import_and_a_cycle():
    graph = {"tscm_ros.map.storage": {"tscm_ros.detect.detection"}, "tscm_ros.detect.detection": set(),
             "tscm_ros.io.bag": {"tscm_ros.sim.world"}, "tscm_ros.sim.world": set()}
    assert len(upward_imports(graph)) == 2  # a layer above, and a sibling in the same layer
    assert cycles({"tscm_ros.sim.a": {"tscm_ros.sim.b"}, "tscm_ros.sim.b": {"tscm_ros.sim.a"}}) != []


def test_imports_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from tscm_ros.map import storage\n    import tscm_ros.io.bag\n")
    assert imports(module, {"tscm_ros.map.storage"}) == {"tscm_ros.map.storage", "tscm_ros.io.bag"}
