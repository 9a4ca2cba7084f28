"""Submitting to a shared Kubeflow Pipelines: the pipeline as a version of a named pipeline, then a run of it.

``python -m pipeline submit`` compiles the pipeline, uploads it as a version of the pipeline
:data:`pipeline.pipeline.PIPELINE_NAME` (created on first use) named after the git commit and the
compiled content (:func:`version_name`), and starts a run of that version with the parameters file
as the run's input. Every run of the cluster is then traceable to the code that defined it, and the
Kubeflow UI lists the versions side by side. A version of the same content is reused, not uploaded
twice.

Multi-user Kubeflow sits behind an authenticating proxy: the client sends a bearer token
(``kfp.Client(existing_token=...)``), from ``--token`` or :data:`TOKEN_ENV`.
"""

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("pipeline")

TOKEN_ENV = "KF_PIPELINES_TOKEN"
"""Environment variable with the bearer token for the Kubeflow API (``--token`` wins)."""


def version_name(package: Path, commit: str | None) -> str:
    """``<commit, 12 hex>-<sha256 of the compiled YAML, 8 hex>``: the code, and the cluster settings compiled in.

    Two compilations of one commit with other cluster options (GPUs, volumes) are two versions;
    the same YAML submitted twice is one.
    """
    digest = hashlib.sha256(Path(package).read_bytes()).hexdigest()[:8]
    return f"{(commit or 'nogit')[:12]}-{digest}"


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def submit_version_and_run(
    client: Any, package: Path, *, pipeline_name: str, version: str, experiment: str, run_name: str,
    arguments: dict[str, Any], namespace: str | None = None,
) -> dict[str, str]:
    """Upload ``package`` as version ``version`` of ``pipeline_name`` (unless it exists) and start a run of it.

    Args:
        client: a ``kfp.Client``.
        package: the compiled pipeline YAML.
        pipeline_name: the pipeline's name, created (in ``namespace``) when absent.
        version: the version's name (:func:`version_name`); an existing version of that name is reused.
        experiment: the experiment of the run, created when absent.
        run_name: the run's name.
        arguments: the run's input parameters.
        namespace: the profile namespace of a multi-user deployment (None: the shared one).

    Returns:
        ``pipeline_id``, ``version_id``, ``version``, ``experiment_id`` and ``run_id``.
    """
    found = client.list_pipelines(filter=_name_filter(pipeline_name), namespace=namespace).pipelines or []
    if found:
        pipeline_id = found[0].pipeline_id
    else:
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=pipeline_name, namespace=namespace).pipeline_id
        logger.info("created pipeline %r (%s)", pipeline_name, pipeline_id)
    versions = client.list_pipeline_versions(pipeline_id, filter=_name_filter(version)).pipeline_versions or []
    if versions:
        version_id = versions[0].pipeline_version_id
        logger.info("pipeline %r already has version %r: reused", pipeline_name, version)
    else:
        version_id = client.upload_pipeline_version(str(package), version, pipeline_id=pipeline_id).pipeline_version_id
        logger.info("uploaded version %r of pipeline %r", version, pipeline_name)
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    run = client.run_pipeline(experiment_id, run_name, params=arguments, pipeline_id=pipeline_id,
                              version_id=version_id)
    return {"pipeline_id": pipeline_id, "version_id": version_id, "version": version, "experiment_id": experiment_id,
            "run_id": run.run_id}
