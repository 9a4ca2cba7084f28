"""deploy/serving/: the InferenceServices are valid KServe v0.20.0 resources that serve the exported volume model."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from components.common import DEFAULT_IMAGE

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "tests" / "schemas" / "serving.kserve.io_inferenceservices.yaml"
SERVICES = {variant: ROOT / "deploy" / "serving" / f"inferenceservice-{variant}.yaml" for variant in ("cpu", "gpu")}


@pytest.fixture(scope="module")
def validator(crd_validator):
    return crd_validator(CRD, "v1beta1")


def load(variant: str) -> dict:
    return yaml.safe_load(SERVICES[variant].read_text())


def predictor_container(service: dict) -> dict:
    (container,) = service["spec"]["predictor"]["containers"]
    return container


@pytest.mark.parametrize("variant", list(SERVICES))
def test_inference_services_are_valid_against_the_kserve_crd(validator, variant):
    service = load(variant)
    validator.validate(service)
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")


@pytest.mark.parametrize("variant", list(SERVICES))
def test_the_predictor_serves_the_exported_model_with_probes_and_resources(variant):
    container = predictor_container(load(variant))
    assert container["name"] == "kserve-container" and container["image"] == DEFAULT_IMAGE
    # The same command as the README's local recipe, on the folder KServe's storage initialiser fills.
    assert container["command"][:7] == ["mlflow", "models", "serve", "-m", "/mnt/models", "--env-manager", "local"]
    port = container["ports"][0]["containerPort"]
    assert container["command"][container["command"].index("-p") + 1] == str(port)
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["STORAGE_URI"].startswith("pvc://unet3plus-models/")
    assert env["MLFLOW_DEFAULT_PREDICTION_DEVICE"] == variant.replace("gpu", "cuda")
    assert container["readinessProbe"]["httpGet"] == {"path": "/ping", "port": port}
    assert container["livenessProbe"]["httpGet"]["port"] == port
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
        assert ("nvidia.com/gpu" in container["resources"][kind]) == (variant == "gpu")


def test_the_gpu_variant_is_scheduled_on_gpu_nodes():
    predictor = load("gpu")["spec"]["predictor"]
    assert predictor["tolerations"][0]["key"] == "nvidia.com/gpu" and predictor["nodeSelector"]
    assert "nodeSelector" not in load("cpu")["spec"]["predictor"]


def test_the_models_volume_is_the_one_the_services_read():
    claim = yaml.safe_load((ROOT / "deploy" / "serving" / "models-pvc.yaml").read_text())
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    for variant in SERVICES:
        env = {item["name"]: item["value"] for item in predictor_container(load(variant))["env"]}
        assert env["STORAGE_URI"].removeprefix("pvc://").split("/")[0] == claim["metadata"]["name"]


@pytest.mark.parametrize(("where", "key", "value"), [
    (("spec", "predictor"), "replicas", 2),                                     # unknown field
    (("spec", "predictor", "containers", 0), "readinesProbe", {}),              # misspelled
    (("spec", "predictor"), "minReplicas", "one"),                              # wrong type
    (("spec", "predictor", "containers", 0, "resources"), "requests", "4 cpus"),  # wrong type
])  # fmt: skip
def test_the_strict_schema_refuses_unknown_misspelled_and_mistyped_fields(validator, where, key, value):
    service = copy.deepcopy(load("cpu"))
    node = service
    for step in where:
        node = node[step]
    node[key] = value
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(service)
