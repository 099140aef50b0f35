"""The layers of deltatune/, read from the imports (module-level, lazy and TYPE_CHECKING imports alike):
every module belongs to a layer, imports only go down (or stay in their layer), and no modules import
each other in a circle. The table is the README's "how the layers stack"; a new module must be placed in it."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "deltatune"

# Bottom to top. A module belongs to the layer of the longest prefix that names it.
LAYERS = [
    ("base", ["errors", "names", "settings", "tensors", "lengths", "metrics", "storage", "machine"]),
    ("core", ["sites", "mechanisms", "deltas", "combine", "registry", "store", "updates"]),
    ("methods", ["methods", "compose"]),
    ("formats", ["formats"]),
    ("api", ["deltatune", "interop"]),  # the package root (the public API) and what builds on it alone
    ("models", ["models", "sandbox", "quantize"]),
    ("tasks", ["tasks"]),
    ("measuring", ["analysis.features", "analysis.similarity", "analysis.labels", "analysis.probing",
                   "analysis.report"]),
    ("engine", ["training"]),
    ("tools", ["analysis", "report", "serve", "sweep"]),
    ("cli", ["cli", "__main__"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def layer_of(module: str) -> int | None:
    short = module[len("deltatune."):] if module != "deltatune" else "deltatune"
    best, found = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (short == prefix or short.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    return found


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rsplit(".", 1)[0] if "." in name else ""
            if name and name != module:
                found.add(name)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if layer_of(m) is None)
    assert not missing, f"place these modules in tests/test_layers.py LAYERS (and the README's table): {missing}"


def test_imports_only_go_down():
    upward = []
    for module, targets in GRAPH.items():
        for target in targets:
            if target == "deltatune" and layer_of(module) is not None and layer_of(module) < layer_of("deltatune"):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports the package root (api)")
            elif target != "deltatune" and layer_of(target) is not None and layer_of(module) is not None \
                    and layer_of(target) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports going up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v] - {"deltatune"}:  # the root re-exports; `import deltatune as dt` is checked above
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not circles, f"import circles: {circles}"
