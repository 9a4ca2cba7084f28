"""Inference form of a trained network: the same function, fewer operations.

:func:`inference_network` turns an eval-mode :class:`~unet3plus.models.SegmentationModel` into
the network :mod:`unet3plus.predict` (and so the registered MLflow model) runs:

- every batch norm is folded into the convolution before it (``torch.nn.utils.fusion``): in eval
  mode a batch norm is a per-channel affine map, so ``bn(conv(x))`` is one convolution with
  scaled weights and a bias; equal up to float rounding (about 1e-7 relative in float32);
- the deep-supervision side heads are dropped: inference reads only the final map (and the CGM),
  so computing and up-sampling four more maps per slice was pure waste;
- with a CGM, the decoder runs only on the slices the CGM finds the organ in
  (:attr:`~unet3plus.models.SegmentationModel.decode_present_only`): the others' probabilities
  are gated to exactly 0 whatever the decoder says, and the decoder is most of the work (86% of
  the paper model's forward at 320 px: its full-resolution 320-channel fusion convolution alone
  is 55%), so a volume costs about ``encoder + present fraction x decoder``;
- the weights are laid out ``channels_last``, the layout the CPU's (oneDNN) and CUDA's (cuDNN)
  convolution kernels run fastest: on this project's CPU, the folded default model (batch 16,
  1 thread, 6 interleaved rounds) took 0.39-1.08 s per batch channels_last against 0.85-1.73 s
  contiguous, a median per-round ratio of 1.9x; the paper's model (ResNet-101, width 64, 320 px)
  1.01-1.38x per round (``benchmarks/RESULTS.md``).

Parameters of the original model are never modified: the inference network is a copy.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

INFERENCE_MEMORY_FORMAT = torch.channels_last
"""Layout of the inference network's weights and input batches, on every device (measured fastest)."""


def _conv_bn_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """Names of (convolution, batch norm) children of ``parent`` where the norm directly follows the conv.

    Two patterns cover every model of this package: consecutive children of an ``nn.Sequential``
    (``ConvBNReLU``, VGG ``features``, ResNet ``downsample``) and ``conv<N>`` / ``bn<N>`` attribute
    pairs whose forward applies ``bn<N>(conv<N>(x))`` (torchvision's ``Bottleneck`` and ResNet stem).
    """
    children = dict(parent.named_children())
    if isinstance(parent, nn.Sequential):
        names = list(children)
        candidates = list(itertools.pairwise(names))
    else:
        candidates = [(name, "bn" + name[len("conv"):]) for name in children if name.startswith("conv")]
    return [
        (conv, norm) for conv, norm in candidates
        if type(children.get(conv)) is nn.Conv2d and type(children.get(norm)) is nn.BatchNorm2d
    ]  # fmt: skip


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold every eval-mode batch norm into the convolution before it, in place.

    The convolution gets the folded weights and bias, the batch norm becomes ``nn.Identity``; the
    module's forward is unchanged up to float rounding.

    Args:
        model: a module in eval mode (training-mode batch norm uses batch statistics, which
            cannot be folded).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: ``model`` is in training mode.
    """
    if model.training:
        raise ValueError("fold_batch_norms needs a model in eval mode (call model.eval() first)")
    for parent in list(model.modules()):
        for conv_name, norm_name in _conv_bn_pairs(parent):
            folded = fuse_conv_bn_eval(getattr(parent, conv_name), getattr(parent, norm_name))
            setattr(parent, conv_name, folded)
            setattr(parent, norm_name, nn.Identity())
    return model


def inference_network(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode for inference: batch norms folded, side heads dropped, channels_last.

    Its forward returns the same :class:`~unet3plus.models.SegmentationOutput` (``logits`` and
    ``class_logits`` equal the original's up to float rounding; ``side_logits`` is just
    ``(logits,)``), so :func:`unet3plus.models.predict_proba` works on it unchanged. With a CGM,
    slices it gates off are not decoded (their ``logits`` are ``-inf``): gated probabilities are
    the original's, ungated ones (``gate=False``) are not, so ablations of the gate use ``model``.
    """
    network = copy.deepcopy(model).eval()
    if isinstance(getattr(network, "heads", None), nn.ModuleList):
        network.heads = network.heads[:1]
    if hasattr(network, "decode_present_only"):
        network.decode_present_only = True
    fold_batch_norms(network)
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network.to(memory_format=INFERENCE_MEMORY_FORMAT)


def randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm of ``model`` seeded, non-trivial statistics and affine parameters, in place.

    A fresh batch norm (mean 0, variance 1, weight 1, bias 0) folds to the identity, so tests and
    benchmarks of the inference network need these "trained-looking" ones to check anything:
    running mean in [-0.3, 0.3], variance in [0.5, 2], weight in [0.5, 1.5], bias in [-0.2, 0.2].

    Returns:
        ``model`` itself.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.3, 0.3, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.2, 0.2, generator=generator)
    return model
