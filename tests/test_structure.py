"""The code's shape, checked from its source: the import graph between the project's modules has
no cycles, and the runtime (what ships to a board) never imports the compiler."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"moetvm": REPO / "moetvm", "moetvm.compiler": REPO / "compiler", "moetvm.runtime": REPO / "runtime",
            "moetvm.targets": REPO / "targets"}
def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def import_graph(top_level_only: bool) -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else ast.walk(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in mods:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name and not name.startswith(candidate + "."):
                    edges.add(candidate)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    found = set()

    def walk(node, path):
        for nxt in graph[node]:
            if nxt in path:
                cycle = path[path.index(nxt):]
                start = cycle.index(min(cycle))
                found.add(tuple(cycle[start:] + cycle[:start]))
            elif nxt not in seen:
                seen.add(nxt)
                walk(nxt, path + [nxt])

    for start in sorted(graph):
        seen = {start}
        walk(start, [start])
    return found


def test_module_imports_have_no_cycles():
    assert cycles(import_graph(top_level_only=True)) == set()
    assert cycles(import_graph(top_level_only=False)) == set(), "import cycles through function-level imports"


def test_the_runtime_never_imports_the_compiler():
    graph = import_graph(top_level_only=False)
    runtime = [m for m in graph if m.startswith("moetvm.runtime")]
    assert runtime and not {m: sorted(e for e in graph[m] if e.startswith("moetvm.compiler")) for m in runtime
                            if any(e.startswith("moetvm.compiler") for e in graph[m])}
