"""Every module's tests are where a newcomer looks: ``tests/test_<module>.py`` (the map below says where else).

Library modules ``unet3plus/**/<module>.py`` are tested in ``tests/test_<module>.py``; modules of the
``pipeline`` package in ``tests/test_pipeline_<module>.py``; the Kubeflow components, thin shells over
the library, together in ``tests/test_components.py``. A module whose tests live elsewhere is listed in
``ELSEWHERE`` with the reason. A new module without tests, or a test file renamed away from its module,
fails here.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("unet3plus", "components", "pipeline")

ELSEWHERE = {
    "unet3plus/__main__.py": "test_cli.py",  # `python -m unet3plus` is the CLI
    "components/launch.py": "test_trainjob.py",  # the TrainJob launcher, against a fake Kubernetes API
    "components/batch_predict.py": "test_batch_pipeline.py",  # with the batch pipeline it is the step of
    "pipeline/pipeline.py": "test_pipeline_kfp.py",  # the compiled pipeline (cluster settings: test_pipeline_cluster.py)
    "pipeline/__main__.py": "test_pipeline_kfp.py",  # `python -m pipeline compile` (submit, trainjob: their files)
    "pipeline/batch.py": "test_batch_pipeline.py",
    "pipeline/proto_check.py": "test_pipeline_backend.py",  # the script pipeline.backend runs
}


def _modules() -> list[str]:
    found = []
    for package in PACKAGES:
        found += [path.relative_to(ROOT).as_posix() for path in sorted((ROOT / package).rglob("*.py"))
                  if path.name != "__init__.py"]
    return found


def _test_file(module: str) -> str:
    if module in ELSEWHERE:
        return ELSEWHERE[module]
    package, name = module.split("/")[0], Path(module).stem
    return {"unet3plus": f"test_{name}.py", "components": "test_components.py",
            "pipeline": f"test_pipeline_{name}.py"}[package]


def _mentions(module: str) -> tuple[str, ...]:
    """How a test file names the module it tests: its dotted name, how it is run, or one of its public names."""
    dotted = module[: -len(".py")].replace("/", ".")
    if dotted.endswith(".__main__"):
        return (dotted, f'"-m", "{dotted.split(".")[0]}"')
    package, _, name = dotted.rpartition(".")
    tree = ast.parse((ROOT / module).read_text())
    public = tuple(node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                   and not node.name.startswith("_") and node.name != "main")
    return (dotted, f"from {package} import {name}", Path(module).name, *public)


def test_the_modules_are_found():
    assert {"unet3plus/data/geometry.py", "unet3plus/models/heads.py", "components/common.py",
            "pipeline/submit.py"} <= set(_modules())


@pytest.mark.parametrize("module", _modules())
def test_every_module_has_a_test_file_named_after_it_that_tests_it(module):
    path = ROOT / "tests" / _test_file(module)
    assert path.is_file(), f"{module}: its tests belong in tests/{path.name} (or list it in ELSEWHERE, saying why)"
    text = path.read_text()
    assert any(name in text for name in _mentions(module)), f"tests/{path.name} does not name {module}"
