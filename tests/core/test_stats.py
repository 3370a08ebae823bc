"""Paired statistics: the Student-t quantile, one paired comparison, bench results, the text."""

from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pytest

from balanced_sam.stats import (
    COMPARISON_METRICS,
    UnpairedRunsError,
    detectable_effect,
    format_comparisons,
    paired_comparisons,
    paired_difference,
    parse_effect,
    seeds_needed,
    t_cdf,
    t_ppf,
    t_test_power,
)

# two-sided 95% critical values as printed in every t table
TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 7: 2.365, 10: 2.228,
             30: 2.042, 120: 1.980}


@pytest.mark.parametrize("df,value", sorted(TABLE_975.items()))
def test_t_quantile_matches_the_table(df: int, value: float) -> None:
    assert t_ppf(0.975, df) == pytest.approx(value, abs=6e-4)
    assert t_ppf(0.025, df) == pytest.approx(-value, abs=6e-4)


def test_t_quantile_other_levels_and_limits() -> None:
    assert t_ppf(0.95, 4) == pytest.approx(2.132, abs=6e-4)
    assert t_ppf(0.995, 7) == pytest.approx(3.499, abs=6e-4)
    assert t_ppf(0.5, 3) == 0.0
    # large df tends to the normal quantile 1.95996...
    assert t_ppf(0.975, 1e6) == pytest.approx(1.959966, abs=1e-5)
    # the cdf inverts the quantile, for integer and fractional df, far into the tails
    for df in (1, 1.5, 2, 3, 6.5, 29, 400):
        for q in (1e-6, 0.01, 0.3, 0.8, 0.975, 0.999999):
            assert t_cdf(t_ppf(q, df), df) == pytest.approx(q, rel=1e-9, abs=1e-13)
    assert t_cdf(0.0, 5) == 0.5
    assert t_cdf(math.inf, 5) == 1.0 and t_cdf(-math.inf, 5) == 0.0
    assert t_cdf(-1.3, 4) == pytest.approx(1 - t_cdf(1.3, 4), abs=1e-15)
    # df = 1 is the Cauchy distribution
    assert t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-14)


def test_t_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 7, 9.5, 15, 30, 100, 1000):
        for q in (0.001, 0.05, 0.6, 0.9, 0.975, 0.995, 0.9999):
            assert t_ppf(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-10)
        for x in (-12.0, -2.0, -0.1, 0.7, 3.3, 40.0):
            assert t_cdf(x, df) == pytest.approx(stats.t.cdf(x, df), rel=1e-10, abs=1e-15)


@pytest.mark.parametrize("q", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_t_quantile_rejects_bad_probabilities(q: float) -> None:
    with pytest.raises(ValueError, match="q must be a probability"):
        t_ppf(q, 3)


@pytest.mark.parametrize("df", [0, -1, math.inf, math.nan, "three"])
def test_t_rejects_bad_degrees_of_freedom(df) -> None:
    with pytest.raises(ValueError, match="df"):
        t_ppf(0.9, df)
    with pytest.raises(ValueError, match="df"):
        t_cdf(1.0, df)


# ---------------------------------------------------------------------------- one comparison
def test_paired_difference_by_hand() -> None:
    # d = (-1, +1, -2): mean -2/3, sd sqrt(7/3), se sd / sqrt(3), t(0.975, 2) = 4.302653
    c = paired_difference([3.0, 5.0, 4.0], [4.0, 4.0, 6.0])
    half = 4.302652729749464 * math.sqrt(7 / 3) / math.sqrt(3)
    assert c["mean"] == pytest.approx(-2 / 3, abs=1e-12)
    assert c["ci_low"] == pytest.approx(-2 / 3 - half, abs=1e-9)
    assert c["ci_high"] == pytest.approx(-2 / 3 + half, abs=1e-9)
    assert (c["wins"], c["n"]) == (2, 3)
    assert c["ci_low"] == pytest.approx(-4.4613, abs=1e-4)
    assert c["ci_high"] == pytest.approx(3.1280, abs=1e-4)


def test_paired_difference_two_seeds_uses_t_with_one_df() -> None:
    # d = (-1, -3): mean -2, sd sqrt(2), se 1, t(0.975, 1) = 12.7062
    c = paired_difference([1.0, 2.0], [2.0, 5.0])
    assert c["mean"] == pytest.approx(-2.0)
    assert c["ci_low"] == pytest.approx(-14.7062, abs=1e-4)
    assert c["ci_high"] == pytest.approx(10.7062, abs=1e-4)
    assert (c["wins"], c["n"]) == (2, 2)


def test_paired_difference_one_seed_has_no_interval() -> None:
    c = paired_difference([1.5], [2.0])
    assert c == {"mean": -0.5, "ci_low": None, "ci_high": None, "wins": 1, "n": 1,
                 "sd": None, "mde": None, "effect": pytest.approx(0.1), "seeds_needed": None}
    c = paired_difference([2.5], [2.0])
    assert c["wins"] == 0 and c["ci_low"] is None


def test_ties_are_not_wins() -> None:
    c = paired_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.5])
    assert c["wins"] == 1
    c = paired_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    # no spread: any true difference would be seen by two seeds
    assert c == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "wins": 0, "n": 3, "sd": 0.0,
                 "mde": 0.0, "effect": pytest.approx(0.1), "seeds_needed": 2}


def test_paired_difference_confidence_level() -> None:
    d = [0.3, -1.2, 0.8, 2.0, -0.4]
    c90 = paired_difference(d, [0.0] * 5, confidence=0.90)
    c95 = paired_difference(d, [0.0] * 5)
    assert c95["ci_low"] < c90["ci_low"] < c90["ci_high"] < c95["ci_high"]
    se = float(np.std(d, ddof=1)) / math.sqrt(5)
    assert c90["ci_high"] - c90["mean"] == pytest.approx(2.131847 * se, rel=1e-6)


def test_paired_difference_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="pair up"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="baseline must be finite"):
        paired_difference([1.0], [math.nan])
    with pytest.raises(ValueError, match="values must be finite"):
        paired_difference([None], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1.0, 2.0], [1.0, 1.0], confidence=95)


@pytest.mark.parametrize("n", [3, 8])
def test_interval_covers_the_true_difference_95_percent_of_the_time(n: int) -> None:
    rng = np.random.default_rng(1234 + n)
    reps, true_diff = 4000, 0.7
    base = rng.normal(10.0, 3.0, size=(reps, n))
    method = base + rng.normal(true_diff, 2.0, size=(reps, n))  # paired: shared seed noise
    covered = 0
    z_covered = 0
    for a, b in zip(method, base):
        c = paired_difference(a.tolist(), b.tolist(), power=None)  # the interval alone
        covered += c["ci_low"] <= true_diff <= c["ci_high"]
        se = float(np.std(a - b, ddof=1)) / math.sqrt(n)
        z_covered += abs(c["mean"] - true_diff) <= 1.96 * se
    # binomial sd of the coverage over 4000 replicates is 0.0034: allow about 4 of them
    assert abs(covered / reps - 0.95) < 0.015
    if n == 3:  # the normal quantile would cover only ~81%: the test tells them apart
        assert z_covered / reps < 0.9


# ---------------------------------------------------------------------------- bench results
def _report(mae: float, few: float | None = None) -> dict:
    few_mae = mae + 3 if few is None else few
    rep = {}
    for region, v in (("all", mae), ("many", mae - 1), ("medium", mae + 1), ("few", few_mae)):
        rep[region] = {"mae": v, "gm": 0.6 * v, "bmae": 1.1 * v, "count": 10}
    return rep


def _results() -> dict:
    base = {0: 10.0, 1: 11.0, 2: 9.5}
    bsam = {0: 9.0, 1: 11.0, 2: 9.0}  # d = -1, 0, -0.5 at the selected rho
    bsam_other = {0: 50.0, 1: 50.0, 2: 50.0}  # a rho not selected: must be ignored
    van = {0: 12.0, 1: 12.5, 2: 13.0}
    return {"dataset": "x", "methods": {
        "vanilla": {"selected_rho": None,
                    "runs": [{"seed": s, "rho": None, "test": _report(v)}
                             for s, v in van.items()]},
        "sqinv": {"selected_rho": None,
                  "runs": [{"seed": s, "rho": None, "test": _report(v)}
                           for s, v in reversed(base.items())]},  # order must not matter
        "bsam": {"selected_rho": 0.05,
                 "runs": [{"seed": s, "rho": 0.1, "test": _report(v)}
                          for s, v in bsam_other.items()]
                 + [{"seed": s, "rho": 0.05, "test": _report(v)} for s, v in bsam.items()]},
    }}


def test_paired_comparisons_of_bench_results() -> None:
    res = _results()
    cmp = paired_comparisons(res)
    assert list(cmp) == ["vanilla", "bsam"]  # the baseline is not compared with itself
    assert set(cmp["bsam"]) == {f"{m}_{r}" for m, r in COMPARISON_METRICS}
    assert set(cmp["bsam"]) == {"mae_all", "mae_many", "mae_medium", "mae_few", "gm_all",
                                "bmae_all"}
    exp = paired_difference([9.0, 11.0, 9.0], [10.0, 11.0, 9.5])
    assert cmp["bsam"]["mae_all"] == exp
    assert cmp["bsam"]["mae_all"]["wins"] == 2  # the tie on seed 1 is not a win
    assert cmp["bsam"]["gm_all"]["mean"] == pytest.approx(0.6 * exp["mean"])
    assert cmp["vanilla"]["mae_few"]["mean"] == pytest.approx(
        np.mean([12.0 - 10.0, 12.5 - 11.0, 13.0 - 9.5]))
    assert cmp["vanilla"]["mae_all"]["wins"] == 0
    # JSON-ready (no NaN, plain types), as results.json needs
    json.dumps(cmp, allow_nan=False)
    # another baseline, a subset of methods, the validation split
    cmp = paired_comparisons(res, baseline="bsam", methods=["sqinv"])
    assert list(cmp) == ["sqinv"]
    assert cmp["sqinv"]["mae_all"]["mean"] == pytest.approx(-exp["mean"])
    with pytest.raises(ValueError, match="not in the results"):
        paired_comparisons(res, methods=["sam"])


def test_empty_region_gives_none_for_that_metric_only() -> None:
    res = _results()
    res["methods"]["bsam"]["runs"][-1]["test"]["few"]["mae"] = None  # JSON form of NaN
    res["methods"]["vanilla"]["runs"][0]["test"]["few"]["mae"] = math.nan
    cmp = paired_comparisons(res)
    assert cmp["bsam"]["mae_few"] is None and cmp["vanilla"]["mae_few"] is None
    assert cmp["bsam"]["mae_all"]["n"] == 3
    text = format_comparisons(cmp)
    assert "n/a (empty region in some run)" in text


def test_unpaired_seeds_are_refused_or_skipped_explicitly() -> None:
    res = _results()
    del res["methods"]["bsam"]["runs"][-1]  # bsam lacks seed 2 at its selected rho
    res["methods"]["bsam"]["runs"].append({"seed": 7, "rho": 0.05, "test": _report(1.0)})
    with pytest.raises(UnpairedRunsError, match=r"bsam has seeds \[7\].*sqinv has seeds \[2\]"):
        paired_comparisons(res)
    with pytest.warns(UserWarning, match=r"shared seed\(s\) \[0, 1\]"):
        cmp = paired_comparisons(res, unpaired="skip")
    assert cmp["bsam"]["mae_all"] == paired_difference([9.0, 11.0], [10.0, 11.0])
    assert cmp["vanilla"]["mae_all"]["n"] == 3
    # nothing in common: no comparison is possible even when skipping
    res["methods"]["bsam"]["runs"] = [{"seed": 9, "rho": 0.05, "test": _report(1.0)}]
    with pytest.raises(UnpairedRunsError, match="no seed in common"):
        paired_comparisons(res, unpaired="skip")
    with pytest.raises(ValueError, match="unpaired must be"):
        paired_comparisons(res, unpaired="ignore")


def test_bad_results_are_refused_clearly() -> None:
    res = _results()
    with pytest.raises(ValueError, match="baseline 'sam' is not among"):
        paired_comparisons(res, baseline="sam")
    with pytest.raises(ValueError, match="'methods' mapping"):
        paired_comparisons({"runs": []})
    dup = copy.deepcopy(res)
    dup["methods"]["sqinv"]["runs"].append(copy.deepcopy(dup["methods"]["sqinv"]["runs"][0]))
    with pytest.raises(ValueError, match="two runs with seed"):
        paired_comparisons(dup)
    several = copy.deepcopy(res)
    del several["methods"]["bsam"]["selected_rho"]
    with pytest.raises(ValueError, match="several rho values"):
        paired_comparisons(several)
    # one rho and no selected_rho: that rho is the one
    one = copy.deepcopy(res)
    del one["methods"]["vanilla"]["selected_rho"]
    assert paired_comparisons(one)["vanilla"]["mae_all"]["n"] == 3
    missing = copy.deepcopy(res)
    missing["methods"]["bsam"]["selected_rho"] = 0.2
    with pytest.raises(ValueError, match="no run at its selected rho 0.2"):
        paired_comparisons(missing)


def test_one_paired_seed_reports_no_interval() -> None:
    res = _results()
    for m in res["methods"].values():
        m["runs"] = [r for r in m["runs"] if r["seed"] == 1]
    cmp = paired_comparisons(res)
    assert cmp["vanilla"]["mae_all"]["n"] == 1
    assert cmp["vanilla"]["mae_all"]["ci_low"] is None
    assert "one seed: no interval" in format_comparisons(cmp)


def test_text_says_plainly_what_the_interval_shows() -> None:
    cmp = {"bsam": {"mae_all": {"mean": -0.5, "ci_low": -1.2, "ci_high": 0.2, "wins": 6, "n": 8},
                    "mae_few": {"mean": -1.5, "ci_low": -2.5, "ci_high": -0.5, "wins": 8,
                                "n": 8}},
           "sam": {"mae_all": {"mean": 0.9, "ci_low": 0.1, "ci_high": 1.7, "wins": 1, "n": 8}}}
    text = format_comparisons(cmp, baseline="sqinv", unit="deg")
    lines = text.splitlines()
    assert "method - sqinv (deg)" in lines[0] and "95% interval" in lines[0]
    row = {(ln.split()[0], " ".join(ln.split()[1:3])): ln for ln in lines[1:]}
    assert "-0.50 [-1.20, +0.20]" in row["bsam", "MAE All"]
    assert "wins 6/8" in row["bsam", "MAE All"]
    assert "no evidence of a difference" in row["bsam", "MAE All"]
    assert "bsam better" in row["bsam", "MAE Few"]
    assert "sam worse" in row["sam", "MAE All"]
    assert "no evidence" not in row["sam", "MAE All"]
    assert format_comparisons({}) == "no methods to compare with sqinv"


def test_formatted_numbers_follow_a_real_comparison() -> None:
    rng = random.Random(0)
    res = _results()
    for m in res["methods"].values():
        for r in m["runs"]:
            r["test"]["all"]["mae"] += rng.random()
    cmp = paired_comparisons(res)
    c = cmp["bsam"]["mae_all"]
    text = format_comparisons(cmp, digits=3)
    assert f"{c['mean']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]" in text


def test_paired_differences_plot(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from balanced_sam.plots import plot_paired_differences

    res = _results()
    res["methods"]["bsam"]["runs"][-1]["test"]["few"]["mae"] = None  # an empty region: n/a
    cmp = paired_comparisons(res)
    out = plot_paired_differences(cmp, tmp_path / "sub" / "paired.png", unit="deg")
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    one = {"bsam": {"mae_all": {"mean": -0.3, "ci_low": None, "ci_high": None, "wins": 1,
                                "n": 1}}}
    assert plot_paired_differences(one, tmp_path / "one.png").stat().st_size > 0
    with pytest.raises(ValueError, match="non-empty"):
        plot_paired_differences({}, tmp_path / "none.png")


# ---------------------------------------------------------------------------- power
def test_power_matches_published_two_sample_values() -> None:
    # R's power.t.test documentation: n = 20 per group, delta = 1, sd = 1 -> power 0.8689528;
    # power 0.90 at delta = 1 needs n = 22.02 per group (so 22 falls short and 23 is enough)
    assert t_test_power(1.0, 1.0, 20, design="two_sample") == pytest.approx(0.8689528, abs=1e-6)
    assert t_test_power(1.0, 1.0, 22, design="two_sample") < 0.90
    assert t_test_power(1.0, 1.0, 23, design="two_sample") >= 0.90


def test_power_of_the_paired_test_by_its_definition() -> None:
    # noncentral t with df = n - 1 and noncentrality effect * sqrt(n) / sd, two-sided 5%
    from scipy import stats as st

    n, sd, e = 10, 0.87, 0.5
    crit = st.t.ppf(0.975, n - 1)
    nc = e * math.sqrt(n) / sd
    want = st.nct.sf(crit, n - 1, nc) + st.nct.cdf(-crit, n - 1, nc)
    assert t_test_power(e, sd, n) == pytest.approx(want, rel=1e-12)
    assert t_test_power(-e, sd, n) == pytest.approx(want, rel=1e-12)  # two-sided
    assert t_test_power(0.0, sd, n) == pytest.approx(0.05, abs=1e-12)  # the test's level


def test_detectable_effect_is_the_root_and_near_the_textbook_formula() -> None:
    from scipy import stats as st

    # the figure: a paired sd of 0.87 degrees over 10 seeds detects about 0.87 degrees
    mde = detectable_effect(0.87, 10)
    assert mde == pytest.approx(0.8665, abs=1e-4)
    assert t_test_power(mde, 0.87, 10) == pytest.approx(0.80, abs=1e-9)
    for n in (2, 3, 5, 10, 30):
        approx = (st.t.ppf(0.975, n - 1) + st.t.ppf(0.80, n - 1)) * 1.0 / math.sqrt(n)
        exact = detectable_effect(1.0, n)
        # the approximation is off for very few seeds (above the root for 2 and 3), close
        # from 5 on
        if n < 5:
            assert exact > approx
        else:
            assert exact == pytest.approx(approx, rel=0.015)
    assert detectable_effect(2.0, 10) == pytest.approx(2 * detectable_effect(1.0, 10), rel=1e-9)
    assert detectable_effect(1.0, 10, power=0.9) > detectable_effect(1.0, 10)
    assert detectable_effect(0.0, 5) == 0.0


def test_independent_power_solver_agrees() -> None:
    sm = pytest.importorskip("statsmodels.stats.power")
    for n in (3, 5, 10, 20):
        d = sm.TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8)
        assert detectable_effect(1.0, n) == pytest.approx(d, rel=1e-5)


def test_seeds_needed_is_the_inverse() -> None:
    for sd in (0.3, 0.87, 2.5):
        for e in (0.2, 1.0, 3.0):
            n = seeds_needed(e, sd)
            assert n is not None and n >= 2
            assert t_test_power(e, sd, n) >= 0.8
            if n > 2:
                assert t_test_power(e, sd, n - 1) < 0.8
                # and the detectable effect at n seeds is within reach, at n - 1 it is not
                assert detectable_effect(sd, n) <= e < detectable_effect(sd, n - 1)
    assert seeds_needed(1.0, 0.87) == 9
    assert seeds_needed(0.0, 1.0) is None
    assert seeds_needed(1.0, 0.0) == 2
    assert seeds_needed(1e-3, 1.0) is None  # beyond MAX_SEEDS


@pytest.mark.parametrize("call", [
    lambda: detectable_effect(-1.0, 5), lambda: detectable_effect(float("nan"), 5),
    lambda: detectable_effect(1.0, 1), lambda: detectable_effect(1.0, 5, power=1.0),
    lambda: seeds_needed(float("inf"), 1.0), lambda: t_test_power(1.0, 1.0, 5, design="x"),
    lambda: parse_effect("-5%"), lambda: parse_effect("abc"), lambda: parse_effect("nan"),
])
def test_power_arguments_are_checked(call) -> None:
    with pytest.raises(ValueError):
        call()


def test_paired_difference_power_entries() -> None:
    d = [0.3, -1.2, 0.8, 2.0, -0.4]
    base = [20.0, 21.0, 19.0, 20.0, 20.0]
    c = paired_difference([a + b for a, b in zip(d, base)], base)
    sd = float(np.std(d, ddof=1))
    assert c["sd"] == pytest.approx(sd, rel=1e-12)
    assert c["mde"] == pytest.approx(detectable_effect(sd, 5), rel=1e-12)
    assert c["effect"] == pytest.approx(0.05 * 20.0)  # 5% of the baseline's mean
    assert c["seeds_needed"] == seeds_needed(1.0, sd)
    c = paired_difference([a + b for a, b in zip(d, base)], base, effect=2.0, power=0.9)
    assert c["effect"] == 2.0 and c["seeds_needed"] == seeds_needed(2.0, sd, power=0.9)
    assert c["mde"] == pytest.approx(detectable_effect(sd, 5, power=0.9), rel=1e-12)
    assert paired_difference(d, [0.0] * 5, effect=None)["seeds_needed"] is None
    bare = paired_difference(d, [0.0] * 5, power=None)
    assert bare["mde"] is None and bare["seeds_needed"] is None and bare["sd"] is not None
    assert parse_effect("5%") == ("relative", 0.05) and parse_effect(1.5) == ("absolute", 1.5)


def test_power_line_where_the_interval_includes_zero() -> None:
    cmp = {"bsam": {"mae_all": paired_difference([10.1, 9.4, 10.6, 9.9], [10.0, 10.0, 10.0,
                                                                           10.0])}}
    text = format_comparisons(cmp)
    mde = cmp["bsam"]["mae_all"]["mde"]
    assert f"the seeds could not have detected an effect smaller than {mde:.2f}" in text
    full = format_comparisons(cmp, power=True)
    assert f"needs {cmp['bsam']['mae_all']['seeds_needed']} seeds" in full
    # an interval that excludes 0 gets no such sentence unless power is asked for
    sure = {"bsam": {"mae_all": paired_difference([9.0, 9.1, 8.9], [10.0, 10.0, 10.0])}}
    assert "could not have detected" not in format_comparisons(sure)
    assert "smallest effect detectable" in format_comparisons(sure, power=True)
    assert all(len(line) <= 100 for line in full.splitlines() if "power" in line)
