"""deploy/mlflow: the tracking server's Kubernetes manifests, checked offline.

Every YAML document parses and validates against the Kubernetes OpenAPI schemas shipped by
``kubernetes-validate`` (strict: unknown fields fail); the workloads have pinned images, probes
and resource requests, read every credential from a Secret, and no secret value is committed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).parents[1] / "deploy" / "mlflow"
KUBERNETES_VERSION = "1.30.0"
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|_URI$|ACCESS_KEY")
PLACEHOLDER = re.compile(r"^$|CHANGE_ME|^https?://[\w.-]+(:\d+)?$")


def kustomizations() -> list[Path]:
    return sorted(DEPLOY.rglob("kustomization.yaml"))


def documents() -> list[dict]:
    """Every object of every resource file listed by a kustomization, with the kustomization's namespace."""
    objects = []
    for kustomization_file in kustomizations():
        kustomization = yaml.safe_load(kustomization_file.read_text())
        for resource in kustomization.get("resources", []):
            for document in yaml.safe_load_all((kustomization_file.parent / resource).read_text()):
                if kustomization.get("namespace") and document["kind"] != "Namespace":
                    document["metadata"]["namespace"] = kustomization["namespace"]
                objects.append(document)
    return objects


def containers(document: dict) -> list[dict]:
    spec = document.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def test_every_document_parses_and_validates_against_the_kubernetes_schema():
    objects = documents()
    kinds = sorted(document["kind"] for document in objects)
    assert kinds == ["Deployment", "Namespace", "PersistentVolumeClaim", "Service", "Service", "StatefulSet"]
    for document in objects:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_can_fail():
    deployment = next(d for d in documents() if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_every_image_is_pinned_to_an_exact_version():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    overrides = {image["name"]: f"{image['newName']}:{image['newTag']}" for image in kustomization.get("images", [])}
    images = [c["image"] for d in documents() for c in containers(d)]
    assert len(images) == 2
    for image in images:
        final = overrides.get(image.split(":")[0], image)
        assert re.search(r":v?\d+\.\d+(\.\d+)?[\w.-]*(@sha256:[0-9a-f]{64})?$", final), final
    dockerfile = (DEPLOY / "image" / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+:\d+\.\d+\.\d+\S*$", dockerfile, re.M)
    installed = re.search(r"pip install --no-cache-dir ([^&]+)", dockerfile).group(1).replace("\\", " ").split()
    assert installed and all(re.fullmatch(r"[\w.-]+==\d+(\.\d+)+", requirement) for requirement in installed), installed
    names = {requirement.split("==")[0] for requirement in installed}
    assert names == {"mlflow", "psycopg2-binary", "Flask-WTF", "boto3"}


def test_the_server_runs_basic_auth_on_postgres_with_the_artifact_proxy_probes_and_requests():
    objects = {(d["kind"], d["metadata"]["name"]): d for d in documents()}
    server = containers(objects["Deployment", "mlflow"])[0]
    script = " ".join(server["args"])
    for flag in ("--app-name basic-auth", "--serve-artifacts", '--artifacts-destination "$ARTIFACTS_DESTINATION"'):
        assert flag in script
    for workload in (objects["Deployment", "mlflow"], objects["StatefulSet", "postgres"]):
        for container in containers(workload):
            assert container["readinessProbe"] and container["livenessProbe"]
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    from_secret = {e["name"] for e in server["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD"} <= from_secret
    claim = objects["Deployment", "mlflow"]["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]
    assert ("PersistentVolumeClaim", claim["claimName"]) in objects


def test_every_credential_comes_from_a_secret_and_no_secret_value_is_committed():
    for document in documents():
        assert document["kind"] != "Secret"  # Secrets are generated from gitignored env files only
        for container in containers(document):
            for variable in container.get("env", []):
                if SECRET_NAME.search(variable["name"]):
                    assert "secretKeyRef" in variable.get("valueFrom", {}), variable["name"]
    generated = [(path, generator) for path in kustomizations()
                 for generator in yaml.safe_load(path.read_text()).get("secretGenerator", [])]  # fmt: skip
    assert {generator["name"] for _, generator in generated} == {"mlflow-server", "mlflow-credentials"}
    for path, generator in generated:
        assert "literals" not in generator
        for env_file in generator["envs"]:
            real, template = path.parent / env_file, path.parent / f"{env_file}.example"
            ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", str(real)], cwd=DEPLOY)
            assert ignored.returncode == 0, f"{real} is not gitignored"
            for line in template.read_text().splitlines():
                if line and not line.startswith("#"):
                    name, value = line.split("=", 1)
                    value = re.sub(r"//[\w.-]+:CHANGE_ME@", "//user:CHANGE_ME@", value)
                    assert not SECRET_NAME.search(name) or PLACEHOLDER.search(value), line
    credentials = (DEPLOY / "pipeline-credentials" / "credentials.env.example").read_text()
    assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(
        re.findall(r"^(\w+)=", credentials, re.M)
    )
