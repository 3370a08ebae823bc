"""Vision regressors: shapes, initialisation, ImageNet weights from a local file, the factory."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from balanced_sam.models import (
    MLP,
    MODEL_NAMES,
    DepthResNet,
    ResNetRegressor,
    SmallCNN,
    build_model,
    imagenet_weights_path,
)


def test_factory_names_and_unknown() -> None:
    assert MODEL_NAMES == ("mlp", "small-cnn", "resnet18", "resnet50", "depth-resnet50")
    assert isinstance(build_model("mlp", in_features=3), MLP)
    assert isinstance(build_model("small-cnn"), SmallCNN)
    r50 = build_model("resnet50")
    assert isinstance(r50, ResNetRegressor) and r50.num_features == 2048
    with pytest.raises(ValueError) as err:
        build_model("vgg16")
    assert "'vgg16'" in str(err.value)
    assert all(n in str(err.value) for n in MODEL_NAMES)


def test_scalar_regressors_return_batch_vector() -> None:
    torch.manual_seed(0)
    cnn = build_model("small-cnn").eval()
    assert cnn(torch.randn(5, 1, 28, 28)).shape == (5,)
    r18 = build_model("resnet18").eval()
    with torch.no_grad():
        assert r18(torch.randn(2, 3, 32, 32)).shape == (2,)
        assert r18.encode(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    wide = SmallCNN(in_channels=3, channels=(8, 8, 8), hidden=16, input_size=32)
    assert wide(torch.randn(4, 3, 32, 32)).shape == (4,)
    with pytest.raises(ValueError, match="too small"):
        SmallCNN(channels=(4, 4, 4, 4, 4, 4), input_size=28)


def test_small_cnn_trains() -> None:
    torch.manual_seed(0)
    m = SmallCNN()
    x = torch.randn(32, 1, 28, 28)
    y = x[:, 0, :14].mean((1, 2)) * 10.0  # a target the network can read off the input
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = (m(x) - y).abs().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_kaiming_fan_out_init() -> None:
    torch.manual_seed(0)
    m = build_model("resnet18")
    conv = m.backbone.layer3[0].conv1  # 3x3, 128 -> 256
    want = math.sqrt(2.0 / (3 * 3 * conv.out_channels))
    assert float(conv.weight.detach().std()) == pytest.approx(want, rel=0.05)
    bn = m.backbone.layer3[0].bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_imagenet_weights_from_a_file(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}  # DataParallel prefix too
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    m = ResNetRegressor("resnet18", pretrained=tmp_path / "w.pth")
    assert torch.equal(m.backbone.conv1.weight, ref.conv1.weight)
    assert torch.equal(m.backbone.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)
    assert m.head.out_features == 1
    d = DepthResNet(encoder="resnet18", pretrained=tmp_path / "w.pth")
    assert torch.equal(d.blocks[0][0].conv1.weight, ref.layer1[0].conv1.weight)
    bad = {k: v for k, v in ref.state_dict().items() if not k.startswith("layer4")}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing"):
        ResNetRegressor("resnet18", pretrained=tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ResNetRegressor("resnet18", pretrained=tmp_path / "nope.pth")


def test_imagenet_cache_never_downloads_by_default(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = imagenet_weights_path("resnet50")
    assert path.parent == tmp_path / "hub" / "checkpoints" and path.name.startswith("resnet50-")
    with pytest.raises(FileNotFoundError, match="allow_download=True") as err:
        ResNetRegressor("resnet50", pretrained=True)
    assert str(path) in str(err.value)
    import torchvision

    path.parent.mkdir(parents=True)
    torch.manual_seed(2)
    ref = torchvision.models.resnet50(weights=None)
    torch.save(ref.state_dict(), path)
    m = ResNetRegressor("resnet50", pretrained=True)
    assert torch.equal(m.backbone.layer2[0].conv2.weight, ref.layer2[0].conv2.weight)
    assert isinstance(m.backbone.fc, nn.Identity)


def test_depth_model_structure_and_shapes() -> None:
    torch.manual_seed(0)
    m = build_model("depth-resnet50")
    assert isinstance(m, DepthResNet)
    # the ResNet-50 layout of Hu et al.: 67.57 M parameters (encoder 23.5 M)
    n = sum(p.numel() for p in m.parameters())
    assert 67.0e6 < n < 68.0e6
    assert [u.main[0].out_channels for u in m.decoder] == [512, 256, 128, 64]
    assert m.refine[0].in_channels == 128 and m.refine[-1].out_channels == 1
    m.eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 48)).shape == (1, 1, 16, 24)
    small = DepthResNet(encoder="resnet18")
    x = torch.randn(2, 3, 24, 40)
    out = small(x)
    assert out.shape == (2, 1, 12, 20)
    out.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in small.parameters() if p.grad is not None)
    assert small.stem[0].weight.grad is not None
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50"):
        DepthResNet(encoder="resnet101")
