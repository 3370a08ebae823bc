r"""Feature regularisers: RankSim, ConR and Ordinal Entropy.

Each is a batch-level scalar computed from the model's features (``model(x,
return_features=True)``) and the targets, added to the reduced regression loss. With the
optimizers of this package, ``loss_fn()`` returns ``(per_sample_losses, regulariser)`` and the
regulariser is added, unweighted, in every pass. The modules below (:class:`RankSim`,
:class:`ConR`, :class:`OrdinalEntropy`) include their weight (:math:`\gamma`, :math:`\beta`,
:math:`\lambda_d, \lambda_t`), with defaults from the authors' code; the functions give the
unweighted terms.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "blackbox_rank",
    "ranksim_loss",
    "conr_loss",
    "ordinal_entropy",
    "RankSim",
    "ConR",
    "OrdinalEntropy",
    "unique_label_subset",
]


def _positive(value: Any, name: str, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} "
                         f"number, got {value!r}")
    return float(value)


def _flat_features(features: torch.Tensor, name: str = "features") -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.dim() < 2:
        raise ValueError(f"{name} must be a tensor of shape (batch, dim, ...), got "
                         f"{getattr(features, 'shape', type(features).__name__)}")
    return features.reshape(features.shape[0], -1)


def _label_matrix(targets: torch.Tensor, n: int, name: str = "targets") -> torch.Tensor:
    """Labels as ``(n, k)``: scalar labels ``(n,)`` / ``(n, 1)`` or label vectors ``(n, k)``."""
    if not isinstance(targets, torch.Tensor) or targets.shape[:1] != (n,) or targets.dim() > 2:
        raise ValueError(f"{name} must have shape ({n},) or ({n}, k) to match the features, "
                         f"got {getattr(targets, 'shape', type(targets).__name__)}")
    return targets.reshape(n, -1)


def _unique_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct rows of ``(n, k)`` labels: ``(values (m, k), inverse (n,), counts (m,))``;
    scalar labels take the much faster one-dimensional path."""
    if labels.shape[1] == 1:
        values, inverse, counts = torch.unique(labels.reshape(-1), return_inverse=True,
                                               return_counts=True)
        return values[:, None], inverse, counts
    return torch.unique(labels, dim=0, return_inverse=True, return_counts=True)


def _l1_distances(labels: torch.Tensor) -> torch.Tensor:
    """``|y_i - y_j|`` summed over label dimensions, ``(n, n)``."""
    return (labels[:, None, :] - labels[None, :, :]).abs().sum(-1)


# ============================================================================ RankSim
def _rank_normalised(scores: torch.Tensor) -> torch.Tensor:
    """Row-wise rank / n: the largest entry of a row gets ``1/n``, the smallest ``1``. Ties are
    broken by position (stable sort: the earlier index ranks higher)."""
    n = scores.shape[-1]
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    positions = torch.arange(1, n + 1, device=scores.device, dtype=scores.dtype)
    ranks = torch.empty_like(scores)
    ranks.scatter_(-1, order, positions.expand_as(scores))
    return ranks / n


class _BlackboxRank(torch.autograd.Function):
    """Ranking with the blackbox-differentiation gradient of Vlastelica/Pogancic et al. (ICLR
    2020): forward ``r = rank(s)``; backward
    ``dL/ds = -(rank(s) - rank(s + lambda * dL/dr)) / lambda``."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, lambda_val: float) -> torch.Tensor:
        ranks = _rank_normalised(scores)
        ctx.lambda_val = lambda_val
        ctx.save_for_backward(scores, ranks)
        return ranks

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        scores, ranks = ctx.saved_tensors
        perturbed = _rank_normalised(scores + ctx.lambda_val * grad_output)
        return -(ranks - perturbed) / ctx.lambda_val, None


def blackbox_rank(scores: torch.Tensor, lambda_val: float = 2.0) -> torch.Tensor:
    """Row-wise normalised ranks of ``scores`` (``1/n`` for a row's largest entry) with the
    blackbox-differentiation gradient; ``lambda_val`` is the interpolation strength."""
    return _BlackboxRank.apply(scores, _positive(lambda_val, "lambda_val"))


def unique_label_subset(targets: torch.Tensor,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of a random subset of the batch holding each distinct label once (a uniformly
    random representative per label), in batch order (so a batch of distinct labels is kept
    whole and in order)."""
    n = targets.shape[0]
    labels = targets.reshape(n, -1)
    perm = torch.randperm(n, device=targets.device, generator=generator)
    values, inverse, _ = _unique_rows(labels[perm])
    first = torch.full((values.shape[0],), n, dtype=torch.long, device=targets.device)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=targets.device), reduce="amin")
    return torch.sort(perm[first]).values


def ranksim_loss(features: torch.Tensor, targets: torch.Tensor, lambda_val: float = 2.0, *,
                 unique_labels: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    r"""RankSim (Gong, Mori and Tung, "RankSim: Ranking Similarity Regularization for Deep
    Imbalanced Regression", ICML 2022), unweighted:

    .. math::
        L_{RankSim} = \sum_i \frac1n \sum_j
            \big(\mathrm{rk}(S^z)_{ij} - \mathrm{rk}(S^y)_{ij}\big)^2

    where :math:`S^z_{ij}` is the cosine similarity of the features of samples ``i`` and ``j``,
    :math:`S^y_{ij} = -|y_i - y_j|`, and :math:`\mathrm{rk}` ranks each row (normalised to
    ``1/n .. 1``); the feature ranking is differentiated with :func:`blackbox_rank`
    (``lambda_val``, the paper's :math:`\lambda`). The sum runs over the anchors ``i`` (not a
    mean), as in the paper and its code, so the value grows with the batch.

    With ``unique_labels`` (default, as the reference code) the loss is computed on a random
    subset holding each distinct label once (:func:`unique_label_subset`), which removes most
    ties and gives rare labels a larger share; continuous labels are usually all distinct, so
    for them this changes nothing. Ties left in a row (labels at equal distance on either side)
    are broken by position, deterministically; the reference breaks them by an unstable sort.
    """
    x = _flat_features(features)
    y = _label_matrix(targets, x.shape[0])
    if x.shape[0] == 0:
        raise ValueError("ranksim_loss needs a non-empty batch")
    if unique_labels:
        idx = unique_label_subset(y, generator)
        x, y = x[idx], y[idx]
    z = F.normalize(x, dim=1)
    feature_ranks = blackbox_rank(z @ z.T, lambda_val)
    with torch.no_grad():
        label_ranks = _rank_normalised(-_l1_distances(y).to(z.dtype))
    return (feature_ranks - label_ranks).square().sum() / y.shape[0]


class RankSim(nn.Module):
    r"""RankSim as a weighted regulariser: ``gamma * ranksim_loss(features, targets,
    lambda_val)``. Defaults ``gamma=100``, ``lambda_val=2`` are the values the authors' AgeDB-DIR
    README gives (its ``train.py`` defaults differ: weight 0, i.e. off, and lambda 1). ``generator``
    makes the unique-label subsample reproducible (and the same in both passes of a SAM step
    if reseeded)."""

    def __init__(self, gamma: float = 100.0, lambda_val: float = 2.0,
                 unique_labels: bool = True) -> None:
        super().__init__()
        self.gamma = _positive(gamma, "gamma", allow_zero=True)
        self.lambda_val = _positive(lambda_val, "lambda_val")
        self.unique_labels = bool(unique_labels)

    def forward(self, features: torch.Tensor, targets: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        return self.gamma * ranksim_loss(features, targets, self.lambda_val,
                                         unique_labels=self.unique_labels, generator=generator)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:g}, lambda_val={self.lambda_val:g}"


# ============================================================================ ConR
PUSHING = ("exp", "linear")


def conr_loss(
    features: torch.Tensor,
    targets: torch.Tensor,
    preds: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    features2: torch.Tensor | None = None,
    preds2: torch.Tensor | None = None,
    omega: float = 1.0,
    tau: float = 0.07,
    e: float = 0.01,
    pushing: str = "exp",
    weight_anchors: bool = False,
) -> torch.Tensor:
    r"""ConR (Keramati, Meng and Evans, "ConR: Contrastive Regularizer for Deep Imbalanced
    Regression", ICLR 2024), unweighted.

    Over the ``N`` samples (the batch, or both views concatenated) with L2-normalised features
    :math:`z`, labels :math:`y` and (detached) predictions :math:`\hat y`:

    * positives of ``j``: :math:`K^+_j = \{i \ne j : |y_i - y_j| \le \omega\}`;
    * negatives of ``j``: :math:`K^-_j = \{q : |y_q - y_j| > \omega,\ |\hat y_q - \hat y_j| \le
      \omega\}`, samples the model already confuses with ``j``;
    * ``j`` is an anchor when :math:`K^-_j` (and :math:`K^+_j`) is not empty;
    * pushing weight :math:`S_{j,q} = \eta_j \exp(e\,|y_j - y_q|)` (``pushing="exp"``, the
      reference's AgeDB / IMDB-WIKI form) or :math:`\eta_j\, e\, |y_j - y_q|` (``"linear"``,
      its NYUD2 form), with :math:`\eta_j` the anchor's density weight ``weights[j]`` (e.g. its
      SQINV or LDS weight; 1 when ``weights`` is None);

    .. math::
        L_j = -\frac{1}{|K^+_j|} \sum_{i \in K^+_j} \log
            \frac{\exp(z_j \cdot z_i / \tau)}{\sum_{p \in K^+_j} \exp(z_j \cdot z_p / \tau)
                  + \sum_{q \in K^-_j} S_{j,q} \exp(z_j \cdot z_q / \tau)},
        \qquad L_{ConR} = \frac1N \sum_{j\ \mathrm{anchor}} L_j .

    Label distances are L1 (summed over label dimensions for vector labels; for depth maps pass
    per-image mean depths and predictions, as the reference does).

    Views: the paper contrasts two augmented views of every image (``features2``, ``preds2``;
    the other view of the same image is then always a positive). With one view (the default
    here) the positives are the other batch samples within :math:`\omega`; an anchor without
    any is skipped. Differences from the reference code, where we follow the paper: its
    denominator also adds :math:`e^0 = 1` for every non-positive pair (a masking artefact); it
    multiplies each anchor's loss by its weight again (``weight_anchors=True`` reproduces
    that); an anchor without positives gives NaN there. Its NYUD2 code (the depth form, with
    ``pushing="linear"``) differs once more: it keeps each sample's match with itself among the
    positives and divides each anchor's sum by :math:`|K^+_j| + 1` instead of
    :math:`|K^+_j|`; we use the paper's :math:`K^+_j` (``i \ne j``) and :math:`1/|K^+_j|` for
    every dataset.
    """
    z, y, p, w = _conr_views(features, targets, preds, weights, features2, preds2)
    omega = _positive(omega, "omega", allow_zero=True)
    tau = _positive(tau, "tau")
    e = _positive(e, "e", allow_zero=True)
    if pushing not in PUSHING:
        raise ValueError(f"pushing must be one of {PUSHING}, got {pushing!r}")
    z = F.normalize(z, dim=1)
    dl = _l1_distances(y).to(z.dtype)
    dp = _l1_distances(p).to(z.dtype)
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    pos = (dl <= omega) & ~eye
    neg = (dl > omega) & (dp <= omega)
    w = w.to(z.dtype)
    if pushing == "exp":
        log_push = torch.log(w)[:, None] + e * dl
    else:
        log_push = torch.log(w[:, None] * e * dl)
    per_anchor, anchor = _conr_per_anchor((z @ z.T) / tau, pos, neg, log_push)
    if weight_anchors:
        per_anchor = per_anchor * w
    return torch.where(anchor, per_anchor, torch.zeros_like(per_anchor)).sum() / z.shape[0]


def _conr_views(features: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor,
                weights: torch.Tensor | None, features2: torch.Tensor | None,
                preds2: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat features, label matrix, detached predictions and weights of the ``N`` samples: the
    batch, or both views concatenated (checked)."""
    z = _flat_features(features)
    n1 = z.shape[0]
    y = _label_matrix(targets, n1)
    p = _label_matrix(preds.detach(), n1, "preds")
    w = torch.ones(n1, dtype=z.dtype, device=z.device) if weights is None else weights.reshape(-1)
    if w.shape != (n1,):
        raise ValueError(f"weights must hold one weight per sample ({n1}), got "
                         f"{tuple(weights.shape)}")  # type: ignore[union-attr]
    if (features2 is None) != (preds2 is None):
        raise ValueError("give features2 and preds2 together (the second view), or neither")
    if features2 is None:
        return z, y, p, w
    z2 = _flat_features(features2, "features2")
    if z2.shape != z.shape:
        raise ValueError(f"features2 must have the shape of features {tuple(z.shape)}, got "
                         f"{tuple(z2.shape)}")
    p2 = _label_matrix(preds2.detach(), n1, "preds2")  # type: ignore[union-attr]
    return torch.cat([z, z2]), torch.cat([y, y]), torch.cat([p, p2]), torch.cat([w, w])


def _conr_per_anchor(logits: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                     log_push: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ConR term ``L_j`` (positives weight 1 in the denominator, negatives
    ``S_jq``) and which rows are anchors."""
    anchor = neg.any(1) & pos.any(1)
    # log of the denominator: positives with weight 1, negatives with S_jq; rows that are not
    # anchors get a dummy all-valid row so every log-sum-exp (and its gradient) stays finite
    valid = pos | neg
    terms = torch.where(neg, logits + log_push, logits)
    terms = torch.where(valid | ~anchor[:, None], terms, torch.full_like(terms, -math.inf))
    log_denom = torch.logsumexp(terms, dim=1, keepdim=True)
    log_prob = torch.where(pos, logits - log_denom, torch.zeros_like(logits))
    return -log_prob.sum(1) / pos.sum(1).clamp_min(1), anchor


class ConR(nn.Module):
    r"""ConR as a weighted regulariser: ``beta * conr_loss(...)``.

    Defaults from the authors' AgeDB-DIR code: ``beta=4`` (:math:`\beta`, the loss weight),
    ``omega=1`` (the similarity window ``w``: labels within one year are similar),
    ``tau=0.07`` (the temperature its loss uses; the ``-t 0.2`` argument of that script is
    overridden inside the loss), ``e=0.01`` and the exponential pushing weight. Their NYUD2 code
    uses ``beta=0.2, omega=0.2, tau=0.2, e=0.2`` with ``pushing="linear"``.
    """

    def __init__(self, beta: float = 4.0, omega: float = 1.0, tau: float = 0.07,
                 e: float = 0.01, pushing: str = "exp", weight_anchors: bool = False) -> None:
        super().__init__()
        self.beta = _positive(beta, "beta", allow_zero=True)
        self.omega = _positive(omega, "omega", allow_zero=True)
        self.tau = _positive(tau, "tau")
        self.e = _positive(e, "e", allow_zero=True)
        if pushing not in PUSHING:
            raise ValueError(f"pushing must be one of {PUSHING}, got {pushing!r}")
        self.pushing = pushing
        self.weight_anchors = bool(weight_anchors)

    def forward(self, features: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor,
                weights: torch.Tensor | None = None, features2: torch.Tensor | None = None,
                preds2: torch.Tensor | None = None) -> torch.Tensor:
        return self.beta * conr_loss(
            features, targets, preds, weights=weights, features2=features2, preds2=preds2,
            omega=self.omega, tau=self.tau, e=self.e, pushing=self.pushing,
            weight_anchors=self.weight_anchors)

    def extra_repr(self) -> str:
        return (f"beta={self.beta:g}, omega={self.omega:g}, tau={self.tau:g}, e={self.e:g}, "
                f"pushing={self.pushing!r}")


# ============================================================================ Ordinal Entropy
def ordinal_entropy(features: torch.Tensor, targets: torch.Tensor, lambda_d: float = 1.0,
                    lambda_t: float = 1.0) -> torch.Tensor:
    r"""Ordinal Entropy (Zhang et al., "Improving Deep Regression with Ordinal Entropy", ICLR
    2023): :math:`\lambda_t L_t + \lambda_d L_d`, with both terms as in the authors'
    age-estimation code.

    Group the batch by distinct label; :math:`c_m` is the L2-normalised mean feature of group
    ``m`` (label :math:`y_m`), :math:`\hat z_i` the normalised feature of sample ``i`` and
    ``m(i)`` its group.

    * diversity (the entropy term, :math:`L_d \le 0`): :math:`L_d = -\operatorname{mean}_{m<m'}
      w_{mm'} \|c_m - c_{m'}\|_2`, :math:`w_{mm'} = (|y_m - y_{m'}| - \min) / \max` over the
      pairs (the code's normalisation; the paper writes the raw label distance). It spreads the
      group centres apart, the more the farther their labels.
    * tightness: :math:`L_t = \operatorname{mean}_i \|\hat z_i - c_{m(i)}\|_2` over the samples
      whose distance is not exactly zero (as the code, which so skips samples alone in their
      group); 0 when there are none.

    Continuous labels are usually all distinct, so every group is one sample and only the
    diversity term acts; pass binned labels (e.g. ``bins.centers[bins.bin_index(y)]``) to group
    them. Fewer than two distinct labels give :math:`L_d = 0`.
    """
    x = _flat_features(features)
    n = x.shape[0]
    y = _label_matrix(targets, n)
    if n == 0:
        raise ValueError("ordinal_entropy needs a non-empty batch")
    values, inverse, counts = _unique_rows(y)
    m = values.shape[0]
    centres = torch.zeros(m, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, inverse, x)
    centres = F.normalize(centres / counts[:, None].to(x.dtype), dim=1)
    zero = x.new_zeros(())
    if m >= 2:
        iu = torch.triu_indices(m, m, 1, device=x.device)
        sq = centres.square().sum(1)
        gram = centres @ centres.T
        d2 = sq[iu[0]] + sq[iu[1]] - 2.0 * gram[iu[0], iu[1]]
        dist = d2.clamp_min(1e-12).sqrt()  # as the reference: finite gradient at coincidence
        lw = (values[iu[0]] - values[iu[1]]).to(x.dtype).square().sum(1).sqrt()
        lw = (lw - lw.min()) / lw.max()
        diversity = (lw * dist).mean()
    else:
        diversity = zero
    r = (F.normalize(x, dim=1) - centres[inverse]).square().sum(1)
    nonzero = r > 0
    root = torch.sqrt(torch.where(nonzero, r, torch.ones_like(r)))
    tightness = torch.where(nonzero, root, torch.zeros_like(r)).sum() / nonzero.sum().clamp_min(1)
    return lambda_t * tightness - lambda_d * diversity


class OrdinalEntropy(nn.Module):
    r"""Ordinal Entropy as a regulariser: :math:`\lambda_t L_t + \lambda_d L_d` (see
    :func:`ordinal_entropy`); ``lambda_d = lambda_t = 1`` as the authors' code adds both terms
    unweighted."""

    def __init__(self, lambda_d: float = 1.0, lambda_t: float = 1.0) -> None:
        super().__init__()
        self.lambda_d = _positive(lambda_d, "lambda_d", allow_zero=True)
        self.lambda_t = _positive(lambda_t, "lambda_t", allow_zero=True)

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ordinal_entropy(features, targets, self.lambda_d, self.lambda_t)

    def extra_repr(self) -> str:
        return f"lambda_d={self.lambda_d:g}, lambda_t={self.lambda_t:g}"
