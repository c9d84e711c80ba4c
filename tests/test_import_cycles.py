"""No module of ``vllm_dapd`` imports itself back through others, not even through an import inside a
function; the runtime packages import the demo (package data) only inside a function. Read from the
source (``ast``), nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vllm_dapd"
RUNTIME = ("vllm_dapd.engine", "vllm_dapd.decoding", "vllm_dapd.models", "vllm_dapd.distributed")


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package; ``vllm_dapd.plugins`` is the top-level
    ``plugins/`` folder (setup.py's package_dir; a checkout may also link it into the package)."""
    found = {}
    for top, prefix in ((PACKAGE, ("vllm_dapd",)), (ROOT / "plugins", ("vllm_dapd", "plugins"))):
        for path in sorted(top.rglob("*.py")):
            parts = prefix + path.relative_to(top).with_suffix("").parts
            if parts[:2] == ("vllm_dapd", "plugins") and top == PACKAGE:
                continue  # the link, read through ROOT / "plugins"
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_targets(name: str, path: Path, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of everything module ``name`` imports, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = []
    for node in nodes:
        if isinstance(node, ast.Import):
            targets += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return targets


def imports(name: str, path: Path, known: dict[str, Path], top_level_only: bool = False) -> set[str]:
    """The package's modules that ``name`` imports (the longest known prefix of each imported name)."""
    targets = [t for _, t in import_targets(name, path, top_level_only)]
    found = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of two or more modules that reach each other (strongly connected components)."""
    reach = {m: set() for m in graph}
    for start in graph:
        todo = list(graph[start])
        while todo:
            m = todo.pop()
            if m not in reach[start]:
                reach[start].add(m)
                todo += graph.get(m, ())
    groups = {tuple(sorted(m for m in graph if m in reach[n] and n in reach[m])) for n in graph}
    return sorted(list(g) for g in groups if len(g) > 1)


def test_no_module_imports_itself_back():
    known = modules()
    assert {"vllm_dapd.engine.vllm.hooks", "vllm_dapd.decoding.policy", "vllm_dapd.plugins.dapd"} <= set(known)
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    graph["vllm_dapd.engine.vllm.names"].add("vllm_dapd.engine.vllm.hooks")  # hooks imports names
    assert any({"vllm_dapd.engine.vllm.hooks", "vllm_dapd.engine.vllm.names"} <= set(group) for group in cycles(graph))


def test_runtime_packages_import_the_demo_only_inside_functions():
    known = modules()
    offenders = {name: sorted(m for m in imports(name, path, known, top_level_only=True)
                              if m.startswith(("vllm_dapd.demo", "vllm_dapd.depbench")))
                 for name, path in known.items() if name.startswith(RUNTIME)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_engine_core_never_imports_vllm_or_the_glue():
    """``vllm_dapd.engine.core`` is the vLLM-free half of the engine: no import of ``vllm`` or of
    ``vllm_dapd.engine.vllm`` anywhere in its source, not even inside a function."""
    known = modules()
    core = {n: p for n, p in known.items() if n.startswith("vllm_dapd.engine.core")}
    assert "vllm_dapd.engine.core.stepper" in core
    for name, path in core.items():
        bad = [(line, t) for line, t in import_targets(name, path)
               if t == "vllm" or t.startswith(("vllm.", "vllm_dapd.engine.vllm"))]
        assert not bad, f"{name} imports {bad}"
