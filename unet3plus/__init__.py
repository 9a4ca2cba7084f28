"""UNet 3+ (Huang et al., ICASSP 2020) for liver and spleen CT segmentation."""

from unet3plus.models import SegmentationOutput, create_model, predict_proba

__version__ = "0.1.0"

__all__ = ["SegmentationOutput", "__version__", "create_model", "predict_proba"]
