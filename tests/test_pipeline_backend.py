"""The compiled pipeline is readable by the minimum Kubeflow Pipelines backend (its release's protobuf messages).

pipeline.backend installs that release's messages and runs pipeline/proto_check.py to parse the compiled YAML.
"""

from pathlib import Path

import pytest
from kfp import compiler, dsl, kubernetes

from pipeline import ClusterSettings, build_pipeline
from pipeline.backend import MINIMUM_KFP, default_proto_dir, install_protos, unreadable_fields

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def proto_dir():
    """The pinned kfp-pipeline-spec / kfp-kubernetes of the minimum release, installed once per environment."""
    return install_protos(default_proto_dir())


def _compiled(pipeline, tmp_path: Path) -> Path:
    path = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(pipeline, str(path))
    return path


@pytest.mark.parametrize("cluster", [
    ClusterSettings(),
    # Every optional cluster setting on: data volume, pull secrets, labels, several GPUs, TrainJob.
    ClusterSettings(data_pvc="lits-raw", image_pull_secrets=("regcred",), pod_labels=(("team", "imaging"),),
                    gpus=4, retries=0),
    ClusterSettings(nodes=2, gpus_per_node=4, workspace_pvc="shared-rwx"),
], ids=["defaults", "all-settings", "trainjob"])
def test_the_minimum_backend_reads_every_field_of_the_compiled_pipeline(proto_dir, tmp_path, cluster):
    assert unreadable_fields(_compiled(build_pipeline(cluster), tmp_path), proto_dir) == []


def test_a_field_newer_than_the_minimum_backend_is_caught(proto_dir, tmp_path):
    """kfp-kubernetes >= 2.15 writes `optional` on every secretAsEnv, which a 2.14 driver refuses (#12495)."""

    @dsl.component(base_image="python:3.11")
    def hello() -> None:
        pass

    @dsl.pipeline(name="probe")
    def probe():
        kubernetes.use_secret_as_env(hello(), "mlflow-credentials", {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"})

    problems = unreadable_fields(_compiled(probe, tmp_path), proto_dir)
    assert len(problems) == 1 and "exec-hello" in problems[0] and '"optional"' in problems[0], problems


def test_the_readme_names_the_minimum_backend():
    assert f"Kubeflow Pipelines {MINIMUM_KFP}" in (ROOT / "README.md").read_text()
