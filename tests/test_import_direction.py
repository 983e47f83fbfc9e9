"""san_det's imports run one way, down the layers (docs/ARCHITECTURE.md):

    errors, compat, utils -> layers -> modeling -> data -> engine -> {detection, classification}
    -> config, the package itself (-> train_net.py, tools/)

Every import between san_det's modules, module-level or inside a function, is read with ``ast``;
an import of a higher layer, or a cycle between top-level parts (also between the two of the
same layer), fails with the importing file and line.
"""

import ast
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "san_det"

#: rank of each top-level part of the package (module or subpackage): imports go to lower or
#: equal ranks only. ``san_det`` is the package's ``__init__``.
LAYERS: Dict[str, int] = {
    "errors": 0,
    "compat": 0,
    "utils": 0,
    "layers": 1,
    "modeling": 2,
    "attention_maps": 2,
    "data": 3,
    "engine": 4,
    "detection": 5,
    "classification": 5,
    "config": 6,
    "san_det": 6,
}



class Edge(NamedTuple):
    source: str  # importing module, e.g. "san_det.engine.trainer"
    target: str  # imported module (or name in it), e.g. "san_det.engine.checkpoint"
    where: str  # "san_det/engine/trainer.py:12"


def _module_name(path: Path, root: Path) -> Tuple[str, bool]:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def import_edges(package: Path = PACKAGE) -> List[Edge]:
    """Every import of a san_det module in ``package``'s files, at any depth of the file."""
    edges = []
    for path in sorted(package.rglob("*.py")):
        module, is_package = _module_name(path, package)
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets: Iterable[str] = ()
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [prefix] if node.module else [f"{prefix}.{a.name}" for a in node.names]
            where = f"{path.relative_to(package.parent)}:{node.lineno}" if targets else ""
            for target in targets:
                if target == "san_det" or target.startswith("san_det."):
                    edges.append(Edge(module, target, where))
    return edges


def part(module: str) -> str:
    """The top-level part a module belongs to: ``san_det.engine.trainer`` -> ``engine``."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "san_det"


def upward_imports(edges: Iterable[Edge]) -> List[str]:
    """Imports of a higher layer (or of a part missing from :data:`LAYERS`)."""
    problems = []
    for e in edges:
        source, target = part(e.source), part(e.target)
        for p in (source, target):
            if p not in LAYERS:
                problems.append(
                    f"{e.where}: {p!r} has no layer in LAYERS ({e.source} -> {e.target})"
                )
        if source in LAYERS and target in LAYERS and LAYERS[target] > LAYERS[source]:
            problems.append(
                f"{e.where}: {e.source} (layer {source}) imports {e.target} (higher layer {target})"
            )
    return problems


def part_cycles(edges: Iterable[Edge]) -> List[List[str]]:
    """Cycles of the graph of top-level parts (each as the list of parts along it)."""
    graph: Dict[str, set] = {}
    for e in edges:
        source, target = part(e.source), part(e.target)
        if source != target:
            graph.setdefault(source, set()).add(target)
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def _package_edges() -> List[Edge]:
    return import_edges()


def test_imports_only_go_down_the_layers():
    edges = _package_edges()
    assert len(edges) > 100  # the parser sees the package's imports
    problems = upward_imports(edges)
    assert not problems, "\n".join(problems)


def test_no_cycle_between_parts_of_the_package():
    cycles = part_cycles(_package_edges())
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """A planted package: a function-local upward import and a cycle between two parts."""
    package = tmp_path / "san_det"
    (package / "layers").mkdir(parents=True)
    (package / "engine").mkdir()
    (package / "__init__.py").write_text("")
    (package / "layers" / "__init__.py").write_text("")
    (package / "layers" / "op.py").write_text(
        "import torch\n\ndef f():\n    from ..engine import trainer\n    return trainer\n"
    )
    (package / "engine" / "__init__.py").write_text("from ..layers import op\n")
    (package / "engine" / "trainer.py").write_text("from san_det.layers.op import f\n")
    edges = import_edges(package)
    assert Edge("san_det.layers.op", "san_det.engine", "san_det/layers/op.py:4") in edges
    problems = upward_imports(edges)
    assert len(problems) == 1 and "san_det/layers/op.py:4" in problems[0], problems
    assert part_cycles(edges) == [["engine", "layers", "engine"]]
    (package / "stray.py").write_text("from .layers import op\n")
    assert any("'stray' has no layer" in p for p in upward_imports(import_edges(package)))


if __name__ == "__main__":  # print the edges between parts: python tests/test_import_direction.py
    for source, target in sorted({(e.source, e.target) for e in import_edges()}):
        if part(source) != part(target):
            print(source, "->", target)
