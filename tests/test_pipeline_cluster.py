"""The compiled pipeline on a production cluster (issue 18): data placement, caching, GPUs, ablations, lineage."""

from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl

from pipeline import ClusterSettings, build_pipeline
from pipeline.pipeline import DEFAULT_SCRATCH
from tests.conftest import sqlite_uri, tiny_params

DATASET_PRODUCERS = {("raw-data", "raw"), ("preprocess-data", "processed")}
DATA_STEPS = ("raw-data", "validate-data", "preprocess-data", "train-model", "evaluate-model")


def _compile(tmp_path: Path, cluster: ClusterSettings | None = None, params: str = "") -> tuple[dict, dict]:
    path = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(build_pipeline(cluster or ClusterSettings(), params=params), str(path))
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _tasks(spec: dict) -> dict:
    """Every task of the root DAG and of the ablation loop, by name."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def _dataset_consumers(spec: dict) -> dict[str, set]:
    """Task -> the (producer, output) datasets it takes as input artifacts (through the loop's channels too)."""
    consumers = {}
    for name, task in _tasks(spec).items():
        if "parameterIterator" in task:  # the loop hands the artifacts to its body's tasks, counted there
            continue
        for artifact in task.get("inputs", {}).get("artifacts", {}).values():
            source = artifact.get("taskOutputArtifact")
            if source is None:  # a loop body reads the outer artifact through its component input
                channel = artifact.get("componentInputArtifact", "")
                producer, _, output = channel.removeprefix("pipelinechannel--").rpartition("-")
                source = {"producerTask": producer, "outputArtifactKey": output}
            consumers.setdefault(name, set()).add((source["producerTask"], source["outputArtifactKey"]))
    return consumers


def test_with_a_workspace_claim_datasets_stay_on_it_and_travel_as_references(tmp_path):
    spec, platform = _compile(tmp_path, ClusterSettings(workspace_pvc="unet3plus-data"))
    tasks = _tasks(spec)
    # The steps that write a dataset write it on the claim (their artifact is then location.json).
    for name in ("raw-data", "preprocess-data", "train-model", "train-model-2"):
        assert tasks[name]["inputs"]["parameters"]["workspace"]["runtimeValue"]["constant"] == "/mnt/workspace", name
    consumers = {name: datasets & DATASET_PRODUCERS for name, datasets in _dataset_consumers(spec).items()}
    readers = {name for name, datasets in consumers.items() if datasets}
    assert readers == {"validate-data", "preprocess-data", "train-model", "train-model-2", "evaluate-model",
                       "evaluate-model-2"}
    for name in readers | {"raw-data"}:
        executor = platform[tasks[name]["componentRef"]["name"].replace("comp-", "exec-")]
        # ... and every one of them reads it on the claim: no scratch volume, nothing downloaded to it.
        assert [(m["mountPath"], m["pvcNameParameter"]["runtimeValue"]["constant"]) for m in executor["pvcMount"]] \
            == [("/mnt/workspace", "unet3plus-data")], name
        assert "genericEphemeralVolume" not in executor, name


def test_without_a_claim_every_step_that_downloads_a_dataset_gets_scratch_sized_for_it(tmp_path):
    spec, platform = _compile(tmp_path, ClusterSettings(scratch={**DEFAULT_SCRATCH, "preprocess": "200Gi"}))
    tasks = _tasks(spec)
    sizes = {"raw-data": "64Gi", "validate-data": "64Gi", "preprocess-data": "200Gi", "train-model": "64Gi",
             "evaluate-model": "128Gi"}
    for name, size in sizes.items():
        (volume,) = platform[f"exec-{name}"]["genericEphemeralVolume"]
        assert (volume["mountPath"], volume["size"], volume["accessModes"]) == ("/minio", size, ["ReadWriteOnce"])
        assert tasks[name]["inputs"]["parameters"].get("workspace", {"runtimeValue": {"constant": ""}}) == {
            "runtimeValue": {"constant": ""}}, name
    for name in ("exec-register-model", "exec-report-ablations"):
        assert "genericEphemeralVolume" not in platform[name]


def test_the_data_steps_are_cached_on_the_data_settings_and_nothing_that_writes_outside_is(tmp_path):
    spec, _ = _compile(tmp_path)
    tasks = _tasks(spec)
    cached = {name for name, task in tasks.items() if task.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"data-params", "ablation-names", "raw-data", "validate-data", "preprocess-data"}
    # Their cache key is the data section (the output of data-params), the dataset and source_dir: a changed
    # training knob leaves it alone, and raw-data's own hit returns the same artifact for validate/preprocess.
    for name in ("raw-data", "validate-data", "preprocess-data"):
        assert tasks[name]["inputs"]["parameters"]["params"]["taskOutputParameter"] == {
            "producerTask": "data-params", "outputParameterKey": "Output"}, name
    assert tasks["data-params"]["inputs"]["parameters"]["params"] == {"componentInputParameter": "params"}
    for name in ("train-model", "train-model-2", "register-model", "report-ablations"):
        assert not tasks[name].get("cachingOptions", {}).get("enableCache"), name


def test_evaluation_runs_on_gpu_nodes_like_training_and_refuses_the_cpu(tmp_path):
    spec, platform = _compile(tmp_path)
    executors = spec["deploymentSpec"]["executors"]
    for name in ("exec-evaluate-model", "exec-evaluate-model-2"):
        container = executors[name]["container"]
        accelerator = container["resources"]["accelerator"]
        assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", "1")
        assert {"name": "UNET3PLUS_REQUIRE_CUDA", "value": "1"} in container["env"]
        for setting in ("nodeSelector", "tolerations"):
            assert platform[name][setting] == platform["exec-train-model"][setting], (name, setting)
    spec, platform = _compile(tmp_path, ClusterSettings(evaluate_gpus=0))
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-evaluate-model"]["container"]["resources"]
    assert "nodeSelector" not in platform["exec-evaluate-model"]


def test_max_parallel_ablations_sets_the_parallel_for_parallelism(tmp_path):
    spec, _ = _compile(tmp_path, ClusterSettings(max_parallel_ablations=2))
    (loop,) = [task for task in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in task]
    assert loop["iteratorPolicy"] == {"parallelismLimit": 2}
    spec, _ = _compile(tmp_path)
    (loop,) = [task for task in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in task]
    assert "iteratorPolicy" not in loop


def test_every_input_has_a_default_and_params_defaults_to_the_given_text(tmp_path):
    text = "train:\n  epochs: 3\n"
    spec, _ = _compile(tmp_path, params=text)
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert set(inputs) == {"params", "dataset", "source_dir", "pipeline_version"}
    assert all("defaultValue" in parameter for parameter in inputs.values()), inputs
    # The same parameters, on one line: a multi-line default would break the compiled file's comment header.
    assert yaml.safe_load(inputs["params"]["defaultValue"]) == {"train": {"epochs": 3}}
    assert "\n" not in inputs["params"]["defaultValue"]


def test_tracking_steps_name_the_kfp_run_and_evaluate_publishes_a_page_and_the_cgm_roc(tmp_path):
    spec, _ = _compile(tmp_path)
    tasks = _tasks(spec)
    for name in ("train-model", "train-model-2", "evaluate-model", "evaluate-model-2", "register-model",
                 "report-ablations"):
        parameters = tasks[name]["inputs"]["parameters"]
        assert parameters["kfp_run_id"]["runtimeValue"]["constant"] == dsl.PIPELINE_JOB_ID_PLACEHOLDER, name
        assert parameters["kfp_run_name"]["runtimeValue"]["constant"] == dsl.PIPELINE_JOB_NAME_PLACEHOLDER, name
        version = parameters["pipeline_version"]
        assert version.get("componentInputParameter", "").endswith("pipeline_version"), name
    outputs = spec["components"]["comp-evaluate-model"]["outputDefinitions"]["artifacts"]
    assert outputs["page"]["artifactType"]["schemaTitle"] == "system.HTML"
    assert outputs["cgm"]["artifactType"]["schemaTitle"] == "system.ClassificationMetrics"


def test_a_trainjob_needs_the_workspace_claim():
    from unet3plus.trainjob import SettingError

    with pytest.raises(SettingError, match="--nodes needs --workspace-pvc"):
        ClusterSettings(nodes=2).trainjob()


def _tiny_params(**ablations) -> dict:
    return tiny_params(train={"epochs": 2}, evaluate={"overlays": 1}, ablations=ablations)


def test_a_retried_train_step_resumes_from_the_claims_checkpoint_into_the_same_mlflow_run(
        tiny_dataset, tmp_path, monkeypatch):
    """The first attempt dies after epoch 1 (an injected fault); the retry trains epoch 2 only, into the same run."""
    import mlflow

    import unet3plus.train
    from components.train import train_model

    uri = sqlite_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    for variable in ("KFP_RUN_ID", "KFP_RUN_NAME", "KFP_PIPELINE_VERSION"):
        monkeypatch.delenv(variable, raising=False)
    params = yaml.safe_dump(_tiny_params(run=[]))
    claim = tmp_path / "claim"

    def attempt(number: int) -> tuple[float, dsl.Model]:
        model = dsl.Model(uri=str(tmp_path / f"attempt{number}" / "model"))
        dice = train_model.python_func(
            processed=dsl.Dataset(uri=str(tiny_dataset.processed)), model=model,
            metrics=dsl.Metrics(uri=str(tmp_path / f"attempt{number}" / "metrics")), params=params,
            workspace=str(claim), kfp_run_id="run-1", kfp_run_name="unet3plus run", pipeline_version="abc-123")
        return dice, model

    real_check = unet3plus.train._check_finite_weights

    def node_lost_in_epoch_2(model, epoch):
        if epoch == 2:
            raise RuntimeError("node lost")
        real_check(model, epoch)

    monkeypatch.setattr(unet3plus.train, "_check_finite_weights", node_lost_in_epoch_2)
    with pytest.raises(RuntimeError, match="node lost"):
        attempt(1)
    checkpoints = claim / "unet3plus" / "checkpoints" / "run-1" / "main"
    assert (checkpoints / "last.pt").is_file()  # epoch 1 reached the claim as it was written
    monkeypatch.setattr(unet3plus.train, "_check_finite_weights", real_check)
    dice, model = attempt(2)

    summary = yaml.safe_load((Path(model.path) / "train_summary.json").read_text())
    assert summary["epochs"] == 2 and dice == summary["best_val_dice"]
    assert (Path(model.path) / "best.pt").is_file() and model.metadata["mlflow_run_id"] == summary["mlflow_run_id"]
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(yaml.safe_load(params)["mlflow"]["experiment"])
    (run,) = [r for r in client.search_runs([experiment.experiment_id]) if "val_dice" in r.data.metrics]
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_dice")] == [1, 2]  # one run, both epochs
    assert (run.data.tags["kfp_run_id"], run.data.tags["kfp_pipeline_version"]) == ("run-1", "abc-123")



@pytest.mark.slow
def test_kfp_local_on_a_workspace_claim_with_a_failing_ablation(tmp_path, monkeypatch):
    """Data on the claim (references as artifacts), a broken variant recorded while the rest goes on, lineage."""
    import json
    import os

    import mlflow
    from kfp import local

    root_dir = str(Path(__file__).resolve().parents[1])
    params = _tiny_params(run=["unet", "broken"])
    params["ablations"]["variants"]["broken"] = {"model.encoder": "vgg16",
                                                 "model.encoder_weights": str(tmp_path / "absent.pth")}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root_dir, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(local.config.LocalExecutionConfig, "instance", None)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    claim = tmp_path / "claim"  # kfp.local mounts nothing: the "claim" is a folder the steps see at that path
    pipeline = build_pipeline(ClusterSettings(workspace_pvc="unet3plus-data", workspace_mount=str(claim)))

    run = pipeline(params=yaml.safe_dump(params), dataset="liver", pipeline_version="v-test")

    assert run.outputs["model_version"] == "1"  # the main model registered although an ablation failed
    root = tmp_path / "root"
    # The datasets stayed on the claim; their artifacts are references of a few bytes.
    for step, kind in (("raw-data", "raw"), ("preprocess-data", "processed")):
        (artifact,) = root.glob(f"*/{step}/{kind}")
        assert [p.name for p in artifact.iterdir()] == ["location.json"]
        assert Path(json.loads((artifact / "location.json").read_text())["path"]).parent == claim / "unet3plus" / kind
    assert len(list((claim / "unet3plus" / "processed").glob("*/samples/*/*.npz"))) > 0
    (run_id,) = [p.name for p in (claim / "unet3plus" / "checkpoints").iterdir()]
    assert {p.name for p in (claim / "unet3plus" / "checkpoints" / run_id).iterdir()} >= {"main", "unet"}
    # The broken variant: a failure marker through its branch, a FAILED run with the error, a FAILED row.
    markers = [json.loads(p.read_text())["error"] for p in root.glob("**/FAILED.json")]
    assert len(markers) == 2 and all("absent.pth" in error for error in markers)  # its model and its evaluation
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(params["mlflow"]["experiment"])
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("ablation")]
    by_name = {r.data.tags["ablation"]: r for r in runs}
    assert by_name["broken"].info.status == "FAILED" and "absent.pth" in by_name["broken"].data.tags["error"]
    assert by_name["unet"].info.status == "FINISHED" and "test_dice" in by_name["unet"].data.metrics
    # Lineage: every run names this Kubeflow run and the pipeline version; the version too.
    assert {(r.data.tags["kfp_run_id"], r.data.tags["kfp_pipeline_version"]) for r in runs} == {(run_id, "v-test")}
    version = client.get_model_version(run.outputs["model_name"], "1")
    assert version.tags["kfp_run_id"] == run_id
    page = next(root.glob("*/evaluate-model/page")).read_text()
    assert "learning curves" in page and "best case" in page and "MLflow run" in page
    report = next(root.glob("*/report-ablations/report")).read_text()
    assert "broken" in report and "FAILED" in report, report
