"""UNet 3+ (Huang et al., ICASSP 2020) for liver and spleen CT segmentation.

The model names below load PyTorch on first use, so the commands that never touch a network
(synth, validate, preprocess, report) start without it.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_MODEL_NAMES = ("SegmentationOutput", "create_model", "predict_proba")
__all__ = [*_MODEL_NAMES, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _MODEL_NAMES:
        from unet3plus import models

        return getattr(models, name)
    raise AttributeError(f"module 'unet3plus' has no attribute {name!r}")
