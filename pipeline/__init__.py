"""The Kubeflow pipeline of unet3plus: ``python -m pipeline compile`` and ``python -m pipeline submit``."""

from pipeline.pipeline import (
    PIPELINE_NAME,
    ClusterSettings,
    build_pipeline,
    on_cluster,
    unet3plus_pipeline,
)

__all__ = [
    "PIPELINE_NAME", "ClusterSettings", "build_pipeline", "on_cluster", "unet3plus_pipeline",
]
