"""Feature regularisers: RankSim (and its blackbox ranking), ConR, Ordinal Entropy.

Every formulation is checked against a hand computation or an independent naive loop written
here from the paper's formula, on 2-6 samples with 2-3 feature dimensions.
"""

from __future__ import annotations

import math

import pytest
import torch

from balanced_sam.baselines import (
    ConR,
    OrdinalEntropy,
    RankSim,
    blackbox_rank,
    conr_loss,
    ordinal_entropy,
    ranksim_loss,
    unique_label_subset,
)


# ------------------------------------------------------------------------------ naive helpers
def _ranks(row: list[float]) -> list[float]:
    """Normalised ranks, largest first (1/n), ties by position."""
    n = len(row)
    order = sorted(range(n), key=lambda j: (-row[j], j))
    out = [0.0] * n
    for r, j in enumerate(order):
        out[j] = (r + 1) / n
    return out


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _naive_ranksim(feats: list[list[float]], labels: list[float]) -> float:
    n = len(labels)
    total = 0.0
    for i in range(n):
        fr = _ranks([_cos(feats[i], feats[j]) for j in range(n)])
        lr = _ranks([-abs(labels[i] - labels[j]) for j in range(n)])
        total += sum((a - b) ** 2 for a, b in zip(fr, lr)) / n
    return total


# ------------------------------------------------------------------------------ RankSim
def test_blackbox_rank_forward_and_backward_by_hand() -> None:
    s = torch.tensor([[0.1, 0.5, 0.3], [1.0, 1.0, 0.0]], requires_grad=True)
    r = blackbox_rank(s, lambda_val=2.0)
    want = torch.tensor([[1, 1 / 3, 2 / 3], [1 / 3, 2 / 3, 1]])  # the tie: first one first
    torch.testing.assert_close(r.detach(), want)
    r.backward(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    # row 0: rank(s + 2 g) = rank([2.1, .5, .3]) = [1/3, 2/3, 1]; grad = -(r - r') / 2
    assert s.grad[0].tolist() == pytest.approx([-1 / 3, 1 / 6, 1 / 6])
    assert s.grad[1].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="lambda_val"):
        blackbox_rank(s, lambda_val=0.0)


def test_ranksim_hand_value() -> None:
    feats = [[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]
    f = torch.tensor(feats, requires_grad=True)
    # labels ordered as the features: every row's ranking agrees, the loss and gradient are 0
    agree = ranksim_loss(f, torch.tensor([0.0, 1.0, 3.0]))
    assert agree.item() == 0.0
    agree.backward()
    assert torch.equal(f.grad, torch.zeros_like(f))
    # swap two labels: each row has two ranks off by 1/3 -> 3 rows x (2/9) / 3 = 2/9
    f.grad = None
    loss = ranksim_loss(f, torch.tensor([0.0, 3.0, 1.0]))
    assert loss.item() == pytest.approx(2 / 9)
    assert loss.item() == pytest.approx(_naive_ranksim(feats, [0.0, 3.0, 1.0]))
    loss.backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_ranksim_matches_naive_loop_on_random_batches() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        feats = torch.randn(6, 3, generator=g)
        labels = torch.randperm(20, generator=g)[:6].float()  # distinct: no subsampling
        got = ranksim_loss(feats, labels.reshape(6, 1))
        want = _naive_ranksim(feats.tolist(), labels.tolist())
        assert float(got) == pytest.approx(want, rel=1e-6)


def test_ranksim_unique_label_subset() -> None:
    labels = torch.tensor([5.0, 5.0, 7.0, 5.0, 9.0])
    picks = set()
    for seed in range(30):
        idx = unique_label_subset(labels, torch.Generator().manual_seed(seed))
        assert sorted(labels[idx].tolist()) == [5.0, 7.0, 9.0]
        assert idx.tolist() == sorted(idx.tolist())  # kept in batch order
        picks.add(int(idx[labels[idx] == 5.0]))
    assert picks == {0, 1, 3}  # a random representative of the repeated label
    feats = torch.randn(5, 2)
    gen = torch.Generator().manual_seed(3)
    idx = unique_label_subset(labels, torch.Generator().manual_seed(3))
    got = ranksim_loss(feats, labels, generator=gen)
    assert float(got) == pytest.approx(_naive_ranksim(feats[idx].tolist(), labels[idx].tolist()))
    # without subsampling the duplicates stay (ties broken by position)
    full = ranksim_loss(feats, labels, unique_labels=False)
    assert float(full) == pytest.approx(_naive_ranksim(feats.tolist(), labels.tolist()))


def test_ranksim_descent_aligns_the_rankings() -> None:
    torch.manual_seed(0)
    f = torch.randn(5, 3, requires_grad=True)
    y = torch.tensor([0.0, 1.0, 2.0, 5.0, 9.0])
    start = ranksim_loss(f, y).item()
    opt = torch.optim.SGD([f], lr=0.05)
    for _ in range(120):
        opt.zero_grad()
        ranksim_loss(f, y, lambda_val=2.0).backward()
        opt.step()
    assert start > 0.05 and ranksim_loss(f, y).item() < 0.3 * start


def test_ranksim_module_weight_and_errors() -> None:
    f, y = torch.randn(4, 2), torch.tensor([0.0, 2.0, 1.0, 3.0])
    assert float(RankSim(gamma=3.0)(f, y)) == pytest.approx(3 * float(ranksim_loss(f, y)))
    assert RankSim().gamma == 100.0 and RankSim().lambda_val == 2.0
    with pytest.raises(ValueError, match="gamma"):
        RankSim(gamma=-1.0)
    with pytest.raises(ValueError, match="targets"):
        ranksim_loss(f, torch.zeros(3))
    with pytest.raises(ValueError, match="features"):
        ranksim_loss(torch.zeros(4), y)


# ------------------------------------------------------------------------------ ConR
def _naive_conr(z, y, p, w, omega, tau, e, pushing="exp", weight_anchors=False) -> float:
    """The paper's L_ConR written with loops (z: list of feature lists; y, p, w: lists)."""
    n = len(y)
    zn = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in z]

    def sim(a: int, b: int) -> float:
        return sum(x * v for x, v in zip(zn[a], zn[b])) / tau

    total = 0.0
    for j in range(n):
        pos = [i for i in range(n) if i != j and abs(y[i] - y[j]) <= omega]
        neg = [q for q in range(n) if abs(y[q] - y[j]) > omega and abs(p[q] - p[j]) <= omega]
        if not pos or not neg:
            continue
        push = [w[j] * (math.exp(e * abs(y[j] - y[q])) if pushing == "exp"
                        else e * abs(y[j] - y[q])) for q in neg]
        den = sum(math.exp(sim(j, i)) for i in pos) + sum(s * math.exp(sim(j, q))
                                                         for s, q in zip(push, neg))
        lj = -sum(math.log(math.exp(sim(j, i)) / den) for i in pos) / len(pos)
        total += lj * (w[j] if weight_anchors else 1.0)
    return total / n


def test_conr_hand_value() -> None:
    f = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]], requires_grad=True)
    y = torch.tensor([0.0, 0.5, 3.0])
    preds = torch.tensor([0.2, 0.4, 0.6])
    w = torch.tensor([1.0, 2.0, 1.0])
    loss = conr_loss(f, y, preds, weights=w, omega=1.0, tau=1.0, e=0.1)
    # anchors 0 and 1 (positive: each other; negative: sample 2); sample 2 has no positive
    l0 = -(0.6 - math.log(math.exp(0.6) + math.exp(0.3) * math.exp(0.0)))
    l1 = -(0.6 - math.log(math.exp(0.6) + 2 * math.exp(0.25) * math.exp(0.8)))
    assert loss.item() == pytest.approx((l0 + l1) / 3, rel=1e-6)
    loss.backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


@pytest.mark.parametrize("pushing", ["exp", "linear"])
@pytest.mark.parametrize("weight_anchors", [False, True])
def test_conr_matches_naive_loop(pushing: str, weight_anchors: bool) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        f = torch.randn(6, 3, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (6,), generator=g).double()
        p = y + torch.randn(6, generator=g, dtype=torch.float64) * 1.5
        w = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
        got = conr_loss(f, y, p, weights=w, omega=1.0, tau=0.5, e=0.2, pushing=pushing,
                        weight_anchors=weight_anchors)
        want = _naive_conr(f.tolist(), y.tolist(), p.tolist(), w.tolist(), 1.0, 0.5, 0.2,
                           pushing, weight_anchors)
        assert float(got) == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_conr_two_views() -> None:
    g = torch.Generator().manual_seed(2)
    f1, f2 = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    y = torch.tensor([0.0, 3.0, 6.0, 9.0])  # no two samples within omega: views are the positives
    p1, p2 = torch.tensor([1.0, 1.5, 2.0, 9.0]), torch.tensor([1.2, 1.1, 2.5, 9.1])
    got = conr_loss(f1, y, p1, features2=f2, preds2=p2)  # the defaults: omega 1, tau .07, e .01
    want = _naive_conr(torch.cat([f1, f2]).tolist(), (y.tolist() * 2),
                       torch.cat([p1, p2]).tolist(), [1.0] * 8, 1.0, 0.07, 0.01)
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(got) > 0
    with pytest.raises(ValueError, match="together"):
        conr_loss(f1, y, p1, features2=f2)


def test_conr_without_anchors_is_zero_with_finite_gradient() -> None:
    f = torch.randn(3, 2, requires_grad=True)
    y = torch.tensor([0.0, 0.5, 0.9])     # all within omega: no negatives, no anchor
    loss = conr_loss(f, y, y.clone())
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(f.grad, torch.zeros_like(f))


def test_conr_module_and_errors() -> None:
    f, y, p = torch.randn(4, 2), torch.tensor([0.0, 0.2, 5.0, 5.5]), torch.zeros(4)
    m = ConR(beta=2.0, tau=0.5)
    assert float(m(f, y, p)) == pytest.approx(2 * float(conr_loss(f, y, p, tau=0.5)))
    assert (ConR().beta, ConR().omega, ConR().tau, ConR().e) == (4.0, 1.0, 0.07, 0.01)
    with pytest.raises(ValueError, match="tau"):
        ConR(tau=0.0)
    with pytest.raises(ValueError, match="pushing"):
        conr_loss(f, y, p, pushing="square")
    with pytest.raises(ValueError, match="weights"):
        conr_loss(f, y, p, weights=torch.ones(3))
    with pytest.raises(ValueError, match="preds"):
        conr_loss(f, y, torch.zeros(5))


# ------------------------------------------------------------------------------ Ordinal Entropy
def _naive_oe(feats, labels, lambda_d=1.0, lambda_t=1.0) -> float:
    def norm(v):
        s = math.sqrt(sum(x * x for x in v))
        return [x / s for x in v]

    groups: dict[float, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, []).append(i)
    keys = sorted(groups)
    centres = {}
    for k in keys:
        idx = groups[k]
        mean = [sum(feats[i][d] for i in idx) / len(idx) for d in range(len(feats[0]))]
        centres[k] = norm(mean)
    pairs = [(a, b) for ai, a in enumerate(keys) for b in keys[ai + 1:]]
    if pairs:
        dl = [abs(a - b) for a, b in pairs]
        lo, hi = min(dl), max(dl)
        terms = [((d - lo) / hi) * math.dist(centres[a], centres[b])
                 for d, (a, b) in zip(dl, pairs)]
        diversity = sum(terms) / len(terms)
    else:
        diversity = 0.0
    dists = [math.dist(norm(feats[i]), centres[labels[i]]) for i in range(len(labels))]
    dists = [d for d in dists if d > 0]
    tight = sum(dists) / len(dists) if dists else 0.0
    return lambda_t * tight - lambda_d * diversity


def test_ordinal_entropy_hand_value() -> None:
    feats = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]
    f = torch.tensor(feats, requires_grad=True)
    y = torch.tensor([1.0, 1.0, 2.0, 4.0])
    loss = ordinal_entropy(f, y)
    # group 1: centre (1,1)/sqrt2, samples at distance sqrt(2 - sqrt2) each; groups 2, 4 alone.
    # centres c1 = c2 = (1,1)/sqrt2, c4 = (-1,0); label gaps 1, 3, 2 -> weights 0, 2/3, 1/3
    c4_dist = math.dist([1 / math.sqrt(2)] * 2, [-1.0, 0.0])
    diversity = (0 + 2 / 3 * c4_dist + 1 / 3 * c4_dist) / 3
    tight = math.sqrt(2 - math.sqrt(2))
    assert loss.item() == pytest.approx(tight - diversity, rel=1e-6)
    assert loss.item() == pytest.approx(_naive_oe(feats, y.tolist()), rel=1e-6)
    loss.backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_ordinal_entropy_matches_naive_loop_and_weights() -> None:
    g = torch.Generator().manual_seed(4)
    for _ in range(4):
        f = torch.randn(6, 3, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (6,), generator=g).double()
        got = ordinal_entropy(f, y, lambda_d=0.5, lambda_t=2.0)
        assert float(got) == pytest.approx(_naive_oe(f.tolist(), y.tolist(), 0.5, 2.0),
                                           rel=1e-9, abs=1e-12)
    m = OrdinalEntropy(lambda_d=0.0)
    f, y = torch.randn(4, 2), torch.tensor([1.0, 1.0, 3.0, 3.0])
    assert float(m(f, y)) >= 0  # tightness alone


def test_ordinal_entropy_single_label_and_all_distinct() -> None:
    f = torch.randn(3, 2, requires_grad=True)
    only_tight = ordinal_entropy(f, torch.ones(3))
    assert only_tight.item() == pytest.approx(_naive_oe(f.tolist(), [1.0] * 3))
    # all labels distinct: every sample is its own centre, only diversity acts (<= 0)
    div = ordinal_entropy(f, torch.tensor([0.0, 1.0, 5.0]))
    assert div.item() <= 0
    div.backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ with a model
@pytest.mark.parametrize("reg", ["ranksim", "conr", "ordinal-entropy"])
def test_regulariser_gradient_reaches_the_encoder(reg: str) -> None:
    from balanced_sam.models import MLP

    torch.manual_seed(0)
    model = MLP(3, hidden=(8, 4))
    x = torch.randn(12, 3)
    y = torch.tensor([0.0, 0.0, 1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 6.0, 8.0, 9.0, 9.0])
    module = {"ranksim": RankSim(), "conr": ConR(omega=0.5, tau=0.5),
              "ordinal-entropy": OrdinalEntropy()}[reg]
    pred, feats = model(x, return_features=True)
    base = (pred - y).abs().mean()
    term = module(feats, y, pred) if reg == "conr" else module(feats, y)
    assert term.dim() == 0 and torch.isfinite(term)
    first = model.net[0].weight
    (g_base,) = torch.autograd.grad(base, first, retain_graph=True)
    (g_reg,) = torch.autograd.grad(term, first)
    assert torch.isfinite(g_reg).all() and g_reg.abs().sum() > 0
    assert not torch.allclose(g_base, g_base + g_reg)
    # the regulariser never touches the head: its gradient there is exactly zero
    pred, feats = model(x, return_features=True)
    term = module(feats, y, pred) if reg == "conr" else module(feats, y)
    (g_head,) = torch.autograd.grad(term, model.head.weight, allow_unused=True,
                                    materialize_grads=True)
    assert torch.equal(g_head, torch.zeros_like(g_head))
