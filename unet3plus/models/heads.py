"""Output heads: per-pixel segmentation logits and the classification-guided module (CGM)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SegmentationHead(nn.Module):
    """Convolution to ``num_classes`` logits, bilinearly up-sampled to the requested size.

    One head per supervised decoder map: the final prediction and, with deep supervision, each
    side output (UNet 3+: 3x3 conv on ``hd1 .. hd5``, as the paper).

    Args:
        in_channels: channels of the decoder map.
        num_classes: output channels (1 for a single organ).
        kernel_size: 3 for UNet and UNet 3+, 1 for UNet++ (as the official code).

    Shapes:
        ``(B, in_channels, h, w) -> (B, num_classes, *size)``.
    """

    def __init__(self, in_channels: int, num_classes: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size, padding=kernel_size // 2)
        # Xavier keeps the initial logits of order 1 (Kaiming fan-out on a 320 -> 1 conv gives
        # logits in the tens, a saturated sigmoid at step 0).
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        logits = self.conv(x)
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


class ClassificationGuidedModule(nn.Module):
    """The paper's CGM: does the slice contain the organ? Logits, no sigmoid.

    On the deepest encoder map: dropout (0.5), 1x1 conv to 2 channels, global max-pool. Class
    index 1 means "organ present". It is trained with BCE against the organ-present flag (see
    :class:`unet3plus.losses.Criterion`); at inference :func:`unet3plus.models.predict_proba`
    multiplies the segmentation probabilities by its argmax.

    Args:
        in_channels: channels of the deepest encoder map.
        dropout: dropout probability (the paper's 0.5).

    Shapes:
        ``(B, in_channels, h, w) -> (B, 2)``.
    """

    def __init__(self, in_channels: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        self.conv = nn.Conv2d(in_channels, 2, kernel_size=1)
        self.pool = nn.AdaptiveMaxPool2d(1)
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, deepest: Tensor) -> Tensor:
        return self.pool(self.conv(self.dropout(deepest))).flatten(1)
