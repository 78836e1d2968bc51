"""No import cycle in the package, counting imports inside functions (an import moved into a function
to dodge a cycle is still a cycle: the layers must import downward only)."""

from __future__ import annotations

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"blur_lightning": "blur_lightning", "blur_lightning.kernels": "kernels"}


def package_modules(root: str, packages: dict[str, str]) -> dict[str, str]:
    """Dotted module name -> file, for every .py file under each package folder."""
    found = {}
    for package, folder in packages.items():
        base = os.path.join(root, folder)
        for dirpath, _, files in os.walk(base):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, name), base)[:-3].replace(os.sep, ".")
                    module = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
                    found[module] = os.path.join(dirpath, name)
    return found


def imported_modules(module: str, path: str, known: set[str]) -> set[str]:
    """The package modules that `module` imports anywhere in its file (functions included)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    here = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                parts = here.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = base + (f".{node.module}" if node.module else "")
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    found.add(f"{source}.{alias.name}")  # from package import submodule
                elif source in known:
                    found.add(source)
    found.discard(module)
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Tarjan's algorithm: the groups of two or more modules that import each other in a loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(frozenset(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def import_graph() -> dict[str, set[str]]:
    modules = package_modules(ROOT, PACKAGES)
    graph = {m: imported_modules(m, p, set(modules)) for m, p in modules.items()}
    # The top package's __init__ only re-exports; as an edge it would close every loop.
    graph.pop("blur_lightning", None)
    for edges in graph.values():
        edges.discard("blur_lightning")
    return graph


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from pkg.high import g\n    return g\n")
    (package / "high.py").write_text("from pkg import low\n")
    (package / "other.py").write_text("from pkg.low import f\n")
    modules = package_modules(str(tmp_path), {"pkg": "pkg"})
    graph = {m: imported_modules(m, p, set(modules)) for m, p in modules.items()}
    assert graph["pkg.high"] == {"pkg.low"} and graph["pkg.low"] == {"pkg.high"}
    assert strongly_connected(graph) == [frozenset({"pkg.low", "pkg.high"})]


def test_no_cycle_among_the_evaluation_modules():
    groups = strongly_connected(import_graph())
    evals = [sorted(g) for g in groups if any(m.startswith("blur_lightning.evals") for m in g)]
    assert not evals, f"import cycles through the evaluation wing: {evals}"


def test_no_import_cycle_in_the_package():
    groups = strongly_connected(import_graph())
    assert not groups, "import cycles: " + "; ".join(" <-> ".join(sorted(g)) for g in groups)


# The layers, lowest first: a module may import its own layer and any layer below, never above. `core`
# and `kernels` (the top-level folder, imported as blur_lightning.kernels) are one layer, the math: the
# projection dispatches to the kernels, which read core's backends (no module cycle: the test above).
LAYERS = ["core+kernels", "models", "losses", "data", "distributed", "training", "evals", "fictitious", "cli"]
# Helpers for tests and benchmarks: they may import anything, nothing at runtime imports them.
OUTSIDE_THE_LAYERS = {"testing", "assets"}


def layer_of(module: str) -> str | None:
    """'blur_lightning.training.unlearner' -> 'training'; the top package's __init__ -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_subpackage_has_a_layer():
    subpackages = {layer_of(m) for m in package_modules(ROOT, PACKAGES)} - {None}
    layered = {name for layer in LAYERS for name in layer.split("+")}
    assert subpackages <= layered | OUTSIDE_THE_LAYERS, sorted(subpackages - layered - OUTSIDE_THE_LAYERS)


def test_subpackages_import_downward_only():
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer.split("+")}
    upward = []
    for module, imported in import_graph().items():
        low = layer_of(module)
        if low in OUTSIDE_THE_LAYERS:
            continue
        for target in imported:
            high = layer_of(target)
            if high in OUTSIDE_THE_LAYERS:
                upward.append(f"{module} -> {target} (a test helper at runtime)")
            elif high is not None and rank[high] > rank[low]:
                upward.append(f"{module} ({low}) -> {target} ({high})")
    assert not upward, "imports against the layers " + " < ".join(LAYERS) + ":\n" + "\n".join(sorted(upward))
