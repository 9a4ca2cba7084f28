"""unet3plus.models.encoders: five feature maps at scales 1 .. 1/16, torchvision weights, clear weight errors."""

from __future__ import annotations

import pytest
import torch
import torchvision

from unet3plus.errors import CheckpointError
from unet3plus.models import ENCODERS, create_encoder, create_model

WIDTH = 8
CHANNELS = {"unet": (8, 16, 32, 64, 128), "vgg16": (8, 16, 32, 64, 64), "resnet101": (8, 8, 32, 64, 256)}  # width 8


def test_every_registered_encoder_has_its_expected_channels():
    assert set(CHANNELS) == set(ENCODERS)  # a new encoder needs its expected channels here


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoders_yield_five_maps_at_scales_1_to_1_16(name):
    channels = CHANNELS[name]
    encoder = create_encoder(name, in_channels=2, width=8)
    features = encoder(torch.rand(1, 2, 64, 96))
    assert encoder.out_channels == channels
    assert [tuple(f.shape) for f in features] == [(1, c, 64 // 2**k, 96 // 2**k) for k, c in enumerate(channels)]


def _torchvision_vgg16_bn_levels(model, x):
    ends = [5, 12, 22, 32, 42]  # last ReLU of each stage in vgg16_bn.features
    levels = []
    for index, layer in enumerate(model.features[:43]):
        x = layer(x)
        if index in ends:
            levels.append(x)
    return levels


def _torchvision_resnet101_levels(model, x):
    half = model.relu(model.bn1(model.conv1(x)))
    quarter = model.layer1(model.maxpool(half))
    eighth = model.layer2(quarter)
    return [half, quarter, eighth, model.layer4(model.layer3(eighth))]


@pytest.mark.parametrize(
    ("encoder", "build_reference", "reference_levels", "first_level"),
    [
        ("vgg16", lambda: torchvision.models.vgg16_bn(weights=None), _torchvision_vgg16_bn_levels, 0),
        (
            "resnet101",
            lambda: torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[False, False, True]),
            _torchvision_resnet101_levels,
            1,
        ),
    ],
)
def test_torchvision_weights_load_and_reproduce_torchvision_features(
    encoder, build_reference, reference_levels, first_level, tmp_path
):
    torch.manual_seed(0)
    reference = build_reference().eval()
    path = tmp_path / f"{encoder}.pth"
    torch.save(reference.state_dict(), path)
    model = create_model("unet3plus", encoder=encoder, encoder_weights=path, width=64).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ours = model.encoder(x)[first_level:]
        theirs = reference_levels(reference, x)
        model(x)
    assert len(ours) == len(theirs)
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want)


def test_encoder_weights_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match=r"absent\.pth: encoder weights file not found"):
        create_model("unet", encoder="vgg16", encoder_weights=tmp_path / "absent.pth", width=WIDTH)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"garbage\.pth: cannot read encoder weights"):
        create_model("unet", encoder="vgg16", encoder_weights=garbage, width=WIDTH)

    wider = tmp_path / "vgg16_width16.pth"
    torch.save(create_encoder("vgg16", in_channels=3, width=16).state_dict(), wider)
    shape_problem = r"vgg16_width16\.pth.*features\.0\.weight has shape \(16, 3, 3, 3\), expected \(8, 3, 3, 3\)"
    with pytest.raises(CheckpointError, match=shape_problem):
        create_model("unet", encoder="vgg16", encoder_weights=wider, width=WIDTH)

    resnet = tmp_path / "resnet.pth"
    torch.save(create_encoder("resnet101", in_channels=3, width=WIDTH).state_dict(), resnet)
    with pytest.raises(CheckpointError, match=r"resnet\.pth.*missing features\.0\.weight"):
        create_model("unet", encoder="vgg16", encoder_weights=resnet, width=WIDTH)
