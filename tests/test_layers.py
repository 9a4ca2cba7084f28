"""The import layers of the code: a module imports only from its own layer or below, and no imports run in a circle.

Every import statement counts, also those inside functions (components import the library there).
A new module must be given a layer here.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("unet3plus", "components", "pipeline")

LAYERS = [
    ("foundation", ["unet3plus.errors"]),
    ("helpers", ["unet3plus.utils", "unet3plus.config", "unet3plus.device", "unet3plus.trainjob"]),
    ("data and models", ["unet3plus.data", "unet3plus.models", "unet3plus.losses", "unet3plus.metrics", "unet3plus"]),
    ("state", ["unet3plus.checkpoint", "unet3plus.tracking", "unet3plus.tracking_server"]),
    ("steps", ["unet3plus.train", "unet3plus.predict", "unet3plus.serving", "unet3plus.evaluate", "unet3plus.register",
               "unet3plus.model_page", "unet3plus.report"]),
    ("command line", ["unet3plus.cli", "unet3plus.__main__"]),
    ("Kubeflow components", ["components"]),
    ("Kubeflow pipeline", ["pipeline"]),
]
"""Lowest first. A name stands for the module and everything below it, unless a longer name says otherwise."""


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules of the project it imports}`` for every module of :data:`PACKAGES` under ``root``."""
    paths = {_module_name(path, root): path for package in PACKAGES for path in (root / package).rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from a import b` imports the module a.b when there is one, else names of a
                imported |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base for alias in node.names}
        graph[module] = {name for name in imported if name.split(".")[0] in PACKAGES and name != module}
    return graph


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of the longest declared name that is ``module`` or a package above it."""
    best, index = "", None
    for number, (_, names) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, index = name, number
    if index is None:
        raise AssertionError(f"{module} has no layer: add it to LAYERS in {Path(__file__).name}")
    return index


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a higher layer, as readable lines."""
    return [f"{module} ({LAYERS[layer_of(module)][0]}) imports {name} ({LAYERS[layer_of(name)][0]})"
            for module, names in sorted(graph.items()) for name in sorted(names)
            if layer_of(name) > layer_of(module)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles (Tarjan's strongly connected components of more than one module, or a self-import)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for name in graph.get(module, ()):
            if name not in index:
                visit(name)
                low[module] = min(low[module], low[name])
            elif name in on_stack:
                low[module] = min(low[module], index[name])
        if low[module] == index[module]:
            component = []
            while True:
                name = stack.pop()
                on_stack.discard(name)
                component.append(name)
                if name == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT)


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_no_module_imports_from_a_layer_above_it(graph):
    assert upward_imports(graph) == []


def test_no_imports_run_in_a_circle(graph):
    assert cycles(graph) == []


def test_the_kubernetes_code_is_below_the_components_that_use_it(graph):
    assert "unet3plus.trainjob" in graph["components.launch"]
    assert not any(name.startswith("pipeline") for module in graph if not module.startswith("pipeline")
                   for name in graph[module])


def test_the_checks_catch_an_upward_import_and_a_circle(tmp_path):
    """The same checks on a small made-up tree: the library importing a component, and two modules in a circle."""
    for name, text in {
        "unet3plus/__init__.py": "",
        "unet3plus/errors.py": "",
        "unet3plus/utils.py": "def f():\n    from components.train import train_model\n",
        "unet3plus/train.py": "from unet3plus import evaluate\n",
        "unet3plus/evaluate.py": "from .train import x\n",
        "components/__init__.py": "",
        "components/train.py": "from unet3plus.errors import UserError\n",
        "pipeline/__init__.py": "",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert upward_imports(graph) == ["unet3plus.utils (helpers) imports components.train (Kubeflow components)"]
    assert cycles(graph) == [["unet3plus.evaluate", "unet3plus.train"]]
