"""The compiled pipeline on a production cluster (issue 18): data placement, caching, GPUs, ablations, lineage."""

from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl

from pipeline import ClusterSettings, build_pipeline
from pipeline.pipeline import DEFAULT_SCRATCH

DATASET_PRODUCERS = {("raw-data", "raw"), ("preprocess-data", "processed")}
DATA_STEPS = ("raw-data", "validate-data", "preprocess-data", "train-model", "evaluate-model")


def _compile(tmp_path: Path, cluster: ClusterSettings = ClusterSettings(), params: str = "") -> tuple[dict, dict]:
    path = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(build_pipeline(cluster, params=params), str(path))
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
        assert container["resources"]["accelerator"] == {"resourceType": "nvidia.com/gpu", "resourceCount": "1"}
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
    assert inputs["params"]["defaultValue"] == text


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
