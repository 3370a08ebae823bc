"""balanced_sam.integrations.torchmetrics: the same report as balanced_sam.metrics, with states
that sync across ranks (merged in process, and through a real two-process gloo group)."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch

pytest.importorskip("torchmetrics")

from balanced_sam import LabelBins  # noqa: E402
from balanced_sam import metrics as core  # noqa: E402
from balanced_sam.integrations.torchmetrics import (  # noqa: E402
    RegionMetric,
    RegressionMetrics,
    flatten_report,
)


def _data(n: int, seed: int, depth: bool = False):
    g = torch.Generator().manual_seed(seed)
    if depth:
        t = 0.5 + 9.5 * torch.rand(n, generator=g) ** 2  # continuous, long-tailed
    else:
        t = (60 * torch.rand(n, generator=g) ** 3).round()  # integer ages, long-tailed
    p = t + 3 * torch.randn(n, generator=g)
    p[:5] = t[:5]  # exact predictions: GM's zero handling
    if depth:
        p = p.clamp_min(0.01)
    return p, t


def _bins(depth: bool = False) -> LabelBins:
    _, train = _data(600 if depth else 3000, 99, depth)
    if depth:
        return LabelBins.from_labels(train, bin_width=0.5, lower=0.0, upper=10.5)
    return LabelBins.from_labels(train, bin_width=1.0, lower=0, upper=61)


def assert_same_report(a, b):
    assert a.keys() == b.keys()
    for region in a:
        assert a[region].keys() == b[region].keys(), region
        for m, va in a[region].items():
            vb = b[region][m]
            if isinstance(va, float) and math.isnan(va):
                assert math.isnan(vb), (region, m, vb)
            else:
                assert va == pytest.approx(vb, rel=1e-12, abs=1e-12), (region, m, va, vb)


CASES = [
    dict(),
    dict(balance="label"),
    dict(balance="bin"),
    dict(gm_eps=0.0),
    dict(many=30, few=5),
    dict(depth=True, balance="bin"),
    dict(depth=True),
]


@pytest.mark.parametrize("kw", CASES, ids=[str(c) for c in CASES])
def test_same_report_as_regression_metrics(kw):
    depth = kw.get("depth", False)
    bins = _bins(depth)
    ref = core.RegressionMetrics(bins, **kw)
    tm = RegressionMetrics(bins, **kw)
    for seed in range(40):  # more batches than the compaction period of the label lists
        p, t = _data(64, seed, depth)
        mask = torch.rand(64, generator=torch.Generator().manual_seed(seed)) > 0.2
        ref.update(p, t, mask)
        tm.update(p, t, mask)
    rep = tm.compute()
    assert_same_report(rep, ref.compute())
    assert tm.balance_used == ref.balance_used
    if kw.get("balance", "auto") == "auto":  # ages: discrete; depths: continuous
        assert tm.balance_used == ("bin" if depth else "label")
    nonempty = [r for r in ("many", "medium", "few") if rep[r]["count"] > 0]
    assert len(nonempty) >= (2 if "many" in kw else 3), rep  # the regions are exercised
    if kw.get("gm_eps") == 0.0:
        assert rep["all"]["gm"] == 0.0  # the exact predictions, as the reference


def test_empty_region_and_reset():
    bins = _bins()
    tm = RegressionMetrics(bins, many=10**6, few=0)  # every bin is "medium"
    p, t = _data(50, 0)
    tm.update(p, t)
    rep = tm.compute()
    assert rep["many"]["count"] == 0 and math.isnan(rep["many"]["mae"])
    assert_same_report(rep, core.regression_report(p, t, bins, 10**6, 0))
    tm.reset()
    with pytest.warns(UserWarning, match="called before"):  # torchmetrics' own warning
        assert tm.compute()["all"]["count"] == 0


def test_two_ranks_merged_equal_one_process():
    """What DDP's sync does, in one process: sum the bin states, concatenate the label lists."""
    bins = _bins()
    ref = core.RegressionMetrics(bins)
    ranks = [RegressionMetrics(bins), RegressionMetrics(bins)]
    for seed in range(10):
        p, t = _data(40, seed)
        ref.update(p, t)
        ranks[seed % 2].update(p, t)
    # the ranks saw different label sets: their bMAE differs from the whole one
    alone = ranks[0].compute()["all"]["bmae"]
    assert alone != pytest.approx(ref.compute()["all"]["bmae"])
    ranks[0].merge_state(ranks[1])
    assert_same_report(ranks[0].compute(), ref.compute())


def test_region_metric_is_a_scalar_and_validates():
    bins = _bins()
    few = RegionMetric(bins, region="few", metric="mae")
    p, t = _data(200, 3)
    few.update(p, t)
    v = few.compute()
    assert v.ndim == 0
    assert float(v) == pytest.approx(core.regression_report(p, t, bins)["few"]["mae"])
    assert not few.higher_is_better
    assert RegionMetric(bins, metric="delta1", depth=True).higher_is_better
    with pytest.raises(ValueError, match="metric must be one of"):
        RegionMetric(bins, metric="delta1")
    with pytest.raises(ValueError, match="region must be one of"):
        RegionMetric(bins, region="tail")
    with pytest.raises(ValueError, match="balance"):
        RegressionMetrics(bins, balance="sample")
    with pytest.raises(TypeError, match="LabelBins"):
        RegressionMetrics([0, 1, 2])
    with pytest.raises(ValueError, match="does not match"):
        RegressionMetrics(bins).update(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        RegressionMetrics(bins).update(torch.tensor([math.nan]), torch.tensor([1.0]))


def test_flatten_report():
    rep = {"all": {"mae": 1.0, "count": 3}, "few": {"mae": 2.0, "count": 1}}
    assert flatten_report(rep, "val/") == {"val/all/mae": 1.0, "val/all/count": 3,
                                          "val/few/mae": 2.0, "val/few/count": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str, idle_rank1: bool) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        bins = _bins()
        m = RegressionMetrics(bins)
        # rank 1 sees fewer batches than rank 0 and only some labels, or none at all
        for seed in range(rank, 9, world):
            if rank == 1 and idle_rank1:
                break
            p, t = _data(40, seed)
            m.update(p, t)
        torch.save(m.compute(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
@pytest.mark.parametrize("idle_rank1", [False, True], ids=["uneven", "one-rank-without-data"])
def test_real_gloo_sync_across_two_processes(tmp_path, idle_rank1):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    # fork: the children inherit the imported modules (spawn re-imports torch: ~25 s here)
    mp.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path), idle_rank1), nprocs=2,
                       join=True, start_method="fork")
    bins = _bins()
    ref = core.RegressionMetrics(bins)
    for seed in range(0, 9, 2) if idle_rank1 else range(9):
        ref.update(*_data(40, seed))
    want = ref.compute()
    for rank in (0, 1):
        assert_same_report(torch.load(tmp_path / f"rank{rank}.pt"), want)
