"""The oldest Kubeflow Pipelines backend the compiled pipeline runs on, and the check that it can read the YAML.

The backend's driver parses the pipeline spec and every executor's Kubernetes settings with the
protobuf messages it was built with, refusing unknown fields: a field written by a newer
``kfp``/``kfp-kubernetes`` than the backend aborts the step before its pod starts
(kubeflow/pipelines#11935, #12495). :func:`unreadable_fields` parses a compiled pipeline with the
messages of :data:`MINIMUM_KFP`'s release, installed apart from the project's environment by
:func:`install_protos`, so that such a field fails the tests instead of a run on the cluster.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

logger = logging.getLogger("pipeline")

MINIMUM_KFP = "2.14.0"
"""The oldest Kubeflow Pipelines backend (API server, driver, launcher) that runs the compiled pipeline.

2.14 is the first release that reads the run workspace (``PipelineConfig.workspace``), runs the
report after a ParallelFor whose tasks consume outer artifacts (kubeflow/pipelines#10050, #11520)
and names its proto packages after itself.
"""

PROTO_PACKAGES = (
    f"kfp-pipeline-spec=={MINIMUM_KFP}",
    f"kfp-kubernetes=={MINIMUM_KFP}",
    "protobuf==6.31.1",  # what kfp-pipeline-spec 2.14.0 requires
    "googleapis-common-protos==1.70.0",  # google/rpc/status.proto, imported by the pipeline spec
)
"""The protobuf definitions of :data:`MINIMUM_KFP`'s release (and their runtime), pinned."""

CHECKER = Path(__file__).with_name("proto_check.py")


def default_proto_dir() -> Path:
    """Where :func:`install_protos` puts the packages: ``$UNET3PLUS_KFP_PROTOS``, else beside the environment."""
    return Path(os.environ.get("UNET3PLUS_KFP_PROTOS") or Path(sys.prefix) / f"kfp-protos-{MINIMUM_KFP}")


def install_protos(target: Path) -> Path:
    """Install :data:`PROTO_PACKAGES` into ``target`` (pip ``--target``, from the package index), once.

    The folder appears whole or not at all (installed beside it, then renamed).

    Returns:
        ``target``.
    """
    if (target / "kfp" / "kubernetes" / "kubernetes_executor_config_pb2.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        logger.info("installing the protobuf definitions of KFP %s into %s", MINIMUM_KFP, target)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--no-compile", "--target", str(staging), *PROTO_PACKAGES], check=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def unreadable_fields(compiled: Path, proto_dir: Path) -> list[str]:
    """What the :data:`MINIMUM_KFP` backend cannot read in the compiled pipeline YAML ``compiled``.

    Args:
        compiled: IR YAML written by ``python -m pipeline compile`` (pipeline spec, then platform spec).
        proto_dir: the folder :func:`install_protos` filled.

    Returns:
        One line per document or executor the minimum backend refuses (empty: it reads everything).
    """
    documents = list(yaml.safe_load_all(Path(compiled).read_text()))
    result = subprocess.run([sys.executable, "-I", "-S", str(CHECKER), str(proto_dir)], input=json.dumps(documents),
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)
