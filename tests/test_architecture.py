"""The package's house: import arrows run one way (tools -> core), no cycles, a light `import clover2_hf`.

`python tests/test_architecture.py` prints the import graph (module -> modules it imports).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "clover2_hf"
TOOL_PACKAGES = ("clover2_hf.tools", "clover2_hf.metrics")  # everything else is core (or the package facade)
FACADE = "clover2_hf"  # __init__.py: the public names; may re-export a tool function lazily (inside a function)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_tool(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in TOOL_PACKAGES)


def import_edges() -> dict[str, set[tuple[str, bool]]]:
    """{module: {(imported clover2_hf module, imported inside a function)}} from the source, incl. importlib strings."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[tuple[str, bool]]] = {}

    def resolve(name: str) -> str | None:
        while name and name not in modules:  # `from pkg.mod import Class` -> pkg.mod
            name = name.rpartition(".")[0]
        return name or None

    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        found: set[tuple[str, bool]] = set()

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                targets = []
                if isinstance(child, ast.ImportFrom):
                    if child.level:
                        base = name.split(".") if is_package else name.split(".")[:-1]
                        base = base[: len(base) - (child.level - 1)]
                        prefix = ".".join(base + ([child.module] if child.module else []))
                    else:
                        prefix = child.module or ""
                    if prefix == "clover2_hf" or prefix.startswith("clover2_hf."):
                        # `from pkg import module` imports pkg.module; `from pkg import name` imports pkg
                        targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix
                                   for a in child.names]
                elif isinstance(child, ast.Import):
                    targets = [a.name for a in child.names if a.name.startswith("clover2_hf")]
                elif (isinstance(child, ast.Call)
                      and (getattr(child.func, "attr", None) or getattr(child.func, "id", None)) in ("import_module",
                                                                                                 "__import__")
                      and child.args and isinstance(child.args[0], ast.Constant)
                      and str(child.args[0].value).startswith("clover2_hf")):
                    targets = [child.args[0].value]
                for target in targets:
                    resolved = resolve(target)
                    if resolved and resolved != name:
                        found.add((resolved, in_function))
                visit(child, local)

        visit(ast.parse(path.read_text(encoding="utf-8")), False)
        edges[name] = found
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_graph_sees_known_edges():
    """The parser itself works: a few edges that certainly exist are found (else the tests below prove nothing)."""
    edges = {m: {t for t, _ in e} for m, e in import_edges().items()}
    assert "clover2_hf.modeling_clover2" in edges["clover2_hf.generation.tree_step"]
    assert "clover2_hf.generation.stats" in edges["clover2_hf.tools.bench"]
    assert "clover2_hf.hub.code_files" in edges["clover2_hf.modeling_clover2"]  # importlib.import_module string
    assert ("clover2_hf.tools.embedded", True) in import_edges()[FACADE]  # function-local


def test_no_import_cycles():
    """Counting function-local imports too: a cycle hidden inside a function is still a knot to untie."""
    graph = {m: {t for t, _ in e} for m, e in import_edges().items()}
    assert cycles(graph) == []
    # the check can fail: an injected back edge is reported
    graph["clover2_hf.tree"] = graph["clover2_hf.tree"] | {"clover2_hf.generation.tree_step"}
    assert cycles(graph)


def test_core_never_imports_tools():
    bad = [(m, t) for m, e in import_edges().items() if not is_tool(m) for t, local in e
           if is_tool(t) and not (m == FACADE and local)]
    assert bad == [], "core -> tools imports: " + ", ".join(f"{m} -> {t}" for m, t in bad)


def test_import_is_light():
    """`import clover2_hf` loads the core only: no tool, no training, no GGUF/datasets/matplotlib."""
    code = ("import sys, clover2_hf; print(' '.join(sorted(m for m in sys.modules if m.startswith('clover2_hf') "
            "or m.split('.')[0] in ('gguf', 'datasets', 'matplotlib'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "clover2_hf.generation.tree_step" in loaded
    heavy = [m for m in loaded if is_tool(m) or m in ("clover2_hf.training", "clover2_hf.data")
             or not m.startswith("clover2_hf")]
    assert heavy == []


if __name__ == "__main__":
    for module, targets in sorted(import_edges().items()):
        shown = sorted(t.removeprefix("clover2_hf.") + ("*" if local else "") for t, local in targets)
        print(f"{module.removeprefix('clover2_hf.') or module}: {', '.join(shown) or '-'}")
    print("(* = imported inside a function)")
