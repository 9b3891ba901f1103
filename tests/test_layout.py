"""The package's shape: sub-packages layered with no upward import, imports flow one way (no cycles),
and docstrings cite nothing outside the repository."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "src" / "opd"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:`: imports for annotations only, never run."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            guarded.update(id(inner) for statement in node.body for inner in ast.walk(statement))
    return guarded


def opd_imports(path: Path) -> set[str]:
    """Modules of opd that a file imports when it runs, at any depth of the file (function-level imports
    included; those under `if TYPE_CHECKING:`, for annotations only, left out)."""
    found = set()
    tree = ast.parse(path.read_text())
    annotations_only = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in annotations_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "opd":
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from opd import losses`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "opd")
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: {target for target in opd_imports(path) if target in modules and target != name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return trail[trail.index(target) :] + [target] if target in trail else [node, target]
            if target not in state and (cycle := visit(target, trail + [target])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


# Each part of opd and its layer: a module may import its own part and parts of lower layers only, so
# parts of one layer are independent of each other (the README's "How it is built" draws this).
LAYERS = {
    "errors": 0,
    "config": 1,
    "ops": 1,
    "distributed": 1,
    "data": 2,
    "models": 2,
    "rollout": 3,
    "teachers": 3,
    "rewards": 3,
    "objectives": 4,
    "io": 4,
    "train": 5,
    "serve": 5,
    "demo": 6,
    "recipes": 6,
    "cli": 7,
    "__main__": 8,
}


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "opd"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """`importer -> imported` for every import that reaches a part of the same or a higher layer."""
    found = []
    for importer, targets in graph.items():
        for target in targets:
            source, dest = part_of(importer), part_of(target)
            if source != dest and dest != "opd" and (source == "opd" or LAYERS[dest] >= LAYERS[source]):
                found.append(f"{importer} -> {target}")
    return sorted(found)


def test_every_part_of_the_package_has_a_layer():
    parts = {part_of(module) for module in import_graph()} - {"opd"}
    assert parts == set(LAYERS), f"without a layer: {parts - set(LAYERS)}; layers of no part: {set(LAYERS) - parts}"


def test_no_part_imports_a_part_of_its_own_or_a_higher_layer():
    assert upward_imports(import_graph()) == []


def test_the_layer_check_finds_an_upward_import():
    graph = {
        "opd.teachers.routed": {"opd.train.metrics"},
        "opd.train.metrics": {"opd.teachers.alignment"},
        "opd.rollout.sampler": {"opd.teachers.local"},
        "opd.data.prompts": {"opd.data.tasks.gsm8k"},
    }
    assert upward_imports(graph) == [
        "opd.rollout.sampler -> opd.teachers.local",
        "opd.teachers.routed -> opd.train.metrics",
    ]


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "opd.ops.batch" in graph and "opd.train.trainer" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_tensor_functions_import_nothing_but_each_other():
    """The batch type, the forward passes, the log-prob math and the pure losses depend on no model,
    sampler or trainer code."""
    graph = import_graph()
    for module in ("opd.ops.batch", "opd.ops.forward", "opd.ops.logprobs", "opd.objectives.losses"):
        assert graph[module] <= {"opd.ops.batch", "opd.ops.logprobs"}, (module, graph[module])


def test_no_source_file_is_past_400_lines():
    long = {
        str(path.relative_to(PACKAGE)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 400
    }
    assert long == {}


def test_docstrings_cite_nothing_outside_the_repository():
    for path in PACKAGE.rglob("*.py"):
        assert "DESIGN.md" not in path.read_text(), path
