"""The package's imports follow its layers (README, Architecture): no module imports one in a
higher layer, and no import cycle anywhere in cir/.

Read from the source of the installed package with `ast`, so every import counts: top-level,
inside functions (lazy), under `if TYPE_CHECKING`, and "package.module:attribute" strings that
registries import on first use.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import cir

# Bottom to top, as the README's Architecture section shows them. A module may import modules
# of its own layer and of the layers below.
LAYERS: list[tuple[str, ...]] = [
    (
        "cir.lazy",
        "cir.config_loader",
        "cir.trajectory",
        "cir.distributed",
        "cir.tokenization",
        "cir.sandbox",
        "cir.kernels",
    ),
    ("cir.data", "cir.prompts", "cir.models", "cir.engines", "cir.rewards"),
    ("cir.rollout",),
    ("cir.algorithms",),
    ("cir.metrics", "cir.evaluation"),
    ("cir.training",),
    ("cir.tasks",),
    ("cir.cli", "cir.bench", "cir.__main__"),
]

# "cir.x.y:attribute": a registry's entry imported on first use.
_LAZY_REFERENCE = re.compile(r"^(cir(?:\.\w+)+):\w+$")


def _modules() -> dict[str, Path]:
    root = Path(cir.__file__).parent
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module `name` is or lives in (the longest known prefix)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "cir")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.split(".")[0] != "cir":
                continue
            for alias in node.names:
                # `from cir.x import y` imports the module cir.x.y when there is one.
                found.add(f"{name}.{alias.name}" if f"{name}.{alias.name}" in MODULES else name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _LAZY_REFERENCE.match(node.value)
            if match:
                found.add(match.group(1))
    resolved = {_resolve(name) for name in found}
    return {m for m in resolved if m is not None and m != module}


GRAPH = {module: _imports(module) for module in MODULES}


def _layer(module: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer: add its package to LAYERS and to the README")
    return best[0]


def test_every_module_is_in_a_layer_and_imports_none_above_it():
    wrong = []
    for module, imported in GRAPH.items():
        if module == "cir":
            continue
        for other in imported:
            if other != "cir" and _layer(other) > _layer(module):
                wrong.append(f"{module} (layer {_layer(module)}) imports {other} (layer {_layer(other)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_graph_is_read_in_full():
    # The readers above see what matters: lazy imports, TYPE_CHECKING imports, registry strings.
    assert "cir.engines.hf" in GRAPH["cir.engines.factory"]  # inside a function
    assert "cir.trajectory" in GRAPH["cir.rewards.registry"]  # under TYPE_CHECKING
    assert "cir.algorithms.estimators" in GRAPH["cir.algorithms.registry"]  # "module:attribute"
    assert "cir.kernels" in MODULES and "cir.tasks.demo" in MODULES


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative: the graph's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def test_no_import_cycle():
    cycles = [sorted(c) for c in _strongly_connected(GRAPH) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert sorted(map(sorted, (c for c in _strongly_connected(graph) if len(c) > 1))) == [["a", "b", "c"]]


def test_nothing_below_the_commands_imports_the_tasks():
    # Tasks register into the layers below; only the commands (and the benchmarks) import them.
    importers = sorted(m for m, imported in GRAPH.items() if any(i.startswith("cir.tasks") for i in imported))
    assert all(m.startswith(("cir.tasks", "cir.cli", "cir.bench")) for m in importers), importers
