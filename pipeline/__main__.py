"""``python -m pipeline compile`` writes the pipeline's IR YAML; ``python -m pipeline submit`` runs it on a cluster;
``python -m pipeline trainjob`` writes a Kubeflow Trainer ``TrainJob`` for ``kubectl apply -f``.

``compile`` and ``submit`` take the same cluster options (GPUs, node selector and toleration, MLflow
secret, data volume, resources, retries, TrainJob nodes). Every option is checked while the command
line is parsed, so a bad value stops the command before anything is compiled or sent. Errors the
user can fix are printed as one line with exit status 2, as by the ``unet3plus`` CLI.
"""

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from components.common import DEFAULT_IMAGE, IMAGE
from pipeline.pipeline import DEFAULT_RESOURCES, DEFAULT_SCRATCH, PIPELINE_NAME, ClusterSettings, build_pipeline
from unet3plus import trainjob

logger = logging.getLogger("pipeline")

DEFAULT_OUTPUT = Path("unet3plus_pipeline.yaml")


def _checked(check: Callable[[str, str], Any], what: str, convert: Callable[[str], Any] = str,
             empty_is_none: bool = False) -> Callable[[str], Any]:
    """An argparse ``type`` that converts with ``convert`` and validates with a :mod:`unet3plus.trainjob` check."""

    def parse(text: str) -> Any:
        if empty_is_none and text == "":
            return None
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a positive integer, got {text!r}") from None
        try:
            return check(value, what)
        except trainjob.SettingError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def _positive(what: str) -> Callable[[str], int]:
    return _checked(trainjob.check_positive, what, convert=int)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _retries(text: str) -> int:
    if not re.fullmatch(r"\d{1,2}", text):
        raise argparse.ArgumentTypeError(f"expected a number of retries from 0 to 99, got {text!r}")
    return int(text)


def _label(text: str, what: str) -> tuple:
    """``KEY=VALUE`` -> ``(KEY, VALUE)``, both checked as the API server checks labels."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{what} {text!r}: expected KEY=VALUE, e.g. team=imaging")
    try:
        return trainjob.check_label_key(key, what), trainjob.check_label_value(value, what)
    except trainjob.SettingError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _pod_label(text: str) -> tuple:
    return _label(text, "--pod-label")


def _step_resources(text: str) -> tuple:
    """``STEP=CPU,MEMORY`` -> ``(STEP, (CPU, MEMORY))``."""
    step, sep, value = text.partition("=")
    cpu, comma, memory = value.partition(",")
    if not sep or not comma or step not in DEFAULT_RESOURCES:
        raise argparse.ArgumentTypeError(f"{text!r}: expected STEP=CPU,MEMORY with STEP one of "
                                         f"{', '.join(DEFAULT_RESOURCES)}, e.g. train=16,64Gi")
    try:
        return step, (trainjob.check_quantity(cpu, f"the CPU of {step}"),
                      trainjob.check_quantity(memory, f"the memory of {step}"))
    except trainjob.SettingError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _step_scratch(text: str) -> tuple:
    """``STEP=SIZE`` -> ``(STEP, SIZE)``, a step of :data:`DEFAULT_SCRATCH` and a Kubernetes quantity."""
    step, sep, size = text.partition("=")
    if not sep or step not in DEFAULT_SCRATCH:
        raise argparse.ArgumentTypeError(f"{text!r}: expected STEP=SIZE with STEP one of {', '.join(DEFAULT_SCRATCH)}, "
                                         "e.g. preprocess=200Gi")
    try:
        return step, trainjob.check_quantity(size, f"the scratch size of {step}")
    except trainjob.SettingError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _count(what: str) -> Callable[[str], int]:
    """A whole number >= 0."""
    def parse(text: str) -> int:
        if not text.isdigit():
            raise argparse.ArgumentTypeError(f"{what} must be a whole number (0 or more), got {text!r}")
        return int(text)
    return parse


def _node_label(text: str) -> Optional[tuple]:
    """``LABEL=VALUE`` -> ``(LABEL, VALUE)``; ``""`` -> None (no node selector)."""
    if not text:
        return None
    return _label(text, "--gpu-node-selector")


def cluster_settings(args: argparse.Namespace) -> ClusterSettings:
    """The :class:`ClusterSettings` chosen on the command line (empty strings turn optional settings off).

    Raises:
        SettingError: the image (``UNET3PLUS_IMAGE``) is not an image reference, or the TrainJob
            settings are inconsistent.
    """
    trainjob.check_image(IMAGE, "UNET3PLUS_IMAGE")
    if args.gpus_per_node is not None and args.nodes is None:
        trainjob.check_positive(None, "--nodes (needed by --gpus-per-node)")
    cluster = ClusterSettings(
        gpu_type=args.gpu_type,
        gpus=args.gpus,
        gpu_node_selector=args.gpu_node_selector or None,
        gpu_toleration=args.gpu_toleration or None,
        shm_size=args.shm_size,
        mlflow_secret=args.mlflow_secret or None,
        data_pvc=args.data_pvc or None,
        data_mount=args.data_mount,
        nproc=args.nproc,
        resources={**DEFAULT_RESOURCES, **dict(args.resources)},
        retries=args.retries,
        train_timeout_seconds=args.train_timeout,
        image_pull_secrets=tuple(args.image_pull_secrets),
        pod_labels=tuple(args.pod_labels),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        workspace_pvc=args.workspace_pvc or None,
        workspace_mount=args.workspace_mount,
        evaluate_gpus=args.evaluate_gpus,
        max_parallel_ablations=args.max_parallel_ablations,
        scratch={**DEFAULT_SCRATCH, **dict(args.scratch)},
        scratch_mount=args.scratch_mount,
        scratch_storage_class=args.scratch_storage_class or None,
    )
    cluster.trainjob()  # checks the TrainJob settings now, not in the cluster
    return cluster


def compile_pipeline(output: Path, cluster: ClusterSettings, params: str = "") -> Path:
    """Compile the pipeline to ``output`` (IR YAML), atomically, with ``params`` as the default of its ``params``.

    Returns:
        ``output``.
    """
    from kfp import compiler

    from unet3plus.utils import atomic_path

    with atomic_path(output) as tmp:
        compiler.Compiler().compile(build_pipeline(cluster, params=params), str(tmp))
    return output


def default_params(params_path: Optional[Path]) -> str:
    """The text the compiled pipeline's ``params`` defaults to: ``params_path``, else ./params.yaml, else the defaults."""
    if params_path is None and Path("params.yaml").is_file():
        params_path = Path("params.yaml")
    return run_arguments(params_path, [], "liver", "")["params"]


def run_arguments(params_path: Optional[Path], overrides: List[str], dataset: str, source_dir: str) -> Dict[str, Any]:
    """The arguments of a run, checked here before anything is sent to the cluster.

    The parameters file with ``--set`` overrides applied becomes the ``params`` argument, its
    ``ablations`` section included: the run trains the variants named in ``ablations.run``.

    Raises:
        ConfigError: the parameters file is missing or invalid, or an override is.
    """
    from components.common import layout_of
    from unet3plus.config import load_config

    layout_of(dataset)
    config = load_config(params_path, overrides)
    raw = json.loads(json.dumps(config.to_dict()))  # tuples -> lists, for YAML
    return {"params": yaml.safe_dump(raw, sort_keys=False), "dataset": dataset, "source_dir": source_dir}


def _check_output(args: argparse.Namespace) -> None:
    """The ``unet3plus`` verbs' output checks for ``--output``: not over the parameters file under any spelling,
    not a folder, not a file unet3plus did not write (without ``--force``)."""
    from unet3plus.config import params_path
    from unet3plus.utils import check_files_replaceable, check_outputs

    # trainjob reads a parameters file (default ./params.yaml); compile does not
    params = params_path(args.params) if "params" in args else None
    check_outputs({"--output": args.output}, {"--params": params})
    check_files_replaceable("--output", [args.output], args.force)


def _record_output(args: argparse.Namespace) -> None:
    from unet3plus.utils import record_outputs

    record_outputs(args.output.parent, [args.output])


def cmd_compile(args: argparse.Namespace) -> None:
    _check_output(args)
    path = compile_pipeline(args.output, cluster_settings(args), default_params(args.params))
    _record_output(args)
    logger.info("pipeline %r compiled to %s", PIPELINE_NAME, path)


def cmd_submit(args: argparse.Namespace) -> None:
    import datetime
    import os
    import queue
    import tempfile
    import threading
    import warnings

    import kfp
    import kfp_server_api
    import urllib3

    from pipeline.submit import TOKEN_ENV, submit_version_and_run, version_name
    from unet3plus.errors import UserError
    from unet3plus.tracking import git_commit

    cluster = cluster_settings(args)
    params = args.params
    if params is None and Path("params.yaml").is_file():
        params = Path("params.yaml")
    arguments = run_arguments(params, args.overrides, args.dataset, args.source_dir)
    ablations = len(yaml.safe_load(arguments["params"])["ablations"]["run"])
    scratch = tempfile.TemporaryDirectory()
    package = compile_pipeline(Path(scratch.name) / "pipeline.yaml", cluster, default_params(args.params))
    version = version_name(package, git_commit())
    run_name = args.run_name or f"{args.pipeline_name} {version} {datetime.datetime.now():%Y-%m-%d %H:%M:%S}"
    token = args.token or os.environ.get(TOKEN_ENV) or None
    outcome: "queue.Queue[tuple]" = queue.Queue()

    def submit() -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # kfp's note on server versions
                client = kfp.Client(host=args.host, namespace=args.namespace or "kubeflow", existing_token=token)
            outcome.put((submit_version_and_run(
                client, package, pipeline_name=args.pipeline_name, version=version, experiment=args.experiment,
                run_name=run_name, arguments=arguments, namespace=args.namespace,
            ), None))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, which decides
            outcome.put((None, err))

    # The API client has no overall timeout (and retries): a host that accepts and never answers
    # would hang the command. The call runs in a daemon thread, abandoned after --timeout.
    # urllib3's retry warnings (kfp_server_api resets its level): the outcome is reported below.
    logging.getLogger("urllib3.connectionpool").addFilter(lambda record: record.levelno >= logging.ERROR)
    threading.Thread(target=submit, daemon=True).start()
    hint = f"check --host, --namespace and the token (--token or ${TOKEN_ENV})"
    try:
        result, err = outcome.get(timeout=args.timeout)
    except queue.Empty:
        raise UserError(f"{args.host}: Kubeflow Pipelines did not answer within {args.timeout:g} s; {hint}") from None
    try:
        if err is not None:
            raise err
    except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        reason = str(reason).splitlines()[0][:200] if str(reason) else type(err).__name__
        status = getattr(err, "status", None)
        reason = f"HTTP {status} {reason}" if status else reason
        raise UserError(f"{args.host}: Kubeflow Pipelines refused or could not be reached ({reason}); {hint}") from err
    finally:
        scratch.cleanup()
    logger.info("submitted run %s of %s version %s (%d ablations) to %s", result["run_id"], args.pipeline_name,
                version, ablations, args.host)


def trainjob_settings(args: argparse.Namespace) -> trainjob.TrainJobSettings:
    """The :class:`TrainJobSettings` of ``python -m pipeline trainjob``, checked."""
    return trainjob.TrainJobSettings(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, image=args.image, workspace_pvc=args.workspace_pvc,
        workspace_mount=args.workspace_mount, gpu_type=args.gpu_type, cpu=args.cpu, memory=args.memory,
        shm_size=args.shm_size, mlflow_secret=args.mlflow_secret or None, deadline_seconds=args.deadline,
        node_selector=args.gpu_node_selector or None, toleration=args.gpu_toleration or None,
        image_pull_secrets=tuple(args.image_pull_secrets), labels=tuple(args.pod_labels),
    ).check()


def check_arguments(args: argparse.Namespace) -> None:
    """Check what the option types alone cannot (the image, combinations), before torch is imported.

    Raises:
        SettingError: the first problem.
    """
    if args.verb == "trainjob":
        trainjob_settings(args)
    else:
        cluster_settings(args)


def cmd_trainjob(args: argparse.Namespace) -> None:
    from components.common import layout_of
    from unet3plus.config import load_config, params_path
    from unet3plus.utils import atomic_path

    layout_of(args.dataset)
    if args.output is not None:
        _check_output(args)
    config = load_config(params_path(args.params), args.overrides)
    name = args.name or f"unet3plus-{args.dataset}"
    settings = trainjob_settings(args)
    data_dir = args.data_dir or f"{args.workspace_mount}/processed/{args.dataset}"
    out_dir = args.out_dir or f"{args.workspace_mount}/models/{name}"
    manifest = trainjob.render_trainjob(name, args.namespace, settings,
                                        trainjob.train_arguments(config, data_dir, out_dir))
    text = yaml.safe_dump(manifest, sort_keys=False)
    if args.output is None:
        sys.stdout.write(text)
        return
    with atomic_path(args.output) as tmp:
        tmp.write_text(text)
    _record_output(args)
    logger.info("TrainJob %r written to %s (kubectl apply -f %s)", name, args.output, args.output)


def _add_kubernetes_options(group: argparse._ArgumentGroup, default: ClusterSettings) -> None:
    """The options that ``compile``, ``submit`` and ``trainjob`` share."""
    group.add_argument("--gpu-type", type=_checked(trainjob.check_extended_resource, "--gpu-type"),
                       default=default.gpu_type, help="accelerator resource of training pods (default: %(default)s)")
    group.add_argument("--gpu-node-selector", type=_node_label, default=default.gpu_node_selector,
                       metavar="LABEL=VALUE",
                       help="node label training pods must match (default: %s)" % "=".join(default.gpu_node_selector))
    group.add_argument("--gpu-toleration", default=default.gpu_toleration, metavar="TAINT_KEY",
                       type=_checked(trainjob.check_label_key, "--gpu-toleration", empty_is_none=True),
                       help="taint key of GPU nodes that training pods tolerate (default: %(default)s)")
    group.add_argument("--shm-size", type=_checked(trainjob.check_quantity, "--shm-size"), default=default.shm_size,
                       help="in-memory /dev/shm of training pods, for DataLoader workers (default: %(default)s)")
    group.add_argument("--mlflow-secret", type=_checked(trainjob.check_resource_name, "--mlflow-secret",
                                                        empty_is_none=True),
                       default=default.mlflow_secret, metavar="SECRET",
                       help="Kubernetes secret with key MLFLOW_TRACKING_URI (and optionally MLFLOW_TRACKING_USERNAME, "
                       "MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN) for the tracking pods (default: %(default)s)")
    group.add_argument("--image-pull-secret", dest="image_pull_secrets", action="append", default=[],
                       type=_checked(trainjob.check_resource_name, "--image-pull-secret"), metavar="SECRET",
                       help="secret for pulling the image from a private registry (repeatable)")
    group.add_argument("--pod-label", dest="pod_labels", action="append", default=[], type=_pod_label,
                       metavar="KEY=VALUE", help="label of every pod, e.g. team=imaging (repeatable)")


def _add_workspace_options(group: argparse._ActionsContainer, claim: Optional[str], mount: str, optional: bool,
                           help: str) -> None:
    """``--workspace-pvc`` and ``--workspace-mount``, declared once so that they name the same claim and mount
    path in ``compile``, ``submit`` and ``trainjob``; where the claim is ``optional``, an empty value means none."""
    group.add_argument("--workspace-pvc", default=claim, metavar="CLAIM", help=help,
                       type=_checked(trainjob.check_resource_name, "--workspace-pvc", empty_is_none=optional))
    group.add_argument("--workspace-mount", default=mount, metavar="PATH",
                       type=_checked(trainjob.check_mount_path, "--workspace-mount"),
                       help="where --workspace-pvc is mounted (default: %(default)s)")


def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    default = ClusterSettings()
    group = parser.add_argument_group(
        "cluster settings",
        "Compiled into the pipeline. An empty --gpu-node-selector, --gpu-toleration or --mlflow-secret turns that "
        "setting off.",
    )
    group.add_argument("--gpus", type=_positive("--gpus"), default=default.gpus,
                       help="accelerators per training pod; above 1 the pod runs one process per GPU under torchrun "
                       "(default: %(default)s)")
    group.add_argument("--nproc", type=_positive("--nproc"), default=None,
                       help="training processes per training pod (default: --gpus); e.g. several CPU processes "
                       "(gloo) where GPUs are few")
    _add_kubernetes_options(group, default)
    group.add_argument("--data-pvc", type=_checked(trainjob.check_resource_name, "--data-pvc", empty_is_none=True),
                       default=None, metavar="CLAIM",
                       help="PersistentVolumeClaim mounted on the raw-data step (default: none)")
    group.add_argument("--data-mount", default=default.data_mount, metavar="PATH",
                        type=_checked(trainjob.check_mount_path, "--data-mount"),
                       help="where --data-pvc is mounted (default: %(default)s)")
    group.add_argument("--resources", action="append", default=[], type=_step_resources, metavar="STEP=CPU,MEMORY",
                       help="CPU request and memory request and limit of a step (repeatable); steps and defaults: "
                       + "; ".join(f"{step}={cpu},{memory}" for step, (cpu, memory) in DEFAULT_RESOURCES.items()))
    group.add_argument("--retries", type=_retries, default=default.retries,
                       help="retries, with exponential backoff from 60 s, of train, evaluate and register "
                       "(default: %(default)s)")
    group.add_argument("--train-timeout", type=_positive("--train-timeout"), default=default.train_timeout_seconds,
                       metavar="SECONDS", help="the train step's timeout (default: %(default)s = 48 h)")
    scale = parser.add_argument_group(
        "training across nodes (Kubeflow Trainer v2.2+)",
        "With --nodes, training runs as a TrainJob on the torch-distributed runtime, created by a launcher step "
        "whose service account needs deploy/kubeflow/trainjob-rbac.yaml. Data and model travel through "
        "--workspace-pvc, a ReadWriteMany claim.",
    )
    scale.add_argument("--nodes", type=_positive("--nodes"), default=None, help="training nodes (default: train "
                       "in the pipeline's own pod)")
    scale.add_argument("--gpus-per-node", type=_positive("--gpus-per-node"), default=None,
                       help="GPUs (and processes) per node (default: --gpus)")
    data = parser.add_argument_group(
        "where the data lives",
        "With --workspace-pvc the datasets stay on that claim: raw-data, validate, preprocess, train and evaluate "
        "read and write them there and pass only small references as artifacts, and training checkpoints there "
        "(a retried train step resumes). Without it, datasets travel as artifacts and every step that downloads "
        "one gets a scratch volume (a generic ephemeral volume) of --scratch's size.",
    )
    _add_workspace_options(data, default.workspace_pvc, default.workspace_mount, optional=True,
                           help="claim for the datasets, checkpoints and a TrainJob's data and model; ReadWriteMany "
                           "when pods on several nodes use it (default: none)")
    data.add_argument("--scratch", action="append", default=[], type=_step_scratch, metavar="STEP=SIZE",
                      help="scratch volume of a step without --workspace-pvc (repeatable); steps and defaults, sized "
                      "for LiTS: " + "; ".join(f"{step}={size}" for step, size in DEFAULT_SCRATCH.items()))
    data.add_argument("--scratch-mount", default=default.scratch_mount, metavar="PATH",
                      help="where the KFP launcher keeps artifacts for your pipeline root: /minio (minio://, "
                      "Kubeflow's default), /s3 (s3://) or /gcs (gs://) (default: %(default)s)")
    data.add_argument("--scratch-storage-class", default=None, metavar="NAME",
                      help="storage class of the scratch volumes (default: the cluster's)")
    group.add_argument("--evaluate-gpus", type=_count("--evaluate-gpus"), default=default.evaluate_gpus,
                       metavar="N", help="GPUs of each evaluation pod, on the training's GPU nodes; 0 evaluates on "
                       "the CPU (default: %(default)s)")
    group.add_argument("--max-parallel-ablations", type=_positive("--max-parallel-ablations"), default=None,
                       metavar="N", help="ablations trained at once (default: all)")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``python -m pipeline compile: error: ...``), exit status 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m pipeline",
        description="The unet3plus Kubeflow pipeline: raw data -> validate -> preprocess -> train (GPU node) -> "
        "evaluate -> register in MLflow, plus one train + evaluate per ablation.",
        epilog=f"Components run in the image {DEFAULT_IMAGE}; set UNET3PLUS_IMAGE when compiling or submitting "
        "to use another (build it from the Dockerfile).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("compile", help="write the pipeline's IR YAML (upload it in the Kubeflow UI)",
                         description="Compile the pipeline to IR YAML, for upload in the Kubeflow Pipelines UI or "
                         "`kfp pipeline create`.")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, metavar="FILE",
                   help="where to write the YAML (default: %(default)s)")
    p.add_argument("--params", type=Path, default=None,
                   help="the default of the pipeline's `params` input (default: ./params.yaml if present, else the "
                   "built-in defaults)")
    p.add_argument("--force", action="store_true", help="replace --output even if unet3plus did not write it")
    _add_cluster_options(p)
    p.set_defaults(func=cmd_compile)

    p = verbs.add_parser("submit", help="run the pipeline on a Kubeflow Pipelines cluster",
                         description="Check the parameters here, then start a run on a Kubeflow Pipelines cluster. "
                         "params.yaml (with --set overrides) becomes the run's `params`; its `ablations` section "
                         "becomes the run's ablations.")
    p.add_argument("--host", required=True, metavar="URL",
                   help="Kubeflow Pipelines API endpoint, e.g. http://localhost:8080 after "
                   "`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`")
    p.add_argument("--params", type=Path, default=None,
                   help="parameters file (default: ./params.yaml if present, else built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one parameter, e.g. --set train.epochs=5 (repeatable; values are YAML)")
    p.add_argument("--dataset", choices=("liver", "spleen"), default="liver",
                   help="organ: liver (LiTS layout) or spleen (MSD Task09 layout)")
    p.add_argument("--source-dir", default="", metavar="DIR",
                   help="raw dataset folder inside the raw-data pod, e.g. on --data-pvc (default: synthesise a "
                   "phantom dataset)")
    p.add_argument("--experiment", default=PIPELINE_NAME, help="Kubeflow experiment (default: %(default)s)")
    p.add_argument("--pipeline-name", default=PIPELINE_NAME, metavar="NAME",
                   help="the pipeline to add a version to, named after the git commit and the compiled YAML's "
                   "hash; created when absent (default: %(default)s)")
    p.add_argument("--token", default=None, metavar="TOKEN",
                   help="bearer token for a Kubeflow behind an authenticating proxy (multi-user); prefer the "
                   "KF_PIPELINES_TOKEN environment variable, which a process list does not show")
    p.add_argument("--run-name", default=None, help="run name (default: pipeline name and time)")
    p.add_argument("--namespace", type=_checked(trainjob.check_namespace, "--namespace"), default=None,
                   help="Kubernetes namespace of a multi-user deployment")
    p.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="give up on a host that does not answer within this long (default: %(default)g)")
    _add_cluster_options(p)
    p.set_defaults(func=cmd_submit)

    default = trainjob.TrainJobSettings()
    p = verbs.add_parser("trainjob", help="write a Kubeflow Trainer TrainJob that trains across nodes",
                         description="Render a trainer.kubeflow.org/v1alpha1 TrainJob (Kubeflow Trainer v2.2+, "
                         "torch-distributed runtime) that trains the parameters on a preprocessed dataset on the "
                         "workspace claim: torchrun -m unet3plus train on every node, MLflow settings from the secret. "
                         "Apply it with `kubectl apply -f FILE`.")
    p.add_argument("--params", type=Path, default=None,
                   help="parameters file (default: ./params.yaml if present, else built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one parameter (repeatable; values are YAML)")
    p.add_argument("--dataset", choices=("liver", "spleen"), default="liver", help="organ (default: %(default)s)")
    p.add_argument("--nodes", type=_positive("--nodes"), required=True, help="training nodes")
    p.add_argument("--gpus-per-node", type=_positive("--gpus-per-node"), required=True,
                   help="GPUs, and training processes, per node")
    p.add_argument("--image", type=_checked(trainjob.check_image, "--image"), default=IMAGE,
                   help="the project's image (default: %(default)s)")
    _add_workspace_options(p, default.workspace_pvc, default.workspace_mount, optional=False,
                           help="ReadWriteMany claim with the data and for the model, as in compile and submit "
                           "(default: %(default)s)")
    p.add_argument("--data-dir", default=None, metavar="PATH",
                   help="preprocessed dataset in the pod (default: WORKSPACE_MOUNT/processed/DATASET)")
    p.add_argument("--out-dir", default=None, metavar="PATH",
                   help="checkpoints in the pod (default: WORKSPACE_MOUNT/models/NAME)")
    p.add_argument("--namespace", type=_checked(trainjob.check_namespace, "--namespace"), default=None,
                   help="namespace of the job (default: kubectl's)")
    p.add_argument("--name", type=_checked(trainjob.check_name, "--name"), default=None,
                   help="job name, a DNS label (default: unet3plus-DATASET)")
    p.add_argument("--cpu", type=_checked(trainjob.check_quantity, "--cpu"), default=default.cpu,
                   help="CPU request per node (default: %(default)s)")
    p.add_argument("--memory", type=_checked(trainjob.check_quantity, "--memory"), default=default.memory,
                   help="memory request and limit per node (default: %(default)s)")
    p.add_argument("--deadline", type=_positive("--deadline"), default=default.deadline_seconds, metavar="SECONDS",
                   help="activeDeadlineSeconds of the job (default: %(default)s)")
    p.add_argument("--output", type=Path, default=None, metavar="FILE", help="write here (default: stdout)")
    p.add_argument("--force", action="store_true", help="replace --output even if unet3plus did not write it")
    _add_kubernetes_options(p.add_argument_group("pods"), ClusterSettings())
    p.set_defaults(func=cmd_trainjob)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
    except trainjob.SettingError as err:
        parser.exit(2, f"error: {err}\n")
    # Imported after checking: importing unet3plus imports torch, and --help should stay instant.
    from unet3plus.cli import run_parsed

    return run_parsed(args)


if __name__ == "__main__":
    sys.exit(main())
