"""Losses: checked against torchvision and pytorch_msssim, float64 gradcheck and hand-computed cases."""

import dataclasses
import math

import pytest
import torch
import torchvision
from pytorch_msssim import ms_ssim as reference_ms_ssim
from pytorch_msssim import ssim as reference_ssim

from unet3plus.config import LossConfig
from unet3plus.losses import MS_SSIM_WEIGHTS, Criterion, cgm_loss, focal_loss, iou_loss, ms_ssim, ms_ssim_loss
from unet3plus.models import SegmentationOutput, create_model


def random_logits_and_mask(*shape, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(*shape, generator=generator, dtype=dtype)
    mask = (torch.rand(*shape, generator=generator, dtype=dtype) > 0.7).to(dtype)
    return logits, mask


def correlated_images(*shape, seed=0, noise=0.05, dtype=torch.float32):
    """x uniform in [0, 1] and y = x + noise, clipped: MS-SSIM well above 0."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=generator, dtype=dtype)
    return x, (x + noise * torch.randn(*shape, generator=generator, dtype=dtype)).clamp(0, 1)


def probability_logits(probabilities):
    """Logits whose sigmoid is the given probabilities (0 -> -inf -> exactly 0)."""
    return torch.logit(torch.tensor(probabilities, dtype=torch.float64))


def make_output(sides, class_logits=None):
    return SegmentationOutput(logits=sides[0], side_logits=tuple(sides), class_logits=class_logits)


# ---------------------------------------------------------------- focal


@pytest.mark.parametrize(
    ("alpha", "gamma"), [(0.25, 2.0), (0.5, 0.0), (0.9, 1.0), (0.0, 3.5), (-1.0, 2.0), (-1.0, 0.5)]
)
def test_focal_equals_torchvision(alpha, gamma):
    logits, mask = random_logits_and_mask(2, 1, 16, 16)
    expected = torchvision.ops.sigmoid_focal_loss(logits, mask, alpha=alpha, gamma=gamma, reduction="mean")
    torch.testing.assert_close(focal_loss(logits, mask, alpha=alpha, gamma=gamma), expected, rtol=1e-6, atol=1e-7)


def test_focal_any_negative_alpha_disables_weighting():
    logits, mask = random_logits_and_mask(2, 1, 8, 8)
    expected = torchvision.ops.sigmoid_focal_loss(logits, mask, alpha=-1, gamma=2.0, reduction="mean")
    torch.testing.assert_close(focal_loss(logits, mask, alpha=-0.5, gamma=2.0), expected)


@pytest.mark.parametrize(
    ("kwargs", "logit", "target", "expected"),
    [
        ({"alpha": 0.25, "gamma": 2.0}, 0.0, 1.0, 0.25 * 0.5**2 * math.log(2)),  # p = 0.5
        ({"alpha": 0.25, "gamma": 2.0}, math.log(3), 0.0, 0.75 * 0.75**2 * math.log(4)),  # p = 0.75, wrong
        ({"alpha": 0.25, "gamma": 2.0}, math.log(3), 1.0, 0.25 * 0.25**2 * math.log(4 / 3)),  # p = 0.75, right
        ({"alpha": -1.0, "gamma": 0.0}, math.log(3), 0.0, math.log(4)),  # plain BCE
    ],
)
def test_focal_hand_computed(kwargs, logit, target, expected):
    logits, targets = torch.tensor([logit], dtype=torch.float64), torch.tensor([target], dtype=torch.float64)
    assert focal_loss(logits, targets, **kwargs).item() == pytest.approx(expected, rel=1e-12)


def test_focal_gradcheck_float64():
    logits, mask = random_logits_and_mask(1, 2, 3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: focal_loss(x, mask), (logits.requires_grad_(),))


# ---------------------------------------------------------------- IoU


@pytest.mark.parametrize(
    ("kwargs", "probabilities", "target", "expected"),
    [
        # intersection 1, union 2 + 2 - 1 = 3: 1 - (1 + 1) / (3 + 1)
        ({}, [[0.5, 0.5], [0.5, 0.5]], [[1.0, 1.0], [0.0, 0.0]], 0.5),
        # intersection 0.8 + 0.6 = 1.4, union (0.8 + 0.2 + 0.6) + 2 - 1.4 = 2.2: 1 - 1.9 / 2.7
        ({"smooth": 0.5}, [[0.8, 0.2], [0.6, 0.0]], [[1.0, 0.0], [1.0, 0.0]], 1 - 1.9 / 2.7),
        # empty prediction on an empty target: (0 + 1) / (0 + 1), loss 0 and no 0/0
        ({}, [[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], 0.0),
        # perfect prediction: (4 + 1) / (4 + 1)
        ({}, [[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]], 0.0),
        # empty prediction on a full target: 1 - 1 / 5
        ({}, [[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]], 0.8),
    ],
)
def test_iou_hand_computed(kwargs, probabilities, target, expected):
    logits = probability_logits([[probabilities]])
    value = iou_loss(logits, torch.tensor([[target]], dtype=torch.float64), **kwargs)
    assert value.item() == pytest.approx(expected, abs=1e-12)


def test_iou_is_mean_over_images_and_classes():
    logits, mask = random_logits_and_mask(3, 2, 8, 8)
    per_map = [iou_loss(logits[b : b + 1, c : c + 1], mask[b : b + 1, c : c + 1]) for b in range(3) for c in range(2)]
    torch.testing.assert_close(iou_loss(logits, mask), torch.stack(per_map).mean())


def test_iou_gradcheck_float64():
    logits, mask = random_logits_and_mask(2, 2, 3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: iou_loss(x, mask), (logits.requires_grad_(),))


# ---------------------------------------------------------------- MS-SSIM


@pytest.mark.parametrize("noise", [None, 0.05, 0.2], ids=["independent", "correlated", "noisier"])
def test_ms_ssim_equals_pytorch_msssim(noise):
    if noise is None:
        x, y = torch.rand(2, 1, 192, 192, generator=torch.Generator().manual_seed(1)), torch.rand(2, 1, 192, 192)
    else:
        x, y = correlated_images(2, 1, 192, 192, noise=noise)
    expected = reference_ms_ssim(x, y, data_range=1.0, win_size=11, win_sigma=1.5, weights=list(MS_SSIM_WEIGHTS))
    value = ms_ssim(x, y)
    assert value.dtype == torch.float32
    assert abs(value.item() - expected.item()) < 1e-5
    if noise == 0.05:
        assert value.item() > 0.9


def test_ms_ssim_matches_pytorch_msssim_exactly_in_float64():
    x, y = correlated_images(1, 2, 176, 176, dtype=torch.float64)  # sides / 16 whole: no odd pooling
    coordinates = torch.arange(11, dtype=torch.float64) - 5
    window = torch.exp(-(coordinates**2) / (2 * 1.5**2))
    window = (window / window.sum()).view(1, 1, 1, 11).repeat(2, 1, 1, 1)
    expected = reference_ms_ssim(x, y, data_range=1.0, win=window)
    assert ms_ssim(x, y).item() == pytest.approx(expected.item(), abs=1e-12)


def test_single_scale_equals_pytorch_msssim_ssim():
    x, y = correlated_images(2, 1, 20, 24, noise=0.1)  # a 20-pixel side holds one scale only
    expected = reference_ssim(x, y, data_range=1.0, nonnegative_ssim=True) ** sum(MS_SSIM_WEIGHTS)
    torch.testing.assert_close(ms_ssim(x, y), expected)


@pytest.mark.parametrize(
    ("side", "scales"), [(192, 5), (161, 5), (160, 4), (64, 3), (21, 2), (20, 1), (11, 1)]
)
def test_small_input_rule_on_constant_images(side, scales):
    # Constant images: every contrast-structure term is exactly 1 and the luminance term
    # (2ab + C1) / (a^2 + b^2 + C1) is the same at every scale, so MS-SSIM = l ** w_last, where
    # w_last is the last of the first `scales` weights rescaled to the sum of all five.
    a, b, c1 = 0.2, 0.7, 0.01**2
    luminance = (2 * a * b + c1) / (a**2 + b**2 + c1)
    used = MS_SSIM_WEIGHTS[:scales]
    expected = luminance ** (used[-1] * sum(MS_SSIM_WEIGHTS) / sum(used))
    x = torch.full((1, 1, side, side + 3), a, dtype=torch.float64)
    assert ms_ssim(x, torch.full_like(x, b)).item() == pytest.approx(expected, rel=1e-10)


def test_ms_ssim_on_64x64_is_in_range_and_finite():
    noise, mask = random_logits_and_mask(2, 1, 64, 64)
    logits = (4 * (mask - 0.5) + noise).requires_grad_()  # a fair prediction: every cs term > 0
    loss = ms_ssim_loss(logits, mask)
    loss.backward()
    assert 0 < loss.item() < 1
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    x, y = correlated_images(2, 1, 64, 64)
    assert 0.5 < ms_ssim(x, y).item() < 1


def test_ms_ssim_of_identical_images_is_one():
    x, _ = correlated_images(2, 2, 64, 64, dtype=torch.float64)
    assert ms_ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)


def test_ms_ssim_gradcheck_float64():
    # fast_mode checks random projections of the Jacobian: a few calls instead of one per pixel.
    x, y = correlated_images(1, 1, 24, 23, noise=0.1, dtype=torch.float64)  # two scales
    assert torch.autograd.gradcheck(lambda a: ms_ssim(a, y), (x.requires_grad_(),), fast_mode=True)
    logits, mask = random_logits_and_mask(1, 1, 12, 12, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: ms_ssim_loss(a, mask), (logits.requires_grad_(),), fast_mode=True)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ms_ssim(torch.rand(1, 1, 10, 64), torch.rand(1, 1, 10, 64)), "10x64"),
        (lambda: ms_ssim(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 31)), r"\(1, 1, 32, 31\)"),
        (lambda: ms_ssim(torch.rand(1, 32, 32), torch.rand(1, 32, 32)), r"\(1, 32, 32\)"),
        (lambda: ms_ssim(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32), data_range=0), "data_range = 0"),
        (lambda: iou_loss(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), smooth=0.0), "smooth = 0.0"),
        (lambda: iou_loss(torch.rand(1, 1, 4, 4), torch.rand(1, 2, 4, 4)), r"\(1, 2, 4, 4\)"),
        (lambda: focal_loss(torch.rand(4), torch.rand(5)), r"\(5,\)"),
        (lambda: focal_loss(torch.rand(4), torch.rand(4), alpha=1.5), "alpha = 1.5"),
        (lambda: focal_loss(torch.rand(4), torch.rand(4), gamma=-1.0), "gamma = -1.0"),
        (lambda: cgm_loss(torch.rand(2, 3), torch.rand(2)), r"\(2, 3\)"),
    ],
)
def test_loss_functions_reject_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------- CGM


def test_cgm_loss_is_bce_of_both_sigmoids_against_one_hot():
    class_logits = torch.tensor([[2.0, -1.0], [0.5, 1.5]], dtype=torch.float64)
    organ_present = torch.tensor([0.0, 1.0], dtype=torch.float64)

    def log_sigmoid(x):
        return -math.log1p(math.exp(-x))

    expected = -(log_sigmoid(2.0) + log_sigmoid(1.0) + log_sigmoid(-0.5) + log_sigmoid(1.5)) / 4
    assert cgm_loss(class_logits, organ_present).item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- Criterion


def test_criterion_total_is_sum_over_side_outputs_plus_cgm():
    sides = [random_logits_and_mask(2, 1, 32, 32, seed=s)[0].requires_grad_() for s in range(3)]
    _, mask = random_logits_and_mask(2, 1, 32, 32, seed=9)
    class_logits = torch.randn(2, 2, requires_grad=True)
    organ_present = torch.tensor([1.0, 0.0])
    weights = {"focal_weight": 2.0, "ms_ssim_weight": 0.5, "iou_weight": 3.0, "cgm_weight": 0.25}
    criterion = Criterion(**weights, focal_alpha=0.4, focal_gamma=1.5)

    parts = criterion(make_output(sides, class_logits), mask, organ_present)

    focal = sum(focal_loss(s, mask, alpha=0.4, gamma=1.5) for s in sides)
    structure = sum(ms_ssim_loss(s, mask) for s in sides)
    iou = sum(iou_loss(s, mask) for s in sides)
    cgm = cgm_loss(class_logits, organ_present)
    expected = 2.0 * focal + 0.5 * structure + 3.0 * iou + 0.25 * cgm
    torch.testing.assert_close(parts["total"], expected)
    for name, value in {"focal": focal, "ms_ssim": structure, "iou": iou, "cgm": cgm}.items():
        torch.testing.assert_close(parts[name], value.detach())
        assert not parts[name].requires_grad
    parts["total"].backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in sides)
    assert class_logits.grad.abs().sum() > 0


def test_criterion_accepts_loss_config_fields():
    criterion = Criterion(**dataclasses.asdict(LossConfig()))
    logits, mask = random_logits_and_mask(1, 1, 16, 16)
    assert set(criterion(make_output([logits]), mask, torch.ones(1))) == {"total", "focal", "ms_ssim", "iou"}


@pytest.mark.parametrize(
    ("kwargs", "with_class_logits", "expected_keys"),
    [
        ({}, True, {"total", "focal", "ms_ssim", "iou", "cgm"}),
        ({}, False, {"total", "focal", "ms_ssim", "iou"}),
        ({"ms_ssim_weight": 0.0}, True, {"total", "focal", "iou", "cgm"}),
        ({"focal_weight": 0.0, "iou_weight": 0.0}, True, {"total", "ms_ssim", "cgm"}),
        ({"cgm_weight": 0.0}, True, {"total", "focal", "ms_ssim", "iou"}),
    ],
)
def test_criterion_reports_only_the_parts_it_computes(kwargs, with_class_logits, expected_keys):
    logits, mask = random_logits_and_mask(2, 1, 16, 16)
    class_logits = torch.randn(2, 2) if with_class_logits else None
    parts = Criterion(**kwargs)(make_output([logits, logits + 1], class_logits), mask, torch.tensor([1.0, 0.0]))
    assert set(parts) == expected_keys
    weighted = [value * kwargs.get(f"{name}_weight", 1.0) for name, value in parts.items() if name != "total"]
    torch.testing.assert_close(parts["total"], sum(weighted))


def test_criterion_with_ms_ssim_weight_zero_never_computes_it():
    # 8x8 maps are too small for MS-SSIM (it raises), so success shows the part was skipped.
    logits, mask = random_logits_and_mask(2, 1, 8, 8)
    with pytest.raises(ValueError, match="8x8"):
        Criterion()(make_output([logits]), mask, torch.ones(2))
    assert "ms_ssim" not in Criterion(ms_ssim_weight=0.0)(make_output([logits]), mask, torch.ones(2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"focal_weight": -1.0}, "focal_weight = -1.0"),
        ({"ms_ssim_weight": float("nan")}, "ms_ssim_weight = nan"),
        ({"iou_weight": float("inf")}, "iou_weight = inf"),
        ({"cgm_weight": -0.5}, "cgm_weight = -0.5"),
        ({"focal_alpha": 1.5}, "alpha = 1.5"),
        ({"focal_gamma": -2.0}, "gamma = -2.0"),
        ({"focal_weight": 0.0, "ms_ssim_weight": 0.0, "iou_weight": 0.0}, "all 0"),
    ],
)
def test_criterion_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Criterion(**kwargs)


@pytest.mark.parametrize(
    ("side_shapes", "mask_shape", "class_shape", "organ_shape", "message"),
    [
        ([(2, 1, 16, 16), (2, 1, 8, 8)], (2, 1, 16, 16), None, (2,), r"side output 1 has shape \(2, 1, 8, 8\)"),
        ([(2, 1, 16, 16)], (2, 16, 16), None, (2,), r"mask has \(2, 16, 16\)"),
        ([(2, 2, 16, 16)], (2, 1, 16, 16), None, (2,), r"\(2, 2, 16, 16\)"),
        ([], (2, 1, 16, 16), None, (2,), "empty"),
        ([(2, 1, 16, 16)], (2, 1, 16, 16), (2, 1), (2,), r"got \(2, 1\) and \(2,\)"),
        ([(2, 1, 16, 16)], (2, 1, 16, 16), (2, 2), (2, 1), r"got \(2, 2\) and \(2, 1\)"),
    ],
)
def test_criterion_rejects_mismatched_shapes(side_shapes, mask_shape, class_shape, organ_shape, message):
    sides = [torch.zeros(shape) for shape in side_shapes]
    output = SegmentationOutput(
        logits=sides[0] if sides else None,
        side_logits=tuple(sides),
        class_logits=None if class_shape is None else torch.zeros(class_shape),
    )
    with pytest.raises(ValueError, match=message):
        Criterion()(output, torch.zeros(mask_shape), torch.zeros(organ_shape))


@pytest.mark.parametrize("gamma", [2.0, 0.5])
@pytest.mark.parametrize(
    ("logit", "target"),
    [(0.0, 0.0), (0.0, 1.0), (30.0, 1.0), (30.0, 0.0), (-100.0, 0.0), (-100.0, 1.0), (-1e4, 0.0), (1e4, 1.0)],
)
def test_criterion_is_finite_on_extreme_inputs(logit, target, gamma):
    logits = torch.full((2, 1, 22, 22), logit, requires_grad=True)  # two MS-SSIM scales
    class_logits = torch.full((2, 2), logit, requires_grad=True)
    output = make_output([logits, logits * 1], class_logits)
    parts = Criterion(focal_gamma=gamma)(output, torch.full((2, 1, 22, 22), target), torch.full((2,), target))
    parts["total"].backward()
    assert all(torch.isfinite(value) for value in parts.values())
    assert torch.isfinite(logits.grad).all() and torch.isfinite(class_logits.grad).all()


def test_criterion_under_bf16_autocast_computes_in_float32():
    sides = [random_logits_and_mask(2, 1, 64, 64, seed=s)[0].to(torch.bfloat16) for s in range(2)]
    _, mask = random_logits_and_mask(2, 1, 64, 64)
    class_logits = torch.randn(2, 2, dtype=torch.bfloat16)
    organ_present = torch.tensor([0.0, 1.0])
    criterion = Criterion()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = criterion(make_output(sides, class_logits), mask, organ_present)
    reference = criterion(make_output([s.float() for s in sides], class_logits.float()), mask, organ_present)
    for name, value in parts.items():
        assert value.dtype == torch.float32 and torch.isfinite(value)
        torch.testing.assert_close(value, reference[name], rtol=1e-6, atol=1e-6)


def test_criterion_on_a_real_model_output_reaches_every_head():
    torch.manual_seed(0)
    model = create_model("unet3plus", width=8, deep_supervision=True, cgm=True)
    _, mask = random_logits_and_mask(2, 1, 32, 32)
    output = model(torch.rand(2, 3, 32, 32))
    parts = Criterion()(output, mask, torch.tensor([1.0, 0.0]))
    parts["total"].backward()
    assert len(output.side_logits) == 5 and set(parts) == {"total", "focal", "ms_ssim", "iou", "cgm"}
    assert all(torch.isfinite(value) for value in parts.values())
    gradients = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in gradients)
