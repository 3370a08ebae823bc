"""The learning-rate plan a run saves, and the checks a checkpoint must pass to be resumed.

* :class:`LRPlan`: the per-epoch learning-rate multiplier (warm-up, then cosine, the reference
  code's cosine, steps or constant), stored in ``last.pt``; :meth:`LRPlan.extended` re-plans it
  when a resumed run gets a new epoch count, so the learning rate never jumps back up.
  :func:`lr_lambdas` attaches it to an optimizer's parameter groups.
* :func:`check_optimizer_state`, :func:`load_weights`, :func:`check_same_config`,
  :func:`check_same_data`: a checkpoint's optimizer state, weights, config and data fingerprint
  must fit the run that resumes it, with an error that says what differs.

:func:`balanced_sam.train.fit` uses them; ``balanced_sam.train`` re-exports ``LRPlan``,
``check_optimizer_state`` and ``load_weights``. The random generators' states that a checkpoint
also carries are saved and restored by :mod:`balanced_sam.runtime`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from balanced_sam.config import SAFE_TO_CHANGE, TrainConfig
from balanced_sam.errors import spell

__all__ = ["LRPlan", "lr_lambdas", "check_optimizer_state", "load_weights", "check_same_config",
           "check_same_data"]


# ---------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class LRPlan:
    """The learning-rate multiplier of every epoch (0-based).

    Warm-up first (``(e + 1) / warmup_epochs``), then the schedule. A cosine runs from the factor
    ``start_factor`` at epoch ``start`` down to ``lr_min_factor``: ``cosine`` over ``e - start =
    0 .. n-1`` with ``n = epochs - start`` (it never quite reaches the floor), ``cosine_ref`` over
    ``1 .. n`` (its last epoch runs at the floor). A fresh plan starts at the end of the warm-up
    with factor 1; :meth:`extended` starts a new segment where a resumed run stands.
    """

    schedule: str
    epochs: int
    lr_min_factor: float = 1e-3
    warmup_epochs: int = 0
    step_size: int = 5
    gamma: float = 0.1
    start: int | None = None  # a re-planned segment: first epoch of the segment
    start_factor: float = 1.0

    @classmethod
    def of(cls, cfg: TrainConfig) -> LRPlan:
        return cls(cfg.schedule, cfg.epochs, cfg.lr_min_factor, cfg.warmup_epochs,
                   cfg.step_size, cfg.gamma)

    def __call__(self, epoch: int) -> float:
        if self.start is None and self.warmup_epochs and epoch < self.warmup_epochs:
            return (epoch + 1) / self.warmup_epochs
        if self.schedule in ("cosine", "cosine_ref"):
            start = self.warmup_epochs if self.start is None else self.start
            n = max(1, self.epochs - start)
            k = epoch - start + (1 if self.schedule == "cosine_ref" else 0)
            cos = (1 + math.cos(math.pi * min(k, n) / n)) / 2
            return self.lr_min_factor + (self.start_factor - self.lr_min_factor) * cos
        if self.schedule == "step":
            return self.gamma ** (epoch // self.step_size)
        return 1.0

    def extended(self, epochs: int, at: int) -> LRPlan:
        """The plan of a run that stands at epoch ``at`` (epochs ``0..at-1`` done) and now ends
        after ``epochs``: a cosine is re-planned from the factor it has reached down to the
        floor at the new end, so the learning rate only goes down; other schedules depend on
        the epoch alone and are unchanged. Same total: the plan itself."""
        if epochs == self.epochs:
            return self
        if self.schedule not in ("cosine", "cosine_ref") or at <= self.warmup_epochs:
            return LRPlan(**{**self.to_dict(), "epochs": epochs})
        # cosine: continue from the factor the old plan gives the next epoch; cosine_ref: from
        # the factor of the last epoch run (its segment's first epoch is already one step down)
        reached = self(at) if self.schedule == "cosine" else self(at - 1)
        return LRPlan(**{**self.to_dict(), "epochs": epochs, "start": at,
                         "start_factor": reached})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unscheduled(epoch: int) -> float:
    return 1.0


def lr_lambdas(opt: torch.optim.Optimizer, plan: LRPlan) -> list[Callable[[int], float]]:
    """The plan for every parameter group, except those marked ``scheduled: False`` (a
    plug-in's own parameter, e.g. Balanced MSE's noise scale), whose lr stays fixed."""
    return [plan if g.get("scheduled", True) else _unscheduled for g in opt.param_groups]


# ---------------------------------------------------------------------------- checkpoints
def check_optimizer_state(opt: torch.optim.Optimizer, state: Mapping[str, Any],
                          model: nn.Module | None = None, source: str = "the checkpoint") -> None:
    """Refuse an optimizer state whose per-parameter tensors (momentum buffers, Adam moments,
    a stored perturbation) do not have their parameter's shape: ``load_state_dict`` takes such
    a state when it holds as many parameters, and the run fails at its next step deep inside
    torch. Nested states (a SAM wrapper's ``base_optimizer``) are checked too; the parameter
    is named by ``model``'s parameter names when given."""
    params = [p for g in opt.param_groups for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}

    def walk(sd: Any, where: str) -> None:
        if not isinstance(sd, Mapping):
            return
        if isinstance(sd.get("state"), Mapping) and isinstance(sd.get("param_groups"), list):
            ids = [i for g in sd["param_groups"] if isinstance(g, Mapping)
                   for i in g.get("params", [])]
            if len(ids) != len(params):
                raise ValueError(f"the optimizer state in {source} ({where or 'top level'}) "
                                 f"holds {len(ids)} parameters, the model's optimizer "
                                 f"{len(params)}: it was written for another model")
            by_id = dict(zip(ids, params))
            for i, per_param in sd["state"].items():
                p = by_id.get(i)
                if p is None or not isinstance(per_param, Mapping):
                    continue
                for key, v in per_param.items():
                    if key != "step" and isinstance(v, torch.Tensor) and v.shape != p.shape:
                        name = names.get(id(p), f"parameter {i}")
                        raise ValueError(
                            f"the optimizer state in {source} does not fit the model: "
                            f"{where}{key} of {name} is {tuple(v.shape)} there, the parameter "
                            f"is {tuple(p.shape)}; it was written for another model")
        for key, sub in sd.items():
            if key != "state" and isinstance(sub, Mapping):
                walk(sub, f"{where}{key}.")

    walk(state, "")


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "the "
                 "checkpoint") -> None:
    """``model.load_state_dict(state)`` with an error that says which weights do not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} in {source}, {tuple(v.shape)} in the model"
              for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        detail = "; ".join([*shapes[:3], *(f"missing {missing[:3]}" for _ in [0] if missing),
                            *(f"unexpected {unexpected[:3]}" for _ in [0] if unexpected)])
        raise ValueError(f"the weights in {source} do not fit the model built from its config "
                         f"({detail}); was the model section, or the data's number of "
                         "features, changed?")
    model.load_state_dict(state)


def check_same_config(saved: Mapping[str, Any], cfg: TrainConfig) -> None:
    """A resumed run must learn what the checkpoint learned: only :data:`SAFE_TO_CHANGE` (and
    ``epochs``, which re-plans the schedule) may differ."""
    ignore = SAFE_TO_CHANGE | {"epochs"}
    diff = {k: (saved.get(k), v) for k, v in cfg.to_dict().items()
            if k not in ignore and k in saved and saved[k] != v}
    if diff:
        detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume: the checkpoint was trained with another config "
                         f"({detail}); only {', '.join(sorted(SAFE_TO_CHANGE))} and epochs may "
                         "change on resume")


def check_same_data(saved: str | None, now: str | None, allow: bool) -> None:
    """A resumed run must train on the data the checkpoint saw (same fingerprint), unless
    ``allow`` (``allow_data_change``); an unknown fingerprint is not checked."""
    if saved is None or now is None or saved == now or allow:
        return
    raise ValueError(
        f"cannot resume: the data changed since the checkpoint was written (fingerprint "
        f"{saved[:12]} then, {now[:12]} now: the table or split file, or a split parameter, "
        f"differs). Train in a new folder, or pass {spell('allow_data_change')} to continue on "
        "the new data anyway")
