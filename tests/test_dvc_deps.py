"""Nothing goes stale (issue 16.5): DVC stage deps and the preprocess fingerprint cover every module used.

The modules a stage needs are derived from the source, not listed by hand: the stage's command
names ``unet3plus <verb>``; the console script (pyproject ``[project.scripts]``) names the CLI
module; the verb's function there, the CLI functions it calls and the CLI's top-level imports give
the first modules; from there every ``import`` of every project module counts, including lazy
imports inside functions, and importing ``a.b.c`` also runs ``a/__init__.py`` and ``a/b/__init__.py``.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest
import yaml

from unet3plus.cli import build_parser
from unet3plus.data import preprocess

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "unet3plus"
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
TRACKING_ONLY = ("train", "evaluate", "ablate")  # stages that build models: no tracking settings among their params


def module_file(name: str) -> Path | None:
    """The source file of project module ``name`` (a package's ``__init__.py``), None if it is not one."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every name ``tree`` imports anywhere (module level and inside functions), as absolute dotted names.

    ``from a import b`` yields ``a`` and ``a.b`` (``b`` may be a submodule); relative imports are resolved.
    """
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def closure(names: set[str], parents: bool = True, walked: frozenset[str] = frozenset()) -> set[str]:
    """The project modules ``names`` load, transitively (with their parent packages when ``parents``).

    Modules in ``walked`` count but their imports are not followed (the caller has read them).
    """
    seen: set[str] = set(walked)
    todo = [name for name in names if name.split(".")[0] == PACKAGE]
    while todo:
        parts = todo.pop().split(".")
        for name in [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if parents else [".".join(parts)]:
            path = module_file(name)
            if path is not None and name not in seen:
                seen.add(name)
                todo.extend(n for n in imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
                            if n.split(".")[0] == PACKAGE)
    return seen


def verb_modules(verb: str) -> set[str]:
    """Every project module ``unet3plus <verb>`` imports: its CLI function's calls and imports, transitively."""
    script = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][PACKAGE]
    cli_module = script.split(":")[0]
    cli_path = module_file(cli_module)
    tree = ast.parse(cli_path.read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    subcommands = next(a for a in build_parser()._actions if a.dest == "verb").choices
    todo, used = [subcommands[verb].get_default("func").__name__], set()
    while todo:  # the verb's function and the CLI functions it calls
        name = todo.pop()
        if name in used:
            continue
        used.add(name)
        calls = (n.func.id for n in ast.walk(functions[name]) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name))
        todo.extend(call for call in calls if call in functions)
    top_level = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
    start = imports(top_level, cli_module, False)
    for name in used:
        start |= imports(functions[name], cli_module, False)
    return closure(start | {cli_module}, walked=frozenset({cli_module}))


def stage_verbs(stage: dict) -> list[str]:
    """The ``unet3plus`` verbs a stage's command runs (``ablate`` runs train, then evaluate)."""
    words = " ".join(stage.get("do", stage)["cmd"].split()).split()
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == PACKAGE]


def code_deps(stage: dict) -> list[str]:
    return [dep for dep in stage.get("do", stage)["deps"] if dep.split("/")[0] == PACKAGE]


def uncovered(modules: set[str], deps: list[str]) -> list[str]:
    """Files of ``modules`` that no dep (the file itself or a folder holding it) covers."""
    files = sorted(module_file(name).relative_to(ROOT).as_posix() for name in modules)
    return [f for f in files if not any(f == dep.rstrip("/") or f.startswith(dep.rstrip("/") + "/") for dep in deps)]


@pytest.mark.parametrize("stage", sorted(DVC_YAML))
def test_stage_deps_cover_every_module_its_command_imports(stage):
    verbs = stage_verbs(DVC_YAML[stage])
    assert verbs, f"dvc.yaml stage {stage}: no `unet3plus <verb>` in its command"
    needed = set().union(*(verb_modules(verb) for verb in verbs))
    missing = uncovered(needed, code_deps(DVC_YAML[stage]))
    assert not missing, f"dvc.yaml stage {stage} ({', '.join(verbs)}) lacks deps on {missing}"
    for dep in code_deps(DVC_YAML[stage]):
        assert (ROOT / dep).exists(), f"dvc.yaml stage {stage}: dep {dep} does not exist"


def test_the_walk_sees_lazy_imports_and_a_missing_dep_is_reported():
    """The issue's examples: train loads metrics.py (inside cmd_train's lazy import of train), evaluate geometry.py."""
    train, evaluate = verb_modules("train"), verb_modules("evaluate")
    assert {"unet3plus.metrics", "unet3plus.checkpoint", "unet3plus.device", "unet3plus.config"} <= train
    assert {"unet3plus.data.geometry", "unet3plus.data.sources", "unet3plus.data.dataset"} <= evaluate
    assert "unet3plus.report" not in train  # only what the verb reaches: report is another verb's lazy import
    deps = code_deps(DVC_YAML["train"])
    assert uncovered(train, [dep for dep in deps if dep != "unet3plus/metrics.py"]) == ["unet3plus/metrics.py"]
    assert "unet3plus/models/blocks.py" in uncovered(train, [dep for dep in deps if dep != "unet3plus/models"])


def test_the_preprocess_fingerprint_covers_every_module_preprocessing_imports():
    needed = closure({preprocess.__name__}, parents=False)
    listed = {path.resolve() for path in preprocess.CODE_FILES}
    missing = sorted(module_file(name).relative_to(ROOT).as_posix() for name in needed
                     if module_file(name).resolve() not in listed)
    assert not missing, f"unet3plus.data.preprocess.CODE_FILES lacks {missing}"
    assert "unet3plus.data.validation" in needed


@pytest.mark.parametrize("stage", TRACKING_ONLY)
def test_tracking_settings_are_not_params_of_model_stages(stage):
    params = DVC_YAML[stage].get("do", DVC_YAML[stage]).get("params", [])
    assert not [p for p in params if str(p).split(".")[0] == "mlflow"], f"dvc.yaml stage {stage} depends on {params}"

