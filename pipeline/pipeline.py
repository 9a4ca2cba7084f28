"""The Kubeflow pipeline: raw data -> validate -> preprocess -> train (GPU) -> evaluate -> register.

Each ablation (a name and ``section.key=value`` overrides) trains and evaluates one more model in a
``dsl.ParallelFor``; ablations are compared in MLflow and never registered.

Everything Kubernetes-specific (GPU request, node selector and toleration, ``/dev/shm``, the MLflow
secret, the data volume) is set by :func:`on_cluster` from a :class:`ClusterSettings`, when
:func:`build_pipeline` builds the pipeline. ``kfp.local`` ignores those settings, so the very same
pipeline runs on a laptop (the tests do that).
"""

import dataclasses
from typing import List, NamedTuple, Optional, Tuple

from kfp import dsl, kubernetes
from kfp.dsl.for_loop import LoopArgumentVariable

from components import (evaluate_model, preprocess_data, raw_data, register_model, report_ablations, train_model,
                        validate_data)

PIPELINE_NAME = "unet3plus"

# The paper's Table 1 baselines next to the main model: UNet, UNet++ (deep supervision) and
# UNet 3+ without deep supervision: params.yaml's ablations.run (a test keeps them equal).
# `python -m pipeline submit` sends the params file's own selection instead.
DEFAULT_ABLATIONS = [
    {"name": "unet", "overrides": ["model.arch=\"unet\"", "model.deep_supervision=false", "model.cgm=false"]},
    {"name": "unet2plus", "overrides": ["model.arch=\"unet2plus\"", "model.cgm=false"]},
    {"name": "unet3plus_no_ds", "overrides": ["model.deep_supervision=false", "model.cgm=false"]},
]

PipelineOutputs = NamedTuple("PipelineOutputs", [("test_dice", float), ("model_name", str), ("model_version", str)])
"""What a run returns: the main model's mean test Dice and its registered name and version."""


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    """How the pipeline's pods use the cluster (fixed when the pipeline is compiled).

    Attributes:
        gpu_type: accelerator resource requested by training (``nvidia.com/gpu``).
        gpus: how many per training pod.
        gpu_node_selector: ``(label, value)`` a GPU node carries, or None for no selector.
        gpu_toleration: taint key of GPU nodes tolerated by training (operator ``Exists``,
            effect ``NoSchedule``), or None.
        shm_size: size of the in-memory ``/dev/shm`` of training pods: DataLoader workers pass
            batches through shared memory, and the container default (64 MiB) is too small.
        mlflow_secret: Kubernetes secret whose keys become the MLflow environment of the pods that
            track or register (``MLFLOW_TRACKING_URI`` required; ``MLFLOW_TRACKING_USERNAME``,
            ``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN`` optional), or None.
        data_pvc: PersistentVolumeClaim mounted on the raw-data step, for ``source_dir`` to
            read an existing dataset from, or None.
        data_mount: where ``data_pvc`` is mounted.
    """

    gpu_type: str = "nvidia.com/gpu"
    gpus: int = 1
    gpu_node_selector: Optional[Tuple[str, str]] = ("nvidia.com/gpu.present", "true")
    gpu_toleration: Optional[str] = "nvidia.com/gpu"
    shm_size: str = "8Gi"
    mlflow_secret: Optional[str] = "mlflow-credentials"
    data_pvc: Optional[str] = None
    data_mount: str = "/mnt/data"


MLFLOW_REQUIRED_KEYS = ("MLFLOW_TRACKING_URI",)
MLFLOW_OPTIONAL_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def on_cluster(
    task: dsl.PipelineTask, cluster: ClusterSettings, *, gpu: bool = False, mlflow: bool = False, data: bool = False
) -> dsl.PipelineTask:
    """Apply the Kubernetes settings a task needs; the one place that knows about the cluster.

    Args:
        task: the pipeline task.
        cluster: the settings.
        gpu: request GPUs, schedule on GPU nodes and give the pod a large ``/dev/shm``.
        mlflow: set the MLflow environment from ``cluster.mlflow_secret``.
        data: mount ``cluster.data_pvc`` (when set) at ``cluster.data_mount``.

    Returns:
        The task.
    """
    if gpu:
        task.set_accelerator_type(cluster.gpu_type).set_accelerator_limit(cluster.gpus)
        if cluster.gpu_node_selector:
            kubernetes.add_node_selector(task, *cluster.gpu_node_selector)
        if cluster.gpu_toleration:
            kubernetes.add_toleration(task, key=cluster.gpu_toleration, operator="Exists", effect="NoSchedule")
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=cluster.shm_size)
    if mlflow and cluster.mlflow_secret:
        kubernetes.use_secret_as_env(task, cluster.mlflow_secret, {key: key for key in MLFLOW_REQUIRED_KEYS})
        kubernetes.use_secret_as_env(task, cluster.mlflow_secret, {key: key for key in MLFLOW_OPTIONAL_KEYS},
                                     optional=True)
    if data and cluster.data_pvc:
        kubernetes.mount_pvc(task, cluster.data_pvc, cluster.data_mount)
    return task


def build_pipeline(cluster: ClusterSettings = ClusterSettings()) -> dsl.graph_component.GraphComponent:
    """The pipeline, with ``cluster`` settings applied to its tasks.

    Args:
        cluster: Kubernetes settings (GPU, secrets, volumes).

    Returns:
        The pipeline: call it under ``kfp.local.init`` to run it here, compile it with
        ``kfp.compiler.Compiler`` or submit it with ``kfp.Client``.
    """

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="UNet 3+ (Huang et al., ICASSP 2020) liver/spleen CT segmentation: raw data, validation, "
        "preprocessing, GPU training, per-volume evaluation and MLflow registration, plus ablations.",
    )
    def unet3plus_pipeline(
        params: str,
        dataset: str = "liver",
        ablations: List[dict] = DEFAULT_ABLATIONS,
        source_dir: str = "",
    ) -> PipelineOutputs:
        """Train, evaluate and register one model, and train and evaluate each ablation.

        Args:
            params: text of ``params.yaml`` (every knob of every step).
            dataset: ``liver`` (LiTS layout) or ``spleen`` (MSD Task09 layout).
            ablations: ``{"name": str, "overrides": ["section.key=value", ...]}`` entries.
            source_dir: folder with an existing raw dataset (e.g. on the data volume); empty to
                synthesise one.
        """
        raw = on_cluster(raw_data(dataset=dataset, params=params, source_dir=source_dir), cluster, data=True)
        raw_dataset = raw.outputs["raw"]
        validated = validate_data(raw=raw_dataset, dataset=dataset, params=params)
        preprocessed = preprocess_data(raw=raw_dataset, dataset=dataset, params=params).after(validated)
        processed = preprocessed.outputs["processed"]

        trained = on_cluster(train_model(processed=processed, params=params), cluster, gpu=True, mlflow=True)
        evaluated = on_cluster(
            evaluate_model(model=trained.outputs["model"], processed=processed, raw=raw_dataset, params=params),
            cluster, mlflow=True,
        )
        registered = on_cluster(
            register_model(model=trained.outputs["model"], evaluation=evaluated.outputs["evaluation"], params=params),
            cluster, mlflow=True,
        )

        with dsl.ParallelFor(ablations) as ablation:
            # `ablation.name` would be the loop channel's own name attribute; reach the key explicitly.
            ablation_name = LoopArgumentVariable(ablation, "name")
            trained_ablation = on_cluster(
                train_model(processed=processed, params=params, overrides=ablation.overrides, ablation=ablation_name),
                cluster, gpu=True, mlflow=True,
            ).set_display_name("train-ablation")
            evaluated_ablation = on_cluster(
                evaluate_model(model=trained_ablation.outputs["model"], processed=processed, raw=raw_dataset,
                               params=params, overrides=ablation.overrides),
                cluster, mlflow=True,
            ).set_display_name("evaluate-ablation")

        # The study's tables as a Markdown artifact; it runs even when an ablation failed.
        on_cluster(
            report_ablations(params=params, dataset=dataset, ablations=ablations)
            .after(evaluated, evaluated_ablation).ignore_upstream_failure(),
            cluster, mlflow=True,
        ).set_display_name("report")

        return PipelineOutputs(evaluated.outputs["Output"], registered.outputs["name"], registered.outputs["version"])

    return unet3plus_pipeline


unet3plus_pipeline = build_pipeline()
"""The pipeline with the default :class:`ClusterSettings`."""
