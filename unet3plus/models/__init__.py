"""UNet, UNet++ and UNet 3+ with interchangeable encoders, deep supervision and the CGM."""

from unet3plus.models.encoders import ENCODERS, create_encoder
from unet3plus.models.model import ARCHITECTURES, SegmentationModel, SegmentationOutput, create_model, predict_proba

__all__ = [
    "ARCHITECTURES",
    "ENCODERS",
    "SegmentationModel",
    "SegmentationOutput",
    "create_encoder",
    "create_model",
    "predict_proba",
]
