"""Regressors: an MLP for tables, small CNNs, torchvision ResNets, the depth encoder-decoder.

Every model's last layer (its ``head``) runs in float32 even under autocast: a bf16 output has 8
significant bits, so an age of 32-64 years comes out in steps of 0.25 and an exact prediction
becomes common; that made the geometric mean of the errors 20-30% lower in a simulation on
AgeDB-DIR's test labels (the MAE did not move). The body keeps the autocast dtype.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["MLP", "SmallCNN", "ResNetRegressor", "DepthResNet", "UpProjection", "build_model",
           "imagenet_weights_path", "MODEL_NAMES"]


def _full_precision(head: Any, features: torch.Tensor) -> torch.Tensor:
    """``head(features)`` in float32 when autocast is on for the features' device (see the
    module docstring); unchanged otherwise."""
    device = features.device.type
    if torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return head(features.float())
    return head(features)


class MLP(nn.Module):
    """Fully connected regressor: ``in_features -> hidden... -> out_features`` with ReLU.

    The output is squeezed to shape ``(batch,)`` when ``out_features == 1``. Features
    (``forward(x, return_features=True)``) are the last hidden layer's activations ``(batch,
    hidden[-1])`` before any dropout, i.e. what the final linear layer sees in eval mode; with no
    hidden layer they are the input itself.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (256, 256),
        out_features: int = 1,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        if isinstance(hidden, (int, str)) or not all(
                isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
            raise ValueError(f"hidden must be a list of layer widths, each an integer >= 1 "
                             f"(e.g. [256, 256]; [] for none), got {hidden!r}")
        if isinstance(out_features, bool) or not isinstance(out_features, int) or \
                out_features < 1:
            raise ValueError(f"out_features must be an integer >= 1, got {out_features!r}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU(inplace=True))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)
        self.out_features = out_features
        self.feature_dim = width
        # net[:_body] gives the features; net[_body:] is (dropout +) the final linear layer
        self._body = len(layers) - (2 if dropout > 0 and hidden else 1)

    @property
    def head(self) -> nn.Linear:
        """The final linear layer."""
        return self.net[-1]  # type: ignore[return-value]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate representation ``(batch, feature_dim)``."""
        for layer in self.net[: self._body]:
            x = layer(x)
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """The prediction from (possibly calibrated) features: what follows
        :meth:`forward_features` in :meth:`forward`."""
        features = _full_precision(self.net[self._body:], features)
        return features.squeeze(-1) if self.out_features == 1 else features

    def forward(self, x: torch.Tensor, return_features: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        feats = self.forward_features(x)
        out = self.forward_head(feats)
        return (out, feats) if return_features else out


# ---------------------------------------------------------------------------------- vision models
_RESNETS = {
    # name: (torchvision builder, ImageNet weights enum name, channels of layer1..layer4)
    "resnet18": ("resnet18", "ResNet18_Weights", (64, 128, 256, 512)),
    "resnet34": ("resnet34", "ResNet34_Weights", (64, 128, 256, 512)),
    "resnet50": ("resnet50", "ResNet50_Weights", (256, 512, 1024, 2048)),
}


def _kaiming_(module: nn.Module) -> None:
    """The DIR / RnC initialisation: conv weights ~ N(0, 2 / (k*k*out_channels)) (Kaiming normal,
    fan-out, ReLU), BatchNorm weight 1 and bias 0; linear layers keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def imagenet_weights_path(arch: str) -> Path:
    """Where torchvision keeps the ImageNet (``IMAGENET1K_V1``) weights of ``arch`` once
    downloaded: ``$TORCH_HOME/hub/checkpoints/<file>`` (``torch.hub.get_dir()``)."""
    import torchvision

    if arch not in _RESNETS:
        raise ValueError(f"unknown ResNet {arch!r}; choose one of: {', '.join(_RESNETS)}")
    enum = getattr(torchvision.models, _RESNETS[arch][1])
    fname = os.path.basename(enum.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / fname


def _load_imagenet(backbone: nn.Module, arch: str, pretrained: bool | str | os.PathLike[str],
                   allow_download: bool) -> None:
    """Load ImageNet weights into a torchvision ResNet (its ``fc`` is ignored).

    ``pretrained`` is a path to a state-dict file, or ``True`` for torchvision's cached file
    (:func:`imagenet_weights_path`), downloaded only when ``allow_download``.
    """
    if pretrained is True:
        path = imagenet_weights_path(arch)
        if not path.is_file():
            if not allow_download:
                raise FileNotFoundError(
                    f"ImageNet weights for {arch} are not in torchvision's cache ({path}); "
                    f"pass pretrained='/path/to/{path.name}' or allow_download=True")
            import torchvision

            enum = getattr(torchvision.models, _RESNETS[arch][1])
            state = enum.IMAGENET1K_V1.get_state_dict(progress=True)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")
             and not k.startswith("module.fc.")}
    own = {k for k in backbone.state_dict() if not k.startswith("fc.")}
    missing = sorted(own - set(state))
    unexpected = sorted(set(state) - own)
    if missing or unexpected:
        raise ValueError(f"weights in {path} do not fit {arch}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    backbone.load_state_dict(state, strict=False)


class ResNetRegressor(nn.Module):
    """A torchvision ResNet with one linear output: ``(batch, 3, H, W) -> (batch,)``.

    From scratch (``pretrained=None``, the age recipe of the DIR / BSAM code) the convolutions get
    Kaiming-normal (fan-out) initialisation and BatchNorm weight 1 / bias 0, as in the reference
    ResNets. ``pretrained=True`` loads torchvision's ImageNet weights from its cache (never
    downloading unless ``allow_download``); a path loads a state-dict file. ``dropout`` is applied
    to the pooled features before the head. ``forward(x, return_features=True)`` also returns the
    pooled features ``(batch, num_features)`` before dropout (as the DIR / RankSim / ConR reference
    ResNets do), for feature-space methods such as FDS, RankSim, ConR or RnC.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        pretrained: bool | str | os.PathLike[str] | None = None,
        dropout: float = 0.0,
        allow_download: bool = False,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        import torchvision

        if arch not in _RESNETS:
            raise ValueError(f"unknown ResNet {arch!r}; choose one of: {', '.join(_RESNETS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        net = getattr(torchvision.models, _RESNETS[arch][0])(weights=None)
        _kaiming_(net)
        if pretrained:
            _load_imagenet(net, arch, pretrained, allow_download)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            _kaiming_(net.conv1)
        self.num_features = net.fc.in_features
        net.fc = nn.Identity()
        self.backbone = net
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(self.num_features, 1)
        self.arch = arch
        self.feature_dim = self.num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(batch, num_features)``."""
        return self.backbone(x)

    encode = forward_features

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Dropout and the linear head: the prediction ``(batch,)`` from (possibly calibrated)
        features."""
        return _full_precision(lambda f: self.head(self.dropout(f)), features).squeeze(-1)

    def forward(self, x: torch.Tensor, return_features: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone(x)
        out = self.forward_head(feats)
        return (out, feats) if return_features else out


class SmallCNN(nn.Module):
    """A small CNN regressor for 28 x 28 inputs (the rotated-MNIST benchmark):
    ``[conv3x3 - BN - ReLU - maxpool2] x len(channels) -> flatten -> linear(hidden) - ReLU ->
    linear(1)``; ``(batch, in_channels, S, S) -> (batch,)``.

    The flattened map keeps the spatial layout (no global pooling), since the target (an angle)
    depends on where the strokes are. Features (``forward(x, return_features=True)``) are the
    hidden layer's activations ``(batch, hidden)`` before dropout.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32),
        hidden: int = 64,
        input_size: int = 28,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if in_channels < 1 or not channels or any(c < 1 for c in channels):
            raise ValueError("in_channels and every entry of channels must be >= 1")
        layers: list[nn.Module] = []
        c_in, size = in_channels, int(input_size)
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in, size = c, size // 2
        if size < 1:
            raise ValueError(f"input_size {input_size} is too small for {len(channels)} poolings")
        self.features = nn.Sequential(*layers)
        self.num_features = c_in * size * size
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(self.num_features, hidden),
                                    nn.ReLU(inplace=True))
        # no parameters: the state-dict keys are those of the earlier layout (dropout inside
        # ``hidden``), so older checkpoints still load
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(hidden, 1)
        self.feature_dim = hidden
        _kaiming_(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features before dropout and the last linear layer ``(batch, hidden)``."""
        return self.hidden(self.features(x))

    encode = forward_features

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Dropout and the linear head: the prediction ``(batch,)`` from features."""
        return _full_precision(lambda f: self.head(self.dropout(f)), features).squeeze(-1)

    def forward(self, x: torch.Tensor, return_features: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        feats = self.hidden(self.features(x))
        out = self.forward_head(feats)
        return (out, feats) if return_features else out


class UpProjection(nn.Module):
    """Up-projection block (Laina et al. 2016, used by Hu et al. 2019): bilinear upsampling to a
    given size, then a main branch conv5x5 - BN - ReLU - conv3x3 - BN plus a projection branch
    conv5x5 - BN, summed and passed through ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 5, padding=2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 5, padding=2, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        x = nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return torch.relu(self.main(x) + self.proj(x))


class DepthResNet(nn.Module):
    """Monocular depth network of Hu et al. (2019), "Revisiting Single Image Depth Estimation:
    Toward Higher Resolution Maps with Accurate Object Boundaries", as used by NYUD2-DIR.

    Written from the paper's description (its Fig. 2 and Sec. 3):

    * **encoder** E: a ResNet (ResNet-50 in the paper, ImageNet-pretrained) giving the outputs of
      its four blocks at 1/4, 1/8, 1/16 and 1/32 of the input;
    * **decoder** D: a 1x1 convolution halving the last block's channels (+ BN, ReLU), then four
      up-projection blocks, each halving the channels and upsampling to the next larger block's
      size; the last one to twice the first block's size, i.e. half the input;
    * **multi-scale feature fusion** M: each encoder block up-projected to 16 channels at the
      decoder's output size, concatenated (64 channels), then a 5x5 convolution + BN + ReLU;
    * **refinement** R: the decoder and fusion outputs concatenated, two 5x5 convolutions
      (+ BN, ReLU) and a 5x5 convolution to one channel.

    Input ``(batch, 3, H, W)``; output depth ``(batch, 1, H // 2, W // 2)`` (half the input, as
    in the paper: 114 x 152 for 228 x 304 inputs); upsample to the target's size for scoring
    (:func:`balanced_sam.data.nyud2.match_depth_size`). ``encoder`` may be ``"resnet18"`` /
    ``"resnet34"`` for small runs; ``pretrained`` as in :class:`ResNetRegressor` (the paper uses
    ImageNet weights; the default here is from scratch so that nothing is fetched).

    Features (``forward(x, return_features=True)``): the refinement block's last feature map, the
    input of its final 5x5 convolution, ``(batch, feature_dim, H // 2, W // 2)`` with
    ``feature_dim`` = decoder channels + fused channels (128 on a ResNet-50). This is the map
    the NYUD2-DIR reference code smooths with FDS and regularises with ConR.
    """

    def __init__(
        self,
        encoder: str = "resnet50",
        pretrained: bool | str | os.PathLike[str] | None = None,
        allow_download: bool = False,
        fusion_channels: int = 16,
    ) -> None:
        super().__init__()
        import torchvision

        if encoder not in _RESNETS:
            raise ValueError(f"unknown encoder {encoder!r}; choose one of: {', '.join(_RESNETS)}")
        net = getattr(torchvision.models, _RESNETS[encoder][0])(weights=None)
        _kaiming_(net)
        if pretrained:
            _load_imagenet(net, encoder, pretrained, allow_download)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.blocks = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        block_ch = _RESNETS[encoder][2]
        c = block_ch[3] // 2
        self.bottleneck = nn.Sequential(nn.Conv2d(block_ch[3], c, 1, bias=False),
                                        nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        ups = []
        for _ in range(4):
            ups.append(UpProjection(c, c // 2))
            c //= 2
        self.decoder = nn.ModuleList(ups)
        self.fusion_up = nn.ModuleList([UpProjection(ch, fusion_channels) for ch in block_ch])
        fused = 4 * fusion_channels
        self.fusion = nn.Sequential(nn.Conv2d(fused, fused, 5, padding=2, bias=False),
                                    nn.BatchNorm2d(fused), nn.ReLU(inplace=True))
        r = c + fused
        self.refine = nn.Sequential(
            nn.Conv2d(r, r, 5, padding=2, bias=False), nn.BatchNorm2d(r), nn.ReLU(inplace=True),
            nn.Conv2d(r, r, 5, padding=2, bias=False), nn.BatchNorm2d(r), nn.ReLU(inplace=True),
            nn.Conv2d(r, 1, 5, padding=2, bias=True),
        )
        for part in (self.bottleneck, self.decoder, self.fusion_up, self.fusion, self.refine):
            _kaiming_(part)
        self.encoder_name = encoder
        self.feature_dim = r

    @property
    def head(self) -> nn.Conv2d:
        """The final 5x5 convolution to one channel."""
        return self.refine[-1]  # type: ignore[return-value]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four encoder block outputs."""
        feats = []
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
            feats.append(h)
        return feats

    def _refine_input(self, x: torch.Tensor) -> torch.Tensor:
        out_size = (max(1, x.shape[-2] // 2), max(1, x.shape[-1] // 2))
        b1, b2, b3, b4 = self.encode(x)
        d = self.bottleneck(b4)
        targets = [b3.shape[-2:], b2.shape[-2:], b1.shape[-2:], out_size]
        for up, size in zip(self.decoder, targets):
            d = up(d, size)
        m = torch.cat([up(b, out_size) for up, b in zip(self.fusion_up, (b1, b2, b3, b4))], 1)
        m = self.fusion(m)
        return torch.cat([d, m], 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the final convolution ``(batch, feature_dim, H // 2, W // 2)``."""
        h = self._refine_input(x)
        for layer in self.refine[:-1]:
            h = layer(h)
        return h

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """The final convolution: depth ``(batch, 1, H // 2, W // 2)`` from features."""
        return _full_precision(self.refine[-1], features)

    def forward(self, x: torch.Tensor, return_features: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        feats = self.forward_features(x)
        out = self.forward_head(feats)
        return (out, feats) if return_features else out


MODEL_NAMES = ("mlp", "small-cnn", "resnet18", "resnet34", "resnet50", "depth-resnet50")


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """A regressor by name: ``"mlp"`` (:class:`MLP`, needs ``in_features``), ``"small-cnn"``
    (:class:`SmallCNN`), ``"resnet18"`` / ``"resnet34"`` / ``"resnet50"``
    (:class:`ResNetRegressor`) or ``"depth-resnet50"`` (:class:`DepthResNet` on a ResNet-50).
    ``kwargs`` go to the class.

    Every model takes ``forward(x, return_features=False)``; with ``True`` it returns
    ``(prediction, features)`` (see each class for what its features are), and exposes
    ``forward_features(x)`` / ``forward_head(features)`` (their composition is ``forward``),
    ``feature_dim`` and ``head`` (the final layer)."""
    key = name.lower().replace("_", "-")
    if key == "mlp":
        return MLP(**kwargs)
    if key == "small-cnn":
        return SmallCNN(**kwargs)
    if key in ("resnet18", "resnet34", "resnet50"):
        return ResNetRegressor(arch=key, **kwargs)
    if key == "depth-resnet50":
        return DepthResNet(encoder="resnet50", **kwargs)
    raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
