"""No import cycles inside gflowgr_core (kernels/ included: it installs as gflowgr_core.kernels).

The graph holds every import statement of every module, those inside functions too: an import moved into a
function to dodge a cycle hides the cycle without removing it, so it counts here like any other.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"gflowgr_core": ROOT / "gflowgr_core", "gflowgr_core.kernels": ROOT / "kernels"}


def package_modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (source file, whether it is a package ``__init__``)."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join([package, *parts])] = (path, is_package)
    return modules


def imported_names(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute names one import statement may load: its modules, and for ``from X import y`` also
    ``X.y`` (which is a module when ``y`` is a submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    return [source] + [f"{source}.{alias.name}" for alias in node.names]


def import_graph(modules: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """Module -> the modules of ``modules`` that importing it runs.

    Importing ``a.b.c`` also runs the packages ``a`` and ``a.b``; a module's own enclosing packages are left
    out, since they are already being imported when it runs.
    """
    graph = {}
    for module, (path, is_package) in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in imported_names(module, is_package, node):
                parts = name.split(".")
                for i in range(1, len(parts) + 1):
                    target = ".".join(parts[:i])
                    if target in modules and target != module and not module.startswith(target + "."):
                        deps.add(target)
        graph[module] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[m0, m1, ..., m0]``, or ``None`` when it has none."""
    done: set[str] = set()  # modules whose every import has been followed without meeting a cycle
    for start in sorted(graph):
        if start in done:
            continue
        # Depth-first with an explicit stack (module chains can be deeper than is comfortable to recurse).
        path, pending = [start], [iter(sorted(graph[start]))]
        while pending:
            nxt = next(pending[-1], None)
            if nxt is None:
                pending.pop()
                done.add(path.pop())
            elif nxt in path:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in done:
                path.append(nxt)
                pending.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_find_cycle_reports_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_resolves_relative_absolute_and_function_level_imports():
    graph = import_graph(package_modules())
    assert "gflowgr_core.model.policy" in graph["gflowgr_core.pretrained"]      # from .model.policy import
    assert "gflowgr_core.model" in graph["gflowgr_core.pretrained"]             # its package runs first
    assert "gflowgr_core.collaborative" in graph["gflowgr_core.train.trainer"]  # imported inside a method
    assert "gflowgr_core.devices" in graph["gflowgr_core.train.distributed"]   # absolute import


def test_no_import_cycles_in_gflowgr_core():
    cycle = find_cycle(import_graph(package_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
