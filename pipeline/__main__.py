"""``python -m pipeline compile`` writes the pipeline's IR YAML; ``python -m pipeline submit`` runs it on a cluster.

Both take the same cluster options (GPU node selector and toleration, MLflow secret, data volume).
Errors the user can fix are printed as one paragraph with exit status 2, as by the ``unet3plus`` CLI.
"""

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from components.common import DEFAULT_IMAGE
from pipeline.pipeline import PIPELINE_NAME, ClusterSettings, build_pipeline

logger = logging.getLogger("pipeline")

DEFAULT_OUTPUT = Path("unet3plus_pipeline.yaml")


def _node_label(text: str) -> Optional[tuple]:
    """``LABEL=VALUE`` -> ``(LABEL, VALUE)``; ``""`` -> None (no node selector)."""
    if not text:
        return None
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=VALUE, e.g. nvidia.com/gpu.present=true")
    return key, value


def cluster_settings(args: argparse.Namespace) -> ClusterSettings:
    """The :class:`ClusterSettings` chosen on the command line (empty strings turn optional settings off)."""
    return ClusterSettings(
        gpu_type=args.gpu_type,
        gpus=args.gpus,
        gpu_node_selector=args.gpu_node_selector or None,
        gpu_toleration=args.gpu_toleration or None,
        shm_size=args.shm_size,
        mlflow_secret=args.mlflow_secret or None,
        data_pvc=args.data_pvc or None,
        data_mount=args.data_mount,
    )


def compile_pipeline(output: Path, cluster: ClusterSettings) -> Path:
    """Compile the pipeline to ``output`` (IR YAML), atomically.

    Returns:
        ``output``.
    """
    from kfp import compiler

    from unet3plus.utils import atomic_path

    with atomic_path(output) as tmp:
        compiler.Compiler().compile(build_pipeline(cluster), str(tmp))
    return output


def run_arguments(params_path: Optional[Path], overrides: List[str], dataset: str, source_dir: str) -> Dict[str, Any]:
    """The arguments of a run, checked here before anything is sent to the cluster.

    The parameters file with ``--set`` overrides applied becomes the ``params`` argument; its
    ``ablations`` section becomes the ``ablations`` argument instead (overrides as
    ``section.key=value`` strings).

    Raises:
        ConfigError: the parameters file is missing or invalid, or an override is.
    """
    from components.common import layout_of
    from unet3plus.config import load_config

    layout_of(dataset)
    config = load_config(params_path, overrides)
    raw = json.loads(json.dumps(config.to_dict()))  # tuples -> lists, for YAML
    del raw["ablations"]
    # JSON is YAML, so json.dumps writes each value as apply_overrides reads it back.
    ablations = [
        {"name": ablation.name,
         "overrides": [f"{key}={json.dumps(value)}" for key, value in ablation.overrides.items()]}
        for ablation in config.ablations.selected()
    ]
    return {"params": yaml.safe_dump(raw, sort_keys=False), "dataset": dataset, "ablations": ablations,
            "source_dir": source_dir}


def cmd_compile(args: argparse.Namespace) -> None:
    path = compile_pipeline(args.output, cluster_settings(args))
    logger.info("pipeline %r compiled to %s", PIPELINE_NAME, path)


def cmd_submit(args: argparse.Namespace) -> None:
    import kfp
    import kfp_server_api
    import urllib3

    from unet3plus.errors import UserError

    params = args.params
    if params is None and Path("params.yaml").is_file():
        params = Path("params.yaml")
    arguments = run_arguments(params, args.overrides, args.dataset, args.source_dir)
    client = kfp.Client(host=args.host, namespace=args.namespace or "kubeflow")
    try:
        result = client.create_run_from_pipeline_func(
            build_pipeline(cluster_settings(args)),
            arguments=arguments,
            run_name=args.run_name,
            experiment_name=args.experiment,
            namespace=args.namespace,
        )
    except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError) as err:
        raise UserError(f"{args.host}: Kubeflow Pipelines refused or could not be reached ({err}); check --host, "
                        "--namespace and that you are logged in") from err
    logger.info("submitted run %s (%d ablations) to %s", result.run_id, len(arguments["ablations"]), args.host)


def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    default = ClusterSettings()
    group = parser.add_argument_group(
        "cluster settings",
        "Compiled into the pipeline. An empty --gpu-node-selector, --gpu-toleration or --mlflow-secret turns that "
        "setting off.",
    )
    group.add_argument("--gpu-type", default=default.gpu_type,
                       help="accelerator resource of training pods (default: %(default)s)")
    group.add_argument("--gpus", type=int, default=default.gpus,
                       help="accelerators per training pod (default: %(default)s)")
    group.add_argument("--gpu-node-selector", type=_node_label, default=default.gpu_node_selector,
                       metavar="LABEL=VALUE",
                       help="node label training pods must match (default: %s)" % "=".join(default.gpu_node_selector))
    group.add_argument("--gpu-toleration", default=default.gpu_toleration, metavar="TAINT_KEY",
                       help="taint key of GPU nodes that training pods tolerate (default: %(default)s)")
    group.add_argument("--shm-size", default=default.shm_size,
                       help="in-memory /dev/shm of training pods, for DataLoader workers (default: %(default)s)")
    group.add_argument("--mlflow-secret", default=default.mlflow_secret, metavar="SECRET",
                       help="Kubernetes secret with key MLFLOW_TRACKING_URI (and optionally MLFLOW_TRACKING_USERNAME, "
                       "MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN) for the tracking pods (default: %(default)s)")
    group.add_argument("--data-pvc", default=None, metavar="CLAIM",
                       help="PersistentVolumeClaim mounted on the raw-data step (default: none)")
    group.add_argument("--data-mount", default=default.data_mount, metavar="PATH",
                       help="where --data-pvc is mounted (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    p.add_argument("--run-name", default=None, help="run name (default: pipeline name and time)")
    p.add_argument("--namespace", default=None, help="Kubernetes namespace of a multi-user deployment")
    _add_cluster_options(p)
    p.set_defaults(func=cmd_submit)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after parsing: importing unet3plus imports torch, and --help should stay instant.
    from unet3plus.cli import run_parsed

    return run_parsed(args)


if __name__ == "__main__":
    sys.exit(main())
