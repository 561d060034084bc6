"""No import cycles inside the package: the module graph read from the source (ast), without importing it.

Edges: `import megatron_r1.x` / `from megatron_r1.x import y` / relative imports, to the module named (or to
`x.y` when `y` is a submodule), plus the packages above it (importing `a.b.c` runs `a/__init__` and `a/b/__init__`).
Top-level imports (module body, including `if`/`try` blocks but not `if TYPE_CHECKING:`) must form no cycle.
Imports inside functions are allowed where they defer a heavy import; with them counted, only the listed known
cycles may remain.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import megatron_r1

PACKAGE = Path(megatron_r1.__file__).parent
NAME = "megatron_r1"
# Cycles that pass only through imports inside functions, each with the reason it is still there.
KNOWN_DEFERRED_CYCLES: set[frozenset[str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imported(node: ast.AST, module: str, is_package: bool, mods: dict) -> set[str]:
    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    out: set[str | None] = set()
    if isinstance(node, ast.Import):
        out |= {known(a.name) for a in node.names if a.name.split(".")[0] == NAME}
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target.split(".")[0] == NAME:
            out |= {f"{target}.{a.name}" if f"{target}.{a.name}" in mods else known(target) for a in node.names}
    return {m for m in out if m is not None}


def _top_level(body: list) -> list:
    nodes = []
    for node in body:
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                nodes += _top_level(node.body) + _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            nodes += _top_level(node.body) + _top_level(node.orelse) + _top_level(node.finalbody)
            for handler in node.handlers:
                nodes += _top_level(handler.body)
        else:
            nodes.append(node)
    return nodes


def import_graph(deferred: bool) -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for module, path in mods.items():
        tree = ast.parse(path.read_text())
        nodes = list(ast.walk(tree)) if deferred else _top_level(tree.body)
        deps = set()
        for node in nodes:
            for dep in _imported(node, module, path.name == "__init__.py", mods):
                parts = dep.split(".")
                deps |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        # a module's own packages run before it: not an edge of its own
        graph[module] = {d for d in deps if d in mods and d != module and not module.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(graph, component) -> str:
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & component))}" for m in sorted(component))


def test_no_cycle_among_top_level_imports():
    graph = import_graph(deferred=False)
    assert len(graph) > 50
    found = cycles(graph)
    assert found == [], "import cycles: " + " | ".join(_describe(graph, c) for c in found)


def test_imports_inside_functions_close_no_new_cycle():
    graph = import_graph(deferred=True)
    found = [c for c in cycles(graph) if frozenset(c) not in KNOWN_DEFERRED_CYCLES]
    assert found == [], "import cycles through imports inside functions: " + " | ".join(
        _describe(graph, c) for c in found)


def test_the_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


# ------------------------------------------------------------------------------------------- deferred imports
# Subprocess entry points that import as little as possible on purpose (they run inside the code sandbox).
MINIMAL_IMPORT_MODULES = {"megatron_r1.rewards._sandbox_boot", "megatron_r1.rewards._sandbox_init",
                          "megatron_r1.rewards._verify_worker"}


def _third_party_at_top(mods: dict) -> dict[str, set[str]]:
    """Per module, the third-party packages its top-level imports name (stdlib and megatron_r1 excluded)."""
    out = {}
    for module, path in mods.items():
        roots = set()
        for node in _top_level(ast.parse(path.read_text()).body):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            roots |= {n.split(".")[0] for n in names}
        out[module] = {r for r in roots if r and r != NAME and r not in sys.stdlib_module_names}
    return out


def test_imports_inside_functions_defer_a_third_party_import():
    """An import of our own modules or of the standard library inside a function must defer a third-party package
    (torch, Megatron, transformers, ...) that the importing module does not load at import time already, so CLI
    start-up stays fast; otherwise it belongs at the top. Imports in `try` (optional packages) and ones with a
    comment on their line or the line above (saying why, e.g. a spawn-safe start method) are exempt."""
    mods = _modules()
    graph = import_graph(deferred=False)
    own = _third_party_at_top(mods)

    def heavy(module: str) -> set[str]:
        """Third-party packages loaded by importing `module`: everything it reaches at top level, its packages'
        __init__ included (a plain walk: a package and its submodules import each other, so no memo)."""
        seen, todo, found = {module}, [module], set()
        while todo:
            m = todo.pop()
            found |= own[m]
            parents = {".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)}
            for dep in (graph[m] | parents) & set(mods):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return found

    def exempt(tree) -> set[int]:
        ids = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try):
                ids |= {id(n) for n in ast.walk(node)}
        return ids

    needless = []
    for module, path in sorted(mods.items()):
        if module in MINIMAL_IMPORT_MODULES:
            continue
        tree = ast.parse(path.read_text())
        lines = path.read_text().splitlines()
        top = {id(n) for n in _top_level(tree.body)}
        skip = exempt(tree)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top | skip:
                continue
            if "#" in lines[node.end_lineno - 1] or lines[node.lineno - 2].strip().startswith("#"):
                continue
            targets = _imported(node, module, path.name == "__init__.py", mods)
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n.split(".")[0] not in (NAME, "") and n.split(".")[0] not in sys.stdlib_module_names
                   for n in names) and not getattr(node, "level", 0):
                continue  # a third-party module: deferring it is the point
            if not any(heavy(t) - heavy(module) for t in targets if t in mods):
                needless.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {ast.unparse(node)}")
    assert needless == [], ("imports inside functions that defer nothing heavy (move them to the top, or say why "
                            "in a comment): " + "; ".join(needless))
