"""The layout's promise: imports only go down the layers, and no files import each other in a loop.

Layers, top to bottom: drivers and CLI (``pipelines``) → GRPO orchestration
(``pipelines.grpo``) → ``cluster`` → ``actors`` → ``config`` → ``models`` and ``rewards`` →
``data``. Every import counts, including those inside functions.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "cluster", "actors", "config", "models", "rewards", "data")
LAYERS = {"pipelines": 6, "pipelines.grpo": 5, "cluster": 4, "actors": 3, "config": 2, "models": 1, "rewards": 1,
          "data": 0}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (relative imports resolved)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}".strip(".")
                names = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            targets.update(t for t in (_resolve(n, modules) for n in names) if t and t != module)
        graph[module] = targets
    return graph


def layer(module: str) -> int:
    return max(rank for prefix, rank in LAYERS.items() if module == prefix or module.startswith(prefix + "."))


def test_imports_only_go_down():
    upward = [f"{m} -> {t}" for m, targets in import_graph().items() for t in targets
              if layer(t) > layer(m) or (layer(t) == layer(m) and t.split(".")[0] != m.split(".")[0]
                                         and m.split(".")[0] == "rewards")]
    assert not upward, "imports that go up a layer (or rewards -> models):\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    graph, state, cycles = import_graph(), {}, []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layer_map_names_every_package():
    assert all(layer(m) >= 0 for m in import_graph())
