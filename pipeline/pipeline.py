"""The Kubeflow pipeline: raw data -> validate -> preprocess -> train (GPU) -> evaluate -> register.

Each ablation named in the parameters' ``ablations.run`` trains and evaluates one more model in a
``dsl.ParallelFor`` over those names (a first small step reads them from ``params``); every step
gets the ``params`` text and the ablation's name, and applies the variant itself. Ablations are
compared in MLflow and never registered.

Everything Kubernetes-specific (GPU request, node selector and toleration, ``/dev/shm``, the MLflow
secret, the data volume, CPU and memory per step, retries, caching, timeouts, image pull secrets,
pod labels) is set by :func:`on_cluster` from a :class:`ClusterSettings`, when
:func:`build_pipeline` builds the pipeline. ``kfp.local`` ignores those settings, so the very same
pipeline runs on a laptop (the tests do that).

Training runs in one of three ways: one process in the train pod (``gpus=1``), one process per GPU
in the pod under ``torchrun`` (``gpus`` or ``nproc`` > 1), or across nodes as a Kubeflow Trainer
``TrainJob`` created by a small launcher step (``nodes`` set; see :mod:`unet3plus.trainjob`).
"""

import dataclasses
import json
from typing import Dict, NamedTuple, Optional, Tuple

import yaml
from kfp import dsl, kubernetes

from components import (
    ablation_names,
    data_params,
    evaluate_model,
    preprocess_data,
    raw_data,
    register_model,
    report_ablations,
    train_model,
    validate_data,
)
from components.common import IMAGE, MLFLOW_SECRET_MOUNT
from components.launch import train_on_trainjob
from unet3plus.trainjob import SettingError, TrainJobSettings

PIPELINE_NAME = "unet3plus"

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
        nproc: training processes in the train pod (default: ``gpus``); above 1, torchrun.
        resources: per step (:data:`DEFAULT_RESOURCES` keys), ``(cpu, memory)``: the CPU request
            and the memory request and limit.
        retries: retries (with backoff) of training, evaluation and registration; 0 for none.
        train_timeout_seconds: the train step's timeout (and the TrainJob's deadline).
        image_pull_secrets: secrets for pulling the image from a private registry.
        pod_labels: ``(key, value)`` labels of every pod (cost attribution, policies).
        nodes: train as a Kubeflow Trainer TrainJob on this many nodes (None: in the train pod).
        gpus_per_node: GPUs (and processes) per TrainJob node (default: ``gpus``).
        workspace_pvc, workspace_mount: the workspace claim and where it is mounted, or None. With
            a claim the datasets stay on it (raw-data, validate, preprocess, train and evaluate
            read and write them there and pass only ``location.json`` references as artifacts),
            training writes its checkpoints there (a retried step resumes from the last one), and a
            TrainJob's nodes (ReadWriteMany) read the data and write the model there. Without
            one, datasets travel as artifacts and each step that downloads one gets ``scratch``.
        trainjob_cleanup: delete finished TrainJobs ``always``, ``on-success`` or ``never``.
        evaluate_gpus: GPUs of each evaluation pod (same node selector and toleration as
            training; 0: evaluate on the CPU).
        max_parallel_ablations: how many ablations train at once (the ParallelFor's
            parallelism), or None for all.
        scratch: per step (:data:`DEFAULT_SCRATCH` keys), the size of the generic ephemeral
            volume mounted at ``scratch_mount`` where the KFP launcher downloads the step's input
            artifacts and writes its outputs (KFP cannot request ephemeral storage,
            kubeflow/pipelines#11137); only without a workspace claim.
        scratch_mount: the launcher's local folder for the pipeline root's scheme: ``/minio`` for
            ``minio://`` (Kubeflow's default), ``/s3`` for ``s3://``, ``/gcs`` for ``gs://``.
        scratch_storage_class: storage class of the scratch volumes (None: the cluster's default).
    """

    gpu_type: str = "nvidia.com/gpu"
    gpus: int = 1
    gpu_node_selector: Optional[Tuple[str, str]] = ("nvidia.com/gpu.present", "true")
    gpu_toleration: Optional[str] = "nvidia.com/gpu"
    shm_size: str = "8Gi"
    mlflow_secret: Optional[str] = "mlflow-credentials"
    data_pvc: Optional[str] = None
    data_mount: str = "/mnt/data"
    nproc: Optional[int] = None
    resources: Dict[str, Tuple[str, str]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    retries: int = 2
    train_timeout_seconds: int = 48 * 3600
    image_pull_secrets: Tuple[str, ...] = ()
    pod_labels: Tuple[Tuple[str, str], ...] = ()
    nodes: Optional[int] = None
    gpus_per_node: Optional[int] = None
    workspace_pvc: Optional[str] = None
    workspace_mount: str = "/mnt/workspace"
    trainjob_cleanup: str = "on-success"
    evaluate_gpus: int = 1
    max_parallel_ablations: Optional[int] = None
    scratch: Dict[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_SCRATCH))
    scratch_mount: str = "/minio"
    scratch_storage_class: Optional[str] = None

    def workspace(self) -> str:
        """What the data steps get as ``workspace``: the claim's mount path, or ``""`` without a claim."""
        return self.workspace_mount if self.workspace_pvc else ""

    def processes(self) -> int:
        """Training processes in the train pod: ``nproc`` when set, else one per GPU."""
        return self.nproc or self.gpus

    def trainjob(self) -> Optional[dict]:
        """The launcher's ``job`` argument when training runs as a TrainJob (``nodes`` set), else None."""
        if self.nodes is None:
            return None
        if not self.workspace_pvc:
            raise SettingError("--nodes needs --workspace-pvc: a ReadWriteMany claim that carries the data to the "
                               "TrainJob's nodes and the model back")
        cpu, memory = self.resources["train"]
        settings = TrainJobSettings(
            nodes=self.nodes, gpus_per_node=self.gpus_per_node or self.gpus, image=IMAGE,
            workspace_pvc=self.workspace_pvc, workspace_mount=self.workspace_mount, gpu_type=self.gpu_type,
            cpu=cpu, memory=memory, shm_size=self.shm_size, mlflow_secret=self.mlflow_secret,
            deadline_seconds=self.train_timeout_seconds, node_selector=self.gpu_node_selector,
            toleration=self.gpu_toleration, image_pull_secrets=self.image_pull_secrets, labels=self.pod_labels,
        ).check()
        # Lists, not tuples: the argument is compiled into the pipeline as JSON.
        job = {key: list(map(list, value)) if key == "labels" else list(value) if isinstance(value, tuple) else value
               for key, value in dataclasses.asdict(settings).items()}
        return {**job, "namespace": "", "timeout_seconds": self.train_timeout_seconds + 600,
                "cleanup": self.trainjob_cleanup, "poll_seconds": 10}


DEFAULT_RESOURCES = {
    "ablations": ("250m", "512Mi"),
    "data": ("250m", "512Mi"),
    "raw": ("1", "2Gi"),
    "validate": ("2", "4Gi"),
    "preprocess": ("4", "8Gi"),
    "train": ("8", "32Gi"),
    "launch": ("500m", "1Gi"),
    "evaluate": ("4", "16Gi"),
    "register": ("1", "4Gi"),
    "report": ("1", "4Gi"),
}
"""Per step: (CPU request, memory request and limit); ``python -m pipeline compile --resources`` changes them."""

DEFAULT_SCRATCH = {
    "raw": "64Gi",
    "validate": "64Gi",
    "preprocess": "128Gi",
    "train": "64Gi",
    "evaluate": "128Gi",
}
"""Per step that downloads or writes a dataset, its scratch volume without a workspace claim, sized for LiTS.

LiTS (131 CT volumes, 58,638 slices of 512 x 512) is about 46 GB uncompressed and about 42 GB
preprocessed at 320 px (one npz of 0.72 MB per slice): raw-data writes the raw set, validate reads
it, preprocess reads it and writes the samples, train reads the samples, evaluate reads both.
``python -m pipeline compile --scratch STEP=SIZE`` changes them.
"""

RETRIED_STEPS = ("train", "launch", "evaluate", "register")
"""Steps retried on failure (a lost node, a tracking server restarting), with exponential backoff."""


def on_cluster(
    task: dsl.PipelineTask, cluster: ClusterSettings, step: str, *, gpus: int = 0, mlflow: bool = False,
    data: bool = False,
) -> dsl.PipelineTask:
    """Apply the Kubernetes settings a task needs; the one place that knows about the cluster.

    Every task gets its step's CPU and memory (:data:`DEFAULT_RESOURCES`), the image pull secrets
    and the pod labels; the :data:`RETRIED_STEPS` a retry policy with backoff. Caching: the steps
    whose inputs say everything about their outputs are cached (reading the ablation names and the
    data settings, the raw data, validation, preprocessing: the raw-data step is keyed on the
    dataset, the ``data`` settings and ``source_dir``, so a new run finds its artifact and the data
    steps after it hit too); training, registration (it writes to the registry) and the report (it
    reads MLflow) never are.

    Args:
        task: the pipeline task.
        cluster: the settings.
        step: ``ablations``, ``data``, ``raw``, ``validate``, ``preprocess``, ``train``, ``launch``,
            ``evaluate``, ``register`` or ``report``.
        gpus: request this many GPUs, schedule on GPU nodes, give the pod a large ``/dev/shm`` and
            make it refuse to run without CUDA.
        mlflow: mount the MLflow secret ``cluster.mlflow_secret``.
        data: a step that reads or writes a dataset: the workspace claim when there is one, else a
            scratch volume of ``cluster.scratch[step]``; the raw-data step also mounts ``data_pvc``.

    Returns:
        The task.
    """
    cpu, memory = cluster.resources[step]
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    if step in RETRIED_STEPS and cluster.retries:
        task.set_retry(cluster.retries, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="1800s")
    if step in ("train", "launch"):
        kubernetes.set_timeout(task, cluster.train_timeout_seconds + (1200 if step == "launch" else 0))
    task.set_caching_options(step in ("ablations", "data", "raw", "validate", "preprocess"))
    if cluster.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(cluster.image_pull_secrets))
    for key, value in cluster.pod_labels:
        kubernetes.add_pod_label(task, key, value)
    if gpus:
        task.set_accelerator_type(cluster.gpu_type).set_accelerator_limit(gpus)
        if cluster.gpu_node_selector:
            kubernetes.add_node_selector(task, *cluster.gpu_node_selector)
        if cluster.gpu_toleration:
            kubernetes.add_toleration(task, key=cluster.gpu_toleration, operator="Exists", effect="NoSchedule")
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=cluster.shm_size)
        # train.device/evaluate.device "auto" must not fall back to the CPU on a GPU pod (unet3plus.device,
        # not imported here: it imports torch, and compiling stays fast without).
        task.set_env_variable("UNET3PLUS_REQUIRE_CUDA", "1")
    if mlflow and cluster.mlflow_secret:
        # A volume, not secretAsEnv (see components.common.mlflow_environment): readable by the minimum backend.
        kubernetes.use_secret_as_volume(task, cluster.mlflow_secret, MLFLOW_SECRET_MOUNT)
    if data and cluster.workspace_pvc:
        kubernetes.mount_pvc(task, cluster.workspace_pvc, cluster.workspace_mount)
    elif data and step in cluster.scratch:
        kubernetes.add_ephemeral_volume(task, volume_name="scratch", mount_path=cluster.scratch_mount,
                                        access_modes=["ReadWriteOnce"], size=cluster.scratch[step],
                                        storage_class_name=cluster.scratch_storage_class)
    if step == "raw" and cluster.data_pvc:
        kubernetes.mount_pvc(task, cluster.data_pvc, cluster.data_mount)
    return task


def build_pipeline(cluster: ClusterSettings = ClusterSettings(), params: str = "") -> dsl.graph_component.GraphComponent:
    """The pipeline, with ``cluster`` settings applied to its tasks.

    Args:
        cluster: Kubernetes settings (GPU, secrets, volumes, resources, TrainJob).
        params: the default of the pipeline's ``params`` (the text of a ``params.yaml``; ``""``:
            the built-in defaults), so that every input of the compiled pipeline has a default.

    Returns:
        The pipeline: call it under ``kfp.local.init`` to run it here, compile it with
        ``kfp.compiler.Compiler`` or submit it with ``kfp.Client``.
    """

    job = cluster.trainjob()
    workspace = cluster.workspace()
    # One line (JSON is YAML): kfp writes each default into the compiled file's comment header, and a
    # multi-line one would end the comment and break the YAML for every reader.
    params = json.dumps(yaml.safe_load(params), separators=(",", ":")) if params.strip() else ""

    def train(**arguments) -> dsl.PipelineTask:
        """The training task: in the pod (under torchrun for several processes), or a TrainJob launcher."""
        if job is None:
            if cluster.processes() > 1:
                arguments["nproc"] = cluster.processes()
            return on_cluster(train_model(workspace=workspace, **arguments), cluster, "train", gpus=cluster.gpus,
                              mlflow=True, data=True)
        return on_cluster(train_on_trainjob(job=job, **arguments), cluster, "launch", mlflow=True, data=True)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="UNet 3+ (Huang et al., ICASSP 2020) liver/spleen CT segmentation: raw data, validation, "
        "preprocessing, GPU training, per-volume evaluation and MLflow registration, plus ablations. "
        "Needs Kubeflow Pipelines 2.14 or later.",
    )
    def unet3plus_pipeline(
        params: str = params,
        dataset: str = "liver",
        source_dir: str = "",
        pipeline_version: str = "",
    ) -> PipelineOutputs:
        """Train, evaluate and register one model, and train and evaluate each ablation of ``ablations.run``.

        Args:
            params: text of ``params.yaml`` (every knob of every step, and the ablations).
            dataset: ``liver`` (LiTS layout) or ``spleen`` (MSD Task09 layout).
            source_dir: folder with an existing raw dataset (e.g. on the data volume); empty to
                synthesise one.
            pipeline_version: the name of the pipeline version this run is of (``python -m pipeline
                submit`` sets it), tagged on every MLflow run as ``kfp_pipeline_version``.
        """
        # Which Kubeflow run wrote an MLflow run: tags on every run (components.common.start).
        run = {"kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER, "kfp_run_name": dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
               "pipeline_version": pipeline_version}
        data = on_cluster(data_params(params=params), cluster, "data").set_display_name("data-params")
        raw = on_cluster(raw_data(dataset=dataset, params=data.output, source_dir=source_dir, workspace=workspace),
                         cluster, "raw", data=True)
        raw_dataset = raw.outputs["raw"]
        validated = on_cluster(validate_data(raw=raw_dataset, dataset=dataset, params=data.output), cluster,
                               "validate", data=True)
        preprocessed = on_cluster(preprocess_data(raw=raw_dataset, dataset=dataset, params=data.output,
                                                  workspace=workspace),
                                  cluster, "preprocess", data=True).after(validated)
        processed = preprocessed.outputs["processed"]

        trained = train(processed=processed, params=params, **run)
        evaluated = on_cluster(
            evaluate_model(model=trained.outputs["model"], processed=processed, raw=raw_dataset, params=params, **run),
            cluster, "evaluate", gpus=cluster.evaluate_gpus, mlflow=True, data=True,
        )
        registered = on_cluster(
            register_model(model=trained.outputs["model"], evaluation=evaluated.outputs["evaluation"], params=params,
                           **run),
            cluster, "register", mlflow=True,
        )

        names = on_cluster(ablation_names(params=params), cluster, "ablations").set_display_name("ablations")
        # A failing ablation ends its branch successfully with a failure marker (components.common.ablation_failed):
        # siblings and the report run on any backend, whatever its fail-fast rules.
        with dsl.ParallelFor(names.output, parallelism=cluster.max_parallel_ablations) as ablation:
            trained_ablation = train(processed=processed, params=params, ablation=ablation, **run).set_display_name(
                "train-ablation")
            evaluated_ablation = on_cluster(
                evaluate_model(model=trained_ablation.outputs["model"], processed=processed, raw=raw_dataset,
                               params=params, ablation=ablation, **run),
                cluster, "evaluate", gpus=cluster.evaluate_gpus, mlflow=True, data=True,
            ).set_display_name("evaluate-ablation")

        # The study's tables, of this run's training runs only, as a Markdown artifact.
        on_cluster(
            report_ablations(params=params, dataset=dataset, **run)
            .after(evaluated, evaluated_ablation).ignore_upstream_failure(),
            cluster, "report", mlflow=True,
        ).set_display_name("report")

        return PipelineOutputs(evaluated.outputs["Output"], registered.outputs["name"], registered.outputs["version"])

    return unet3plus_pipeline


unet3plus_pipeline = build_pipeline()
"""The pipeline with the default :class:`ClusterSettings`."""
