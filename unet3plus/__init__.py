"""UNet 3+ (Huang et al., ICASSP 2020) for liver and spleen CT segmentation.

The model names below load PyTorch on first use, so the commands that never touch a network
(synth, validate, preprocess, report) start without it.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["SegmentationOutput", "__version__", "create_model", "predict_proba"]


def __getattr__(name: str) -> Any:
    if name in ("SegmentationOutput", "create_model", "predict_proba"):
        from unet3plus import models

        return getattr(models, name)
    raise AttributeError(f"module 'unet3plus' has no attribute {name!r}")
