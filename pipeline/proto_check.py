"""Parse a compiled pipeline with another release's protobuf definitions; a script, run by :mod:`pipeline.backend`.

``python -I -S pipeline/proto_check.py PROTO_DIR < documents.json`` reads the compiled YAML's
documents (as a JSON list: the pipeline spec, then the platform spec if any) and parses them with
the ``kfp-pipeline-spec`` and ``kfp-kubernetes`` messages installed in ``PROTO_DIR``, refusing
unknown fields as the backend's driver does (Go ``protojson``). It prints a JSON list of the
problems (empty when the backend of that release can read everything) and exits 0.

It imports nothing of this project nor of the caller's environment (``-I -S``): ``PROTO_DIR``
alone provides protobuf and the messages, so the definitions are exactly those of the pinned
release, whatever the installed ``kfp`` is.
"""

import importlib.util
import json
import sys


def main(proto_dir: str) -> list:
    sys.path.insert(0, proto_dir)
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    # kfp/kubernetes/__init__.py imports the kfp SDK; only the generated messages are wanted.
    spec = importlib.util.spec_from_file_location(
        "kubernetes_executor_config_pb2", f"{proto_dir}/kfp/kubernetes/kubernetes_executor_config_pb2.py")
    kubernetes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kubernetes)

    def parse(document: dict, message, where: str) -> None:
        try:
            json_format.ParseDict(document, message, ignore_unknown_fields=False)
        except json_format.ParseError as err:
            problems.append(f"{where}: {err}")

    problems: list = []
    documents = json.load(sys.stdin)
    parse(documents[0], pipeline_spec_pb2.PipelineSpec(), "pipeline spec")
    # The driver reads the deployment config of the spec and each executor's Kubernetes settings.
    parse(documents[0].get("deploymentSpec", {}), pipeline_spec_pb2.PipelineDeploymentConfig(), "deploymentSpec")
    for platform_spec in documents[1:]:
        parse(platform_spec, pipeline_spec_pb2.PlatformSpec(), "platform spec")
        kubernetes_spec = platform_spec.get("platforms", {}).get("kubernetes", {})
        for name, executor in kubernetes_spec.get("deploymentSpec", {}).get("executors", {}).items():
            parse(executor, kubernetes.KubernetesExecutorConfig(), f"platform spec: {name}")
    return problems


if __name__ == "__main__":
    json.dump(main(sys.argv[1]), sys.stdout)
