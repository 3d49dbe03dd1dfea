"""The package's import graph has no cycle (storage, runtime, methods and commands import downwards only)."""

import ast
import pathlib
import sys


def _graph(root: pathlib.Path) -> dict[str, set[str]]:
    """module -> the package modules it imports, for every import statement under `root` (function-level imports
    included)."""
    mods = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg[: len(pkg) - node.level + 1] if node.level else []
                name = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
                for a in node.names:
                    for cand in (f"{name}.{a.name}", name):
                        if cand in mods and cand != m:
                            graph[m].add(cand)
                            break
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in mods and a.name != m)
    return graph


def _cycles(root: pathlib.Path) -> list[list[str]]:
    """Strongly connected components (size > 1) of the import graph under `root`."""
    graph = _graph(root)
    index, low, stack, on, out = {}, {}, [], set(), []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    root = pathlib.Path(__file__).resolve().parent.parent / "src" / "kvsqueeze"
    assert _cycles(root) == []


def test_the_checker_sees_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from .a import y\n")
    assert _cycles(pkg) == [["pkg.a", "pkg.b"]]


# The architecture, bottom to top: a module may import its own layer and the layers below, never above.
LAYERS = [
    {"errors", "shapes", "compat", "devices", "models", "version"},
    {"kernels"},
    {"storage"},
    {"quant"},
    {"methods"},
    {"selection"},
    {"runtime"},
    {"tasks", "training", "evaluation"},
    {"cli"},
    {"", "__main__"},  # the package itself: re-exports the public API
]


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"{module}: not placed in a layer (tests/test_imports.py LAYERS)")


def test_imports_point_downwards_only():
    root = pathlib.Path(__file__).resolve().parent.parent / "src" / "kvsqueeze"
    up = sorted((a, b) for a, targets in _graph(root).items() for b in targets if _layer(b) > _layer(a))
    assert up == [], "upward imports: " + ", ".join(f"{a} -> {b}" for a, b in up)
