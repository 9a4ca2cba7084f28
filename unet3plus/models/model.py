"""The segmentation model: encoder -> decoder -> heads (+ CGM), and the public builders.

UNet, UNet++ and UNet 3+ share :class:`SegmentationModel` and differ only in the decoder.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from unet3plus.models.blocks import SKIP_IMPLS
from unet3plus.models.decoders import FullScaleDecoder, NestedDecoder, UNetDecoder
from unet3plus.models.encoders import create_encoder
from unet3plus.models.heads import ClassificationGuidedModule, SegmentationHead

# arch -> (decoder class, segmentation head kernel size as in the official code)
ARCHITECTURES: dict[str, tuple[type[nn.Module], int]] = {
    "unet": (UNetDecoder, 3),
    "unet2plus": (NestedDecoder, 1),
    "unet3plus": (FullScaleDecoder, 3),
}

# Four 2x down-samplings between the five levels.
SIZE_DIVISOR = 16
# CUDA's channels_last bilinear up-sampling refuses outputs of INT_MAX elements or more
# ("upsample_bilinear2d_nhwc only supports output tensors with less than INT_MAX elements").
INT_MAX = 2**31 - 1


class SegmentationOutput(NamedTuple):
    """What every model's forward returns, in train and eval mode alike (logits, never probabilities).

    Attributes:
        logits: (B, C, H, W) the final map, at input size.
        side_logits: every supervised map at input size, final first (so ``side_logits[0] is
            logits``); just ``(logits,)`` without deep supervision.
        class_logits: (B, 2) CGM logits (index 1 = organ present), or None without CGM.
    """

    logits: Tensor
    side_logits: tuple[Tensor, ...]
    class_logits: Tensor | None


class _LargestUpsample(TorchDispatchMode):
    """Records the largest output (in elements) of any up-sampling op run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith("upsample"):
            self.largest = max(self.largest, out.numel())
        return out


class SegmentationModel(nn.Module):
    """Encoder -> decoder -> segmentation heads, plus the optional CGM on the deepest encoder map.

    Inputs of any height and width work: the input is zero-padded at the bottom and right to
    multiples of 16 and every output is cropped back. Zero is the windowed CT background (air
    is below the HU window), so padding adds background rather than mirrored anatomy, and it
    works for any size (reflection needs the pad to be smaller than the image).

    The CGM gate is not applied in forward: forward returns the raw segmentation logits and
    the CGM's logits side by side, the segmentation loss sees every slice, and the CGM learns
    from its own BCE term. Gating inside the loss would make the segmentation loss a
    non-differentiable function of the classifier (argmax) and would zero every segmentation
    gradient on slices the CGM misclassifies as empty, exactly the slices the segmenter must
    learn. The gate is applied at inference by :func:`predict_proba`.

    In eval mode a batch is run in parts small enough that no up-sampling output reaches
    ``max_upsample_elements`` (default ``INT_MAX``, the limit of CUDA's channels_last bilinear
    kernel): a 320 x 320 batch of 32 would need 3.4e9 elements for the naive UNet 3+'s 16x
    up-sampling of 1024 channels. Eval-mode batch norm and dropout treat every image alone, so
    the parts give exactly the whole batch's result; training batches are never split, nor are
    batches under ``torch.compile`` / ``torch.export`` tracing.

    ``decode_present_only`` (default False; :func:`unet3plus.models.inference.inference_network`
    sets it) is an inference mode for models with a CGM: in eval mode the CGM runs right after the
    encoder and the decoder and heads run only on the slices it finds the organ in; the logits of
    the other slices are ``-inf``. :func:`predict_proba` gates those slices to exactly 0 anyway,
    so its output is unchanged, while the decoder (most of UNet 3+'s work) is skipped wherever
    the CGM says "no organ". Ungated logits of such slices are then not available (ablations of
    the gate use the model without it).

    Args:
        encoder: a module from :func:`unet3plus.models.encoders.create_encoder`.
        decoder: a decoder built on ``encoder.out_channels``.
        num_classes: channels of the logits.
        head_kernel_size: kernel of the segmentation heads.
        deep_supervision: one head per decoder output map (else one head on the final map).
        cgm: add the classification-guided module.
        in_channels: channels the input must have.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        *,
        num_classes: int,
        head_kernel_size: int,
        deep_supervision: bool,
        cgm: bool,
        in_channels: int,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.encoder = encoder
        self.decoder = decoder
        supervised = decoder.out_channels if deep_supervision else decoder.out_channels[:1]
        self.heads = nn.ModuleList(SegmentationHead(c, num_classes, head_kernel_size) for c in supervised)
        self.cgm = ClassificationGuidedModule(encoder.out_channels[-1]) if cgm else None
        self.max_upsample_elements = INT_MAX
        self.decode_present_only = False
        self._upsample_elements: dict[tuple[int, int], int] = {}
        self._widest = max(in_channels, *(m.out_channels for m in self.modules() if isinstance(m, nn.Conv2d)))

    def upsample_elements_bound(self, height: int, width: int) -> int:
        """A free upper bound of :meth:`upsample_elements_per_image`: every up-sampled map is a
        convolution's output (at most the widest convolution's channels) no larger than the padded
        input. Batches under ``max_upsample_elements`` by this bound skip the measurement."""
        padded = (height + -height % SIZE_DIVISOR) * (width + -width % SIZE_DIVISOR)
        return self._widest * padded

    def upsample_elements_per_image(self, height: int, width: int) -> int:
        """Elements of the largest up-sampling output for one ``height x width`` image.

        Measured once per size by running the model on the meta device (no memory, no compute)
        and recording every up-sampling op's output.
        """
        if (height, width) not in self._upsample_elements:
            meta_state = {
                name: torch.empty_like(tensor, device="meta")
                for name, tensor in (*self.named_parameters(), *self.named_buffers())
            }
            image = torch.empty(1, self.in_channels, height, width, device="meta", dtype=meta_state[next(iter(meta_state))].dtype)
            with torch.no_grad(), _LargestUpsample() as watch:
                functional_call(self, meta_state, (image,))
            self._upsample_elements[height, width] = watch.largest
        return self._upsample_elements[height, width]

    def forward(self, x: Tensor) -> SegmentationOutput:
        """Segment a batch.

        Args:
            x: (B, in_channels, H, W) images, any H, W >= 1.

        Returns:
            :class:`SegmentationOutput` with logits and side logits (B, num_classes, H, W) and
            class logits (B, 2) or None.

        Raises:
            ValueError: ``x`` is not 4-D, has the wrong number of channels or an empty side.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-1] == 0 or x.shape[-2] == 0:
            raise ValueError(
                f"expected an input of shape (B, {self.in_channels}, H, W) with H, W >= 1 "
                f"({self.in_channels} channels), got {tuple(x.shape)}"
            )
        splittable = not self.training and not torch.compiler.is_compiling() and x.device.type != "meta"
        if splittable and x.shape[0] * self.upsample_elements_bound(*x.shape[-2:]) > self.max_upsample_elements:
            per_image = self.upsample_elements_per_image(*x.shape[-2:])
            part_size = max(1, self.max_upsample_elements // max(per_image, 1))
            if x.shape[0] > part_size:
                parts = [self._segment(part) for part in x.split(part_size)]
                logits = torch.cat([part.logits for part in parts])
                sides = tuple(torch.cat(side) for side in zip(*(part.side_logits[1:] for part in parts)))
                class_logits = None if parts[0].class_logits is None else torch.cat([p.class_logits for p in parts])
                return SegmentationOutput(logits, (logits, *sides), class_logits)
        return self._segment(x)

    def _segment(self, x: Tensor) -> SegmentationOutput:
        height, width = x.shape[-2:]
        pad_bottom, pad_right = -height % SIZE_DIVISOR, -width % SIZE_DIVISOR
        if pad_bottom or pad_right:
            x = F.pad(x, (0, pad_right, 0, pad_bottom))
        features = self.encoder(x)
        size = tuple(x.shape[-2:])
        class_logits = None
        if self.decode_present_only and self.cgm is not None and not self.training and x.device.type != "meta":
            class_logits = self.cgm(features[-1])
            present = (class_logits.argmax(dim=1) == 1).nonzero().flatten()
            if len(present) < len(x):
                return self._segment_present(features, present, size, (height, width), class_logits)
        maps = self.decoder(features)
        side_logits = tuple(head(m, size)[..., :height, :width] for head, m in zip(self.heads, maps))
        # Training runs the CGM after the decoder: the order in which autograd sums the deepest features'
        # gradients follows it, and with it the trained weights' last bits (runs stay bit-identical across versions).
        if class_logits is None and self.cgm is not None:
            class_logits = self.cgm(features[-1])
        return SegmentationOutput(side_logits[0], side_logits, class_logits)

    def _segment_present(
        self, features: list[Tensor], present: Tensor, size: tuple[int, int], crop: tuple[int, int],
        class_logits: Tensor,
    ) -> SegmentationOutput:
        """Decode only the images ``present`` (indices into the batch), cropped to ``crop``; ``-inf`` logits for the
        others."""
        batch, (height, width) = len(class_logits), crop
        side_logits = [
            features[0].new_full((batch, head.conv.out_channels, height, width), float("-inf")) for head in self.heads
        ]
        if len(present):
            maps = self.decoder([feature[present] for feature in features])  # keeps channels_last
            for logits, head, m in zip(side_logits, self.heads, maps):
                logits[present] = head(m, size)[..., :height, :width]
        return SegmentationOutput(side_logits[0], tuple(side_logits), class_logits)


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} = {value!r} is invalid: expected an integer >= 1")


def create_model(
    arch: str,
    *,
    encoder: str = "unet",
    encoder_weights: str | os.PathLike | None = None,
    deep_supervision: bool = True,
    cgm: bool = True,
    in_channels: int = 3,
    num_classes: int = 1,
    width: int = 64,
    skip_impl: str = "auto",
) -> SegmentationModel:
    """Build UNet, UNet++ or UNet 3+ (keywords are the fields of :class:`unet3plus.config.ModelConfig`).

    Side outputs with ``deep_supervision=True`` (final first):

    - ``"unet3plus"``: 5, from ``hd1 .. hd5`` (the paper's full-scale deep supervision);
    - ``"unet2plus"``: 4, from the nested nodes ``X(0,4) .. X(0,1)``;
    - ``"unet"``: 5, from the decoder maps ``d1 .. d4`` and the deepest encoder map, the same
      levels UNet 3+ supervises (plain UNet has no deep supervision; the paper's UNet runs use
      ``deep_supervision=False``).

    With width 64 and the ``"unet"`` encoder the parameter counts match the paper (UNet 39.39 M,
    UNet++ 47.18 M, UNet 3+ 26.97 M without deep supervision and CGM) within 0.005 M.

    Args:
        arch: ``"unet"``, ``"unet2plus"`` (UNet++) or ``"unet3plus"``.
        encoder: ``"unet"`` (plain two-conv stages, the paper's "VGG-16" column), ``"vgg16"``
            (torchvision ``vgg16_bn`` features) or ``"resnet101"`` (torchvision ResNet-101).
        encoder_weights: local torchvision ``state_dict`` file for ``"vgg16"`` / ``"resnet101"``
            (needs width 64, 3 input channels), or None for random initialisation. Nothing is
            ever downloaded.
        deep_supervision: return one side output per supervised decoder level.
        cgm: add the classification-guided module (``class_logits``).
        in_channels: input channels (3: previous, current and next slice).
        num_classes: logit channels.
        width: channels of the first encoder stage; all channel counts scale with it.
        skip_impl: how UNet 3+'s full-scale skips from deeper maps compute "bilinear
            up-sampling, then 3x3 convolution": ``"naive"`` as written, ``"factored"`` with the
            convolution's channel mixing applied before up-sampling (the same function, up to
            float rounding; 340.6 instead of 617.7 forward GFLOPs per 320x320 image), or
            ``"auto"`` (default): per skip, whichever measured faster
            (:func:`unet3plus.models.blocks.resolve_skip_impl` has the rule and the numbers). A
            forward-only choice: parameters and ``state_dict`` keys are the same for all three,
            so checkpoints move freely between them. Ignored by UNet and UNet++.

    Returns:
        A :class:`SegmentationModel` in train mode whose forward returns
        :class:`SegmentationOutput`.

    Raises:
        ValueError: unknown ``arch``, ``encoder`` or ``skip_impl`` (listing the valid ones), a non-bool flag, a
            non-positive size, or weights for an encoder without a torchvision layout.
        CheckpointError: ``encoder_weights`` missing, unreadable or mismatched.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(map(repr, ARCHITECTURES))}")
    for name, flag in (("deep_supervision", deep_supervision), ("cgm", cgm)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} = {flag!r} is invalid: expected True or False")
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width)):
        _check_positive_int(name, value)
    if skip_impl not in SKIP_IMPLS:
        raise ValueError(f"unknown skip_impl {skip_impl!r}; valid values: {', '.join(map(repr, SKIP_IMPLS))}")
    encoder_module = create_encoder(encoder, in_channels=in_channels, width=width, weights=encoder_weights)
    decoder_class, head_kernel_size = ARCHITECTURES[arch]
    decoder_options = {"skip_impl": skip_impl} if decoder_class is FullScaleDecoder else {}
    return SegmentationModel(
        encoder_module,
        decoder_class(encoder_module.out_channels, **decoder_options),
        num_classes=num_classes,
        head_kernel_size=head_kernel_size,
        deep_supervision=deep_supervision,
        cgm=cgm,
        in_channels=in_channels,
    )


@torch.no_grad()
def predict_proba(model: nn.Module, x: Tensor, *, gate: bool = True) -> Tensor:
    """Probabilities of the final map, gated by the CGM when the model has one.

    ``sigmoid(logits)``, then, if ``gate`` and the model returns ``class_logits``, multiplied by
    the CGM's argmax (1 = organ present), so a slice judged organ-free gets exactly 0
    everywhere (the official code gates the logits, which gives 0.5). Runs without gradients
    and does not change the model's mode: call ``model.eval()`` first for inference.

    Args:
        model: a model from :func:`create_model` (or anything returning
            :class:`SegmentationOutput`).
        x: (B, in_channels, H, W) images.
        gate: apply the CGM gate (False gives the ungated probabilities, for ablations).

    Returns:
        (B, num_classes, H, W) float32 probabilities in [0, 1].

    Raises:
        ValueError: as the model's forward for a badly shaped ``x``.
    """
    output = model(x)
    probabilities = torch.sigmoid(output.logits.float())
    if gate and output.class_logits is not None:
        present = output.class_logits.argmax(dim=1) == 1
        probabilities = torch.where(present[:, None, None, None], probabilities, 0.0)
    return probabilities
