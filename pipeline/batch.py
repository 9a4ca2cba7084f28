"""The batch-inference pipeline: the champion segments every scan of a folder on a volume.

    python -m pipeline.batch compile --output unet3plus_batch_predict.yaml [--gpu] [--pvc unet3plus-workspace]

One step, :func:`components.batch_predict.batch_predict`, in the project's image, with the
MLflow secret (to reach the registry), the claim ``--pvc`` mounted at ``--mount`` (the scans are
read from and the masks written to paths on it, given as run arguments) and, with ``--gpu``, one
GPU on a GPU node (it then refuses to fall back to the CPU). The cluster settings are those of the
training pipeline (:class:`pipeline.pipeline.ClusterSettings`, :func:`pipeline.pipeline.on_cluster`):
batch inference uses the evaluation step's resources and retries.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components.batch_predict import batch_predict
from pipeline.pipeline import ClusterSettings, on_cluster

PIPELINE_NAME = "unet3plus-batch-predict"
DEFAULT_OUTPUT = Path("unet3plus_batch_predict.yaml")


DEFAULT_PVC = "unet3plus-workspace"
DEFAULT_CLUSTER = ClusterSettings(workspace_pvc=DEFAULT_PVC)
"""The training pipeline's settings with a claim: the batch step always reads the scans from one (the training
pipeline's default has none, and mounting ``None`` failed at compile time)."""


def build_batch_pipeline(cluster: ClusterSettings = DEFAULT_CLUSTER, gpu: bool = False) -> dsl.graph_component.GraphComponent:
    """The batch-inference pipeline with ``cluster`` settings; ``cluster.workspace_pvc`` holds the scans.

    Args:
        cluster: Kubernetes settings (secret, resources, GPU type, node selector, toleration).
        gpu: run on a GPU node with ``cluster.gpus`` GPUs.
    """

    @dsl.pipeline(name=PIPELINE_NAME, description="Segment every CT scan of a folder on a volume with a registered model.")
    def batch_pipeline(
        params: str,
        input_dir: str,
        output_dir: str,
        model_uri: str = "models:/unet3plus-liver@champion",
        allow_failures: bool = False,
    ):
        task = batch_predict(params=params, input_dir=input_dir, output_dir=output_dir, model_uri=model_uri,
                             allow_failures=allow_failures)
        task.set_display_name("batch-predict")
        on_cluster(task, cluster, "evaluate", gpus=cluster.gpus if gpu else 0, mlflow=True)
        task.set_caching_options(False)  # the registry's champion and the folder change under the same arguments
        kubernetes.mount_pvc(task, cluster.workspace_pvc, cluster.workspace_mount)

    return batch_pipeline


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.batch compile``: write the batch pipeline's IR YAML."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.batch", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    compile_parser = verbs.add_parser("compile", help="write the batch-inference pipeline's IR YAML")
    compile_parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"(default {DEFAULT_OUTPUT})")
    compile_parser.add_argument("--gpu", action="store_true", help="run on a GPU node (one GPU)")
    compile_parser.add_argument("--pvc", default=DEFAULT_PVC,
                                help="claim holding the scans and receiving the masks (default %(default)s)")
    compile_parser.add_argument("--mount", default=DEFAULT_CLUSTER.workspace_mount,
                                help="where it is mounted; input_dir and output_dir are paths under it (default %(default)s)")
    compile_parser.add_argument("--mlflow-secret", default=ClusterSettings.mlflow_secret,
                                help="secret with MLFLOW_TRACKING_URI (and credentials) (default %(default)s)")
    args = parser.parse_args(argv)
    cluster = dataclasses.replace(DEFAULT_CLUSTER, workspace_pvc=args.pvc, workspace_mount=args.mount,
                                  mlflow_secret=args.mlflow_secret)  # fmt: skip
    compiler.Compiler().compile(build_batch_pipeline(cluster, gpu=args.gpu), str(args.output))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
