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
    assert MODEL_NAMES == ("mlp", "small-cnn", "resnet18", "resnet34", "resnet50",
                           "depth-resnet50")
    assert isinstance(build_model("mlp", in_features=3), MLP)
    assert isinstance(build_model("small-cnn"), SmallCNN)
    r50 = build_model("resnet50")
    assert isinstance(r50, ResNetRegressor) and r50.num_features == 2048
    r34 = build_model("resnet34")
    assert isinstance(r34, ResNetRegressor) and r34.arch == "resnet34"
    assert len(r34.backbone.layer3) == 6  # 3-4-6-3 basic blocks: a ResNet-34, not an 18
    assert r34.feature_dim == 512
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


# ------------------------------------------------------------------ features (contract 3)
def _head_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the model's final layer receives, captured by a hook (independent of the code
    under test)."""
    seen: list[torch.Tensor] = []
    handle = model.head.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]


FEATURE_CASES = [
    ("mlp", lambda: MLP(5, hidden=(7, 3)), (4, 5), 3),
    ("mlp-dropout-bn", lambda: MLP(5, hidden=(6,), dropout=0.5, batch_norm=True), (4, 5), 6),
    ("small-cnn", lambda: SmallCNN(channels=(4,), hidden=9, dropout=0.3), (3, 1, 28, 28), 9),
    ("resnet18", lambda: ResNetRegressor("resnet18", dropout=0.2), (2, 3, 32, 32), 512),
]


@pytest.mark.parametrize("name,make,shape,dim", FEATURE_CASES, ids=[c[0] for c in FEATURE_CASES])
def test_return_features_regressors(name, make, shape, dim) -> None:
    torch.manual_seed(0)
    model = make()
    x = torch.randn(*shape)
    assert model.feature_dim == dim
    # eval: the features are exactly what the final linear layer sees
    model.eval()
    with torch.no_grad():
        plain = model(x)
        pred, feats = model(x, return_features=True)
        assert isinstance(plain, torch.Tensor) and plain.shape == (shape[0],)
        assert feats.shape == (shape[0], dim)
        assert torch.equal(pred, plain)
        assert torch.equal(feats, _head_input(model, x))
        assert torch.equal(model.forward_head(feats), plain)
        assert torch.equal(model.forward_features(x), feats)
    # train mode with dropout: same random stream -> same prediction as the plain call, and the
    # features are the pre-dropout ones (the eval-mode head input for models without BatchNorm)
    model.train()
    torch.manual_seed(1)
    plain = model(x)
    torch.manual_seed(1)
    pred, feats = model(x, return_features=True)
    assert torch.equal(pred, plain)
    assert feats.requires_grad
    feats.square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_mlp_without_hidden_layers_features_are_the_input() -> None:
    m = MLP(3, hidden=())
    x = torch.randn(4, 3)
    pred, feats = m(x, return_features=True)
    assert torch.equal(feats, x) and torch.equal(pred, m(x)) and m.feature_dim == 3


def test_small_cnn_state_dict_keys_unchanged_with_dropout() -> None:
    """The dropout left ``hidden``; the parameter names (and so older checkpoints) did not move."""
    keys = set(SmallCNN(dropout=0.5).state_dict())
    assert {"hidden.1.weight", "hidden.1.bias", "head.weight", "head.bias"} <= keys


def test_depth_model_return_features() -> None:
    torch.manual_seed(0)
    m = DepthResNet(encoder="resnet18").eval()
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        plain = m(x)
        pred, feats = m(x, return_features=True)
        assert torch.equal(pred, plain)
        # decoder channels (512 // 2 // 16 = 16) + fused 4 x 16 = 80 for a ResNet-18 encoder
        assert m.feature_dim == 80 and feats.shape == (2, 80, 12, 20)
        assert torch.equal(feats, _head_input(m, x))
        assert torch.equal(m.forward_head(feats), plain)
    assert build_model("depth-resnet50").feature_dim == 128  # as the NYUD2-DIR reference's R
