"""Training across nodes with the Kubeflow Trainer (v2.2+): render a ``TrainJob`` and run one to its end.

:func:`render_trainjob` writes a ``trainer.kubeflow.org/v1alpha1`` ``TrainJob`` on the
``torch-distributed`` ClusterTrainingRuntime: ``numNodes`` pods, each running
``torchrun -m unet3plus train`` with ``numProcPerNode`` processes (torchrun reads the rendezvous
from the ``PET_*`` variables the Trainer injects). Data and checkpoints live on a
PersistentVolumeClaim (ReadWriteMany for several nodes), the MLflow settings come from a
Kubernetes secret, and the pod-level settings (volumes, ``/dev/shm``, node selection) are one
``runtimePatches`` entry on container ``node``.

:func:`run_trainjob` creates such a job with the Kubernetes API, streams the logs of node 0,
waits for its ``Complete`` or ``Failed`` condition (with a timeout) and deletes it as configured;
the pipeline's launcher component (:mod:`components.launch`) calls it.

Also here: the checks of every name and quantity that ends up in a Kubernetes object, shared by
``python -m pipeline`` and the components, so bad input fails before anything is sent.

This is library code below the components and the pipeline (they import it, it imports neither),
and it imports no torch: ``python -m pipeline`` checks its options with it before anything heavy
is loaded.
"""

import dataclasses
import json
import logging
import re
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from unet3plus.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

API_GROUP = "trainer.kubeflow.org"
API_VERSION = "v1alpha1"
PLURAL = "trainjobs"
RUNTIME = "torch-distributed"
CONTAINER = "node"
"""The trainer container (and replicated job) of the ``torch-distributed`` runtime."""
MANAGER = "unet3plus.github.io/trainjob"
"""Owner of this project's ``runtimePatches`` entry (domain-prefixed, as the Trainer asks)."""
TRAIN_SECTIONS = ("model", "loss", "train", "mlflow")
"""The params sections ``unet3plus train`` reads (``data`` comes from the preprocessed dataset)."""
MLFLOW_REQUIRED_KEYS = ("MLFLOW_TRACKING_URI",)
MLFLOW_OPTIONAL_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")

_RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_RFC1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUANTITY = re.compile(r"^(\d+(\.\d+)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE]\d+)?$")
_RESOURCE = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# Docker reference grammar: [registry[:port]/]path[:tag][@digest], lowercase path components.
_IMAGE = re.compile(
    r"^(?:(?:[a-zA-Z0-9-]+\.)*[a-zA-Z0-9-]+(?::\d+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"
)


class SettingError(ConfigError):
    """An invalid name, quantity or count for a Kubernetes object (``python -m pipeline`` reports it as a
    usage error)."""


def _error(message: str) -> Exception:
    return SettingError(message)


def check_name(value: str, what: str) -> str:
    """A Kubernetes object name that is a DNS label (RFC 1035: lowercase, digits, ``-``; starts with a letter)."""
    if not (isinstance(value, str) and len(value) <= 63 and _RFC1035.match(value)):
        raise _error(f"{what} {value!r} is not a valid name: use at most 63 lowercase letters, digits and '-', "
                        "starting with a letter and ending with a letter or digit (RFC 1035)")
    return value


def check_namespace(value: str, what: str) -> str:
    """A namespace name: a DNS label (RFC 1123: at most 63 lowercase letters, digits and ``-``, alphanumeric ends)."""
    if not (isinstance(value, str) and len(value) <= 63 and re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", value)):
        raise _error(f"{what} {value!r} is not a valid namespace: use at most 63 lowercase letters, digits and '-', "
                     "starting and ending with a letter or digit (RFC 1123)")
    return value


def check_resource_name(value: str, what: str) -> str:
    """A Kubernetes object name of the DNS subdomain kind (secrets, claims, namespaces: RFC 1123)."""
    if not (isinstance(value, str) and len(value) <= 253 and _RFC1123.match(value)):
        raise _error(f"{what} {value!r} is not a valid Kubernetes name: use lowercase letters, digits, '-' and "
                        "'.', starting and ending with a letter or digit (RFC 1123)")
    return value


def check_quantity(value: str, what: str) -> str:
    """A Kubernetes resource quantity such as ``8Gi``, ``500m`` or ``2``."""
    if not (isinstance(value, str) and _QUANTITY.match(value)):
        raise _error(f"{what} {value!r} is not a Kubernetes quantity; write e.g. 8Gi, 512Mi, 500m or 2")
    return value


def check_extended_resource(value: str, what: str) -> str:
    """An accelerator resource name such as ``nvidia.com/gpu``."""
    if not (isinstance(value, str) and len(value) <= 316 and _RESOURCE.match(value)):
        raise _error(f"{what} {value!r} is not a resource name; write e.g. nvidia.com/gpu or amd.com/gpu")
    return value


def check_image(value: str, what: str = "image") -> str:
    """A container image reference such as ``ghcr.io/org/name:1.0``."""
    if not (isinstance(value, str) and len(value) <= 500 and _IMAGE.match(value)):
        raise _error(f"{what} {value!r} is not a container image reference; write e.g. "
                        "ghcr.io/unet3plus/unet3plus:0.1.0")
    return value


_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def check_label_key(value: str, what: str) -> str:
    """A label (or taint) key as the API server checks it: ``[prefix/]name``, the prefix a DNS subdomain
    of at most 253 characters, the name at most 63 letters, digits, ``-``, ``_``, ``.`` (alphanumeric ends)."""
    prefix, _, name = value.rpartition("/") if isinstance(value, str) else ("", "", "")
    if not (_LABEL_NAME.match(name) and (not prefix or (len(prefix) <= 253 and _RFC1123.match(prefix)))):
        raise _error(f"{what} {value!r} is not a valid label key: [prefix/]name, the name at most 63 letters, digits, "
                     "'-', '_' or '.' starting and ending with a letter or digit, the prefix a DNS name such as "
                     "nvidia.com")
    return value


def check_label_value(value: str, what: str) -> str:
    """A label value: empty, or at most 63 letters, digits, ``-``, ``_``, ``.`` with alphanumeric ends."""
    if not (isinstance(value, str) and (value == "" or _LABEL_NAME.match(value))):
        raise _error(f"{what} {value!r} is not a valid label value: at most 63 letters, digits, '-', '_' or '.', "
                     "starting and ending with a letter or digit")
    return value


def check_mount_path(value: str, what: str) -> str:
    """A container mount path: absolute, without ``..`` or ``:``, and not ``/`` or the pods' ``/dev/shm``."""
    parts = value.split("/") if isinstance(value, str) else [""]
    if not (value.startswith("/") and ".." not in parts and ":" not in value and value.rstrip("/")
            and not f"{value.rstrip('/')}/".startswith("/dev/shm/")):
        raise _error(f"{what} {value!r} is not a usable mount path: give an absolute path without '..' or ':', other "
                     "than / and /dev/shm (e.g. /mnt/data)")
    return value


def check_positive(value: Any, what: str) -> int:
    """A positive integer (booleans refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _error(f"{what} must be a positive integer, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class TrainJobSettings:
    """Everything about a TrainJob except what to train (see :func:`render_trainjob`).

    Attributes:
        nodes: training pods (``trainer.numNodes``).
        gpus_per_node: GPUs per pod, and processes per pod (``numProcPerNode``).
        image: the project's image.
        workspace_pvc: claim holding the data and the checkpoints (ReadWriteMany for several
            nodes), mounted at ``workspace_mount``.
        gpu_type, cpu, memory: resources per node (``memory`` is request and limit).
        shm_size: size of the in-memory ``/dev/shm``.
        mlflow_secret: secret with the MLflow settings, or None.
        deadline_seconds: ``activeDeadlineSeconds`` of the job.
        node_selector, toleration, image_pull_secrets, labels: as the pipeline's training pods.
    """

    nodes: int = 2
    gpus_per_node: int = 1
    image: str = "ghcr.io/unet3plus/unet3plus:0.1.0"
    workspace_pvc: str = "unet3plus-workspace"
    workspace_mount: str = "/mnt/workspace"
    gpu_type: str = "nvidia.com/gpu"
    cpu: str = "8"
    memory: str = "32Gi"
    shm_size: str = "8Gi"
    mlflow_secret: Optional[str] = "mlflow-credentials"
    deadline_seconds: int = 48 * 3600
    node_selector: Optional[Tuple[str, str]] = ("nvidia.com/gpu.present", "true")
    toleration: Optional[str] = "nvidia.com/gpu"
    image_pull_secrets: Tuple[str, ...] = ()
    labels: Tuple[Tuple[str, str], ...] = ()

    def check(self) -> "TrainJobSettings":
        """Raise :class:`SettingError` naming the first invalid setting; returns self."""
        check_positive(self.nodes, "--nodes")
        check_positive(self.gpus_per_node, "--gpus-per-node")
        check_positive(self.deadline_seconds, "the TrainJob deadline")
        check_image(self.image)
        check_resource_name(self.workspace_pvc, "the workspace claim")
        check_extended_resource(self.gpu_type, "--gpu-type")
        check_quantity(self.cpu, "the CPU request")
        check_quantity(self.memory, "the memory request")
        check_quantity(self.shm_size, "--shm-size")
        if self.mlflow_secret is not None:
            check_resource_name(self.mlflow_secret, "--mlflow-secret")
        for secret in self.image_pull_secrets:
            check_resource_name(secret, "--image-pull-secret")
        check_mount_path(self.workspace_mount, "the workspace mount path")
        if self.node_selector is not None:
            check_label_key(self.node_selector[0], "--gpu-node-selector")
            check_label_value(self.node_selector[1], "--gpu-node-selector")
        if self.toleration is not None:
            check_label_key(self.toleration, "--gpu-toleration")
        for key, value in self.labels:
            check_label_key(key, "--pod-label")
            check_label_value(value, "--pod-label")
        return self


def train_arguments(config: Any, data_dir: str, out_dir: str) -> List[str]:
    """``unet3plus train`` arguments that train ``config`` on ``data_dir`` into ``out_dir``.

    Every key of the sections training reads is spelled out as ``--set section.key=value`` (JSON
    values, which are YAML), so the job is self-contained: no params file is needed in the pod.
    """
    raw = json.loads(json.dumps(config.to_dict()))
    arguments = ["train", "--data", data_dir, "--out", out_dir]
    for section in TRAIN_SECTIONS:
        for key, value in raw[section].items():
            arguments += ["--set", f"{section}.{key}={json.dumps(value)}"]
    return arguments


def worker_arguments(params_file: str, data_dir: str, out_dir: str, ablation: str = "") -> List[str]:
    """``unet3plus train`` arguments of a training worker (``torchrun`` in a pod, or a TrainJob node).

    The parameters travel as the text of ``params_file`` and the variant as its name, exactly as
    DVC's ``unet3plus train --ablation NAME``: every worker builds the same configuration with
    :func:`unet3plus.config.load_config`, and the run is tagged and filed under its study as in
    every other path.

    Args:
        params_file: a ``params.yaml`` the workers can read.
        data_dir, out_dir: the preprocessed dataset and the output folder, as the workers see them.
        ablation: the name of a variant of the file's ``ablations.variants``, or ``""`` for the main model.
    """
    arguments = ["train", "--params", params_file, "--data", data_dir, "--out", out_dir]
    return arguments + ["--ablation", ablation] if ablation else arguments


def render_trainjob(
    name: str, namespace: Optional[str], settings: TrainJobSettings, arguments: List[str],
) -> Dict[str, Any]:
    """The ``TrainJob`` manifest (a dict; ``yaml.safe_dump`` it for ``kubectl apply -f``).

    Args:
        name: job name (RFC 1035 label; the runtime derives pod and service names from it).
        namespace: its namespace, or None to leave it to ``kubectl``'s context.
        settings: nodes, GPUs, image, volumes, secrets (checked here).
        arguments: the ``unet3plus`` arguments (:func:`worker_arguments` or :func:`train_arguments`).

    Raises:
        SettingError: an invalid name or setting.
    """
    check_name(name, "the TrainJob name")
    if namespace is not None:
        check_namespace(namespace, "--namespace")
    settings.check()
    env = []
    if settings.mlflow_secret:
        for key in MLFLOW_REQUIRED_KEYS + MLFLOW_OPTIONAL_KEYS:
            ref = {"name": settings.mlflow_secret, "key": key}
            if key in MLFLOW_OPTIONAL_KEYS:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    pod_spec: Dict[str, Any] = {
        "volumes": [
            {"name": "workspace", "persistentVolumeClaim": {"claimName": settings.workspace_pvc}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
        ],
        "containers": [{
            "name": CONTAINER,
            "volumeMounts": [
                {"name": "workspace", "mountPath": settings.workspace_mount},
                {"name": "dshm", "mountPath": "/dev/shm"},
            ],
        }],
    }
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict([settings.node_selector])
    if settings.toleration:
        pod_spec["tolerations"] = [{"key": settings.toleration, "operator": "Exists", "effect": "NoSchedule"}]
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": secret} for secret in settings.image_pull_secrets]
    pod_template: Dict[str, Any] = {"spec": pod_spec}
    if settings.labels:
        pod_template["metadata"] = {"labels": dict(settings.labels)}
    metadata: Dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/name": "unet3plus", **dict(settings.labels)}}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": {
            "runtimeRef": {"apiGroup": API_GROUP, "kind": "ClusterTrainingRuntime", "name": RUNTIME},
            "activeDeadlineSeconds": settings.deadline_seconds,
            "trainer": {
                "image": settings.image,
                "numNodes": settings.nodes,
                "numProcPerNode": settings.gpus_per_node,
                "resourcesPerNode": {
                    "requests": {"cpu": settings.cpu, "memory": settings.memory,
                                 settings.gpu_type: settings.gpus_per_node},
                    "limits": {"memory": settings.memory, settings.gpu_type: settings.gpus_per_node},
                },
                "command": ["torchrun", "-m", "unet3plus"],
                "args": list(arguments),
                "env": env,
            },
            "runtimePatches": [{
                "manager": MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                    "name": CONTAINER,
                    "template": {"spec": {"template": pod_template}},
                }]}}},
            }],
        },
    }


def _condition(job: Dict[str, Any], kind: str) -> Optional[Dict[str, Any]]:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def _stream_logs(core: Any, namespace: str, job_name: str, stop: threading.Event, poll_seconds: float) -> None:
    """Log the lines of node 0's trainer container as they come (until the pod ends or ``stop``)."""
    from kubernetes.client.rest import ApiException

    selector = f"jobset.sigs.k8s.io/jobset-name={job_name},batch.kubernetes.io/job-completion-index=0"
    while not stop.is_set():
        try:
            pods = core.list_namespaced_pod(namespace, label_selector=selector).items
            running = [pod for pod in pods if pod.status and pod.status.phase in ("Running", "Succeeded", "Failed")]
            if running:
                name = running[0].metadata.name
                logger.info("streaming the logs of %s", name)
                response = core.read_namespaced_pod_log(name, namespace, container=CONTAINER, follow=True,
                                                        _preload_content=False)
                for line in response.stream():
                    for text in line.decode("utf-8", "replace").splitlines():
                        logger.info("[%s] %s", name, text)
                return
        except ApiException as err:
            logger.warning("cannot read the logs of %s node 0 yet (%s %s)", job_name, err.status, err.reason)
        except Exception as err:  # noqa: BLE001 - logs are a convenience; the job's status decides
            logger.warning("log stream of %s node 0 ended: %s", job_name, err)
            return
        stop.wait(poll_seconds)


def run_trainjob(
    manifest: Dict[str, Any], namespace: str, timeout_seconds: float, cleanup: str = "on-success",
    poll_seconds: float = 10.0, api_client: Any = None,
) -> Dict[str, Any]:
    """Create the TrainJob ``manifest``, stream node 0's logs and wait for it to finish.

    Args:
        manifest: from :func:`render_trainjob`.
        namespace: where to create it.
        timeout_seconds: give up (and delete the job, unless ``cleanup`` is ``never``) after this long.
        cleanup: ``always``, ``on-success`` (failed jobs stay for ``kubectl describe``; timed-out
            ones are deleted) or ``never``.
        poll_seconds: how often the job's status is read.
        api_client: a ``kubernetes.client.ApiClient`` (default: in-cluster, else kubeconfig).

    Returns:
        The finished job as the API returned it.

    Raises:
        UserError: the job failed (its condition's reason and message), did not finish in time,
            or the API refused it.
    """
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    if cleanup not in ("always", "on-success", "never"):
        raise UserError(f"cleanup {cleanup!r} is unknown; expected always, on-success or never")
    if api_client is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api_client = client.ApiClient()
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    name = manifest["metadata"]["name"]
    try:
        custom.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, manifest)
    except ApiException as err:
        raise UserError(f"TrainJob {namespace}/{name}: the Kubernetes API refused it ({err.status} {err.reason}: "
                        f"{(err.body or '')[:300]}); is Kubeflow Trainer v2.2+ installed and may this service account "
                        "create trainjobs (deploy/kubeflow/trainjob-rbac.yaml)?") from err
    logger.info("created TrainJob %s/%s; waiting up to %.0f s", namespace, name, timeout_seconds)
    stop = threading.Event()
    streamer = threading.Thread(target=_stream_logs, args=(core, namespace, name, stop, poll_seconds), daemon=True)
    streamer.start()
    deadline = time.monotonic() + timeout_seconds
    succeeded = timed_out = False
    try:
        while True:
            job = custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
            if _condition(job, "Complete"):
                succeeded = True
                streamer.join(timeout=30)  # the rest of node 0's log
                logger.info("TrainJob %s/%s complete", namespace, name)
                return job
            failed = _condition(job, "Failed")
            if failed:
                raise UserError(f"TrainJob {namespace}/{name} failed ({failed.get('reason')}: "
                                f"{failed.get('message')}); see `kubectl describe trainjob -n {namespace} {name}`")
            if time.monotonic() >= deadline:
                timed_out = True
                raise UserError(f"TrainJob {namespace}/{name} did not finish within {timeout_seconds:.0f} s; raise "
                                "the timeout or look at `kubectl describe trainjob` for pods that cannot start")
            time.sleep(poll_seconds)
    finally:
        stop.set()
        # A job past its time is deleted too (unless ``never``): it would hold its GPUs on.
        if cleanup == "always" or (cleanup == "on-success" and (succeeded or timed_out)):
            try:
                custom.delete_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name,
                                                       propagation_policy="Background")
                logger.info("deleted TrainJob %s/%s", namespace, name)
            except ApiException as err:
                logger.warning("could not delete TrainJob %s/%s (%s %s)", namespace, name, err.status, err.reason)
