r"""Paired comparisons of methods over seeds: mean difference, Student-t interval, wins.

Runs of a benchmark that share a seed share their data split, initial weights and batch order,
so the difference of two methods *on the same seed* is far less noisy than either method's
spread over seeds. For a method M against a baseline B and a metric where lower is better
(errors), each paired seed :math:`s` gives :math:`d_s = M_s - B_s`; over :math:`n` seeds:

* ``mean``: :math:`\bar d = \frac1n \sum_s d_s` (negative: M has the lower error);
* ``ci_low``, ``ci_high``: :math:`\bar d \mp t_{1-\alpha/2,\,n-1}\, s_d / \sqrt n`, the Student-t
  confidence interval (95% by default) for the mean difference, with :math:`s_d` the sample
  standard deviation of the :math:`d_s`. With ``n = 1`` there is no interval: both are ``None``;
* ``wins``: the number of seeds where M is better (:math:`d_s < 0`); a tie is not a win;
* ``n``: the number of paired seeds.

An interval that includes 0 is no evidence of a difference at that level. The interval assumes
the per-seed differences are roughly normal and independent across seeds; with 5-8 seeds it is
a fair description of what the runs show, not a guarantee about other data sets.

:func:`paired_comparisons` takes ``bsam bench``'s ``results.json`` dictionary and returns, for
every method but the baseline::

    {METHOD: {"mae_all": {"mean", "ci_low", "ci_high", "wins", "n"}, "mae_many": ...,
              "mae_medium": ..., "mae_few": ..., "gm_all": ..., "bmae_all": ...}}

(an entry is ``None`` when the region is empty, i.e. the metric is missing or NaN, in one of the
paired runs; ``{"mean": None, ..., "n": 0}`` when no pair is left). A run marked
``"diverged": true`` (``bsam bench`` marks them) is left out of every pair it belongs to: that
seed drops out of the method's comparison (or, for the baseline's run, out of every
comparison), and ``n`` says how many pairs remain; :func:`left_out_seeds` names them.
:func:`format_comparisons` prints it. The Student-t quantiles come from SciPy (imported only here).

Power (:func:`detectable_effect`, :func:`seeds_needed`, :func:`t_test_power`): an interval that
includes 0 says little unless the seeds could have seen an effect of interest. With
:math:`s_d` the paired standard deviation, the smallest true difference that :math:`n` seeds
detect with 80% power in a two-sided 5% test (the minimum detectable effect, ``mde``) and the
seeds a given effect would need (``seeds_needed``) come from the noncentral t distribution at
:math:`n-1` degrees of freedom, the same t the intervals use. :func:`paired_difference` adds
``sd``, ``mde``, ``effect`` and ``seeds_needed`` to each comparison.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "t_cdf",
    "t_ppf",
    "t_test_power",
    "detectable_effect",
    "seeds_needed",
    "parse_effect",
    "DEFAULT_EFFECT",
    "DEFAULT_POWER",
    "paired_difference",
    "paired_comparisons",
    "left_out_seeds",
    "format_comparisons",
    "COMPARISON_METRICS",
    "UnpairedRunsError",
    "is_finite",
]

#: the (metric, region) pairs compared, keyed ``f"{metric}_{region}"`` in the output
COMPARISON_METRICS: tuple[tuple[str, str], ...] = (
    ("mae", "all"), ("mae", "many"), ("mae", "medium"), ("mae", "few"), ("gm", "all"),
    ("bmae", "all"),
)

_LABELS = {"mae": "MAE", "gm": "GM", "bmae": "bMAE", "mse": "MSE", "rmse": "RMSE",
           "all": "All", "many": "Many", "medium": "Med.", "few": "Few"}


class UnpairedRunsError(ValueError):
    """A method and the baseline do not have runs for the same seeds."""


# ---------------------------------------------------------------------------- Student t
def _scipy_stats() -> Any:
    """SciPy's distributions, imported here so that the library core needs only torch + numpy."""
    try:
        from scipy import stats
    except ImportError as exc:  # pragma: no cover - scipy comes with the cli extra
        raise ImportError("the paired statistics need SciPy: pip install 'balanced-sam[cli]' "
                          "(or pip install scipy)") from exc
    return stats


def _check_df(df: float) -> float:
    try:
        df = float(df)
    except (TypeError, ValueError):
        raise ValueError(f"df (degrees of freedom) must be a number > 0, got {df!r}") from None
    if not (df > 0 and math.isfinite(df)):
        raise ValueError(f"df (degrees of freedom) must be a finite number > 0, got {df!r}")
    return df


def t_cdf(x: float, df: float) -> float:
    """:math:`P(T \\le x)` for Student's t with ``df`` degrees of freedom (any real ``df > 0``)."""
    df = _check_df(df)
    x = float(x)
    if math.isnan(x):
        raise ValueError("x must not be NaN")
    return float(_scipy_stats().t.cdf(x, df))


def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (inverse of
    :func:`t_cdf`), e.g. ``t_ppf(0.975, 4) = 2.776...``."""
    df = _check_df(df)
    q = float(q)
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be a probability strictly between 0 and 1, got {q!r}")
    return float(_scipy_stats().t.ppf(q, df))


# ---------------------------------------------------------------------------- power
def _check_power_args(sd: float, n: int, alpha: float, power: float) -> None:
    if not (is_finite(sd) and sd >= 0):
        raise ValueError(f"sd (the paired standard deviation) must be a finite number >= 0, "
                         f"got {sd!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n (the number of paired seeds) must be an integer >= 2, got {n!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be strictly between 0 and 1, got {alpha!r}")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be strictly between 0 and 1, got {power!r}")


def t_test_power(effect: float, sd: float, n: int, *, alpha: float = 0.05,
                 design: str = "paired") -> float:
    r"""Power of the two-sided t test at level ``alpha`` to detect a true mean difference
    ``effect`` (in the metric's units) with standard deviation ``sd``.

    ``design="paired"`` (the bench's comparisons): ``n`` paired seeds, the one-sample t test of
    the differences, :math:`
u = n - 1`, noncentrality :math:`\delta = 	ext{effect}\sqrt n/sd`.
    ``design="two_sample"``: ``n`` runs per group with a common ``sd``, :math:`
u = 2n - 2`,
    :math:`\delta = 	ext{effect}/(sd\sqrt{2/n})`. Power is
    :math:`P(T_{
u,\delta} > t_{1-lpha/2,
u}) + P(T_{
u,\delta} < -t_{1-lpha/2,
u})`
    with :math:`T_{
u,\delta}` the noncentral t (exact, not the normal approximation).
    """
    if design not in ("paired", "two_sample"):
        raise ValueError(f"design must be 'paired' or 'two_sample', got {design!r}")
    _check_power_args(sd, n, alpha, 0.5)
    if not is_finite(effect):
        raise ValueError(f"effect must be a finite number, got {effect!r}")
    if sd == 0:
        return 1.0 if effect != 0 else alpha
    st = _scipy_stats()
    if design == "paired":
        df, nc = n - 1, abs(effect) * math.sqrt(n) / sd
    else:
        df, nc = 2 * n - 2, abs(effect) / (sd * math.sqrt(2.0 / n))
    crit = st.t.ppf(1.0 - alpha / 2.0, df)
    upper = float(st.nct.sf(crit, df, nc))
    if not math.isfinite(upper):
        upper = 1.0 - float(st.nct.cdf(crit, df, nc))
    # the far tail below -crit; SciPy answers NaN where it is below double precision
    lower = float(st.nct.cdf(-crit, df, nc))
    return min(1.0, upper + (lower if math.isfinite(lower) else 0.0))


def detectable_effect(sd: float, n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    r"""The smallest true mean difference that ``n`` paired seeds detect with probability
    ``power`` in a two-sided test at level ``alpha`` (the minimum detectable effect, MDE), for
    paired differences of standard deviation ``sd``: the root of
    :func:`t_test_power` ``= power`` in the metric's units. Close to, and slightly above for
    small ``n``, the textbook approximation
    :math:`(t_{1-lpha/2,n-1} + t_{power,n-1})\, sd/\sqrt n`, which ignores the far tail.
    """
    _check_power_args(sd, n, alpha, power)
    if sd == 0:
        return 0.0
    st = _scipy_stats()
    df = n - 1
    guess = (st.t.ppf(1 - alpha / 2, df) + st.t.ppf(power, df)) * sd / math.sqrt(n)
    lo, hi = 0.0, 2.0 * guess
    while t_test_power(hi, sd, n, alpha=alpha) < power:
        lo, hi = hi, 2.0 * hi
    from scipy.optimize import brentq

    return float(brentq(lambda e: t_test_power(e, sd, n, alpha=alpha) - power, lo, hi,
                        xtol=1e-12 * max(sd, 1e-300), rtol=1e-12))


#: the most seeds :func:`seeds_needed` looks at before it answers ``None``
MAX_SEEDS = 100_000


def seeds_needed(effect: float, sd: float, *, alpha: float = 0.05,
                 power: float = 0.8) -> int | None:
    """The fewest paired seeds (at least 2) whose two-sided paired t test at level ``alpha``
    detects a true mean difference ``effect`` with probability at least ``power``, for paired
    differences of standard deviation ``sd`` (the inverse of :func:`detectable_effect`);
    ``None`` when ``effect`` is 0 or more than :data:`MAX_SEEDS` would be needed."""
    _check_power_args(sd, 2, alpha, power)
    if not is_finite(effect):
        raise ValueError(f"effect must be a finite number, got {effect!r}")
    if effect == 0:
        return None
    if sd == 0:
        return 2

    def enough(n: int) -> bool:
        return t_test_power(effect, sd, n, alpha=alpha) >= power

    if not enough(MAX_SEEDS):
        return None
    lo, hi = 1, 2  # enough(hi); not enough(lo) (n = 1 has no test)
    while not enough(hi):
        lo, hi = hi, min(2 * hi, MAX_SEEDS)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


# ---------------------------------------------------------------------------- one comparison
def is_finite(v: Any) -> bool:
    """A real number (int, float or a numpy scalar) that is neither NaN nor infinite."""
    return v is not None and isinstance(v, (int, float, np.floating, np.integer)) \
        and math.isfinite(float(v))


def parse_effect(effect: float | str | None) -> tuple[str, float] | None:
    """``"5%"`` -> ``("relative", 0.05)`` (a share of the baseline's mean), ``1.0`` or ``"1.0"``
    -> ``("absolute", 1.0)`` (in the metric's units), ``None`` -> ``None`` (no effect of
    interest). Refuses NaN, infinities, zero and negative values."""
    if effect is None:
        return None
    text = str(effect).strip()
    kind, body = ("relative", text[:-1]) if text.endswith("%") else ("absolute", text)
    try:
        value = float(body)
    except ValueError:
        raise ValueError(f"effect must be a number in the target's units (e.g. 1.0) or a share "
                         f"of the baseline's mean (e.g. 5%), got {effect!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"effect must be a finite number > 0, got {effect!r}")
    return (kind, value / 100.0) if kind == "relative" else (kind, value)


#: the effect of interest by default: the paper's 5% of the baseline's error
DEFAULT_EFFECT = "5%"
#: the power at which the detectable effect is stated
DEFAULT_POWER = 0.8


def paired_difference(values: Sequence[float], baseline: Sequence[float], *,
                      confidence: float = 0.95, effect: float | str | None = DEFAULT_EFFECT,
                      power: float | None = DEFAULT_POWER) -> dict[str, Any]:
    """Compare per-seed ``values`` of a method with the ``baseline``'s on the same seeds (same
    order; lower is better): ``{"mean", "ci_low", "ci_high", "wins", "n"}`` as described in the
    module docstring, and the power entries ``"sd"`` (paired standard deviation), ``"mde"``
    (the smallest true difference these seeds detect with probability ``power`` in a two-sided
    test at level ``1 - confidence``), ``"effect"`` (the effect of interest in the metric's
    units: ``effect`` as given, or a share of the baseline's mean such as the default ``"5%"``)
    and ``"seeds_needed"`` (paired seeds that detect ``effect`` with that power). With one pair
    the interval and the power entries are ``None`` (undefined); ``power=None`` leaves the
    power entries out of the computation (``None``), for callers that make many comparisons."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")
    if len(values) != len(baseline):
        raise ValueError(f"values and baseline must pair up seed by seed: got {len(values)} "
                         f"and {len(baseline)} values")
    if len(values) == 0:
        raise ValueError("values is empty: need at least one paired seed")
    for name, seq in (("values", values), ("baseline", baseline)):
        bad = [v for v in seq if not is_finite(v)]
        if bad:
            raise ValueError(f"{name} must be finite numbers, got {bad[0]!r}")
    wanted = parse_effect(effect)
    b = np.asarray(baseline, dtype=np.float64)
    d = np.asarray(values, dtype=np.float64) - b
    n = int(d.size)
    mean = float(d.mean())
    size = None if wanted is None else (
        wanted[1] * abs(float(b.mean())) if wanted[0] == "relative" else wanted[1])
    out: dict[str, Any] = {"mean": mean, "ci_low": None, "ci_high": None,
                           "wins": int((d < 0).sum()), "n": n, "sd": None, "mde": None,
                           "effect": size, "seeds_needed": None}
    if n >= 2:
        sd = float(d.std(ddof=1))
        half = t_ppf(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
        out["ci_low"], out["ci_high"] = mean - half, mean + half
        alpha = 1.0 - confidence
        out["sd"] = sd
        if power is None:
            return out
        out["mde"] = detectable_effect(sd, n, alpha=alpha, power=power)
        if size is not None and size > 0:
            out["seeds_needed"] = seeds_needed(size, sd, alpha=alpha, power=power)
    return out


# ---------------------------------------------------------------------------- bench results
def _selected_runs(name: str, entry: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    runs = entry.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"results['methods'][{name!r}] has no runs")
    if "selected_rho" in entry:
        rho = entry["selected_rho"]
    else:
        rhos = {r.get("rho") for r in runs}
        if len(rhos) > 1:
            raise ValueError(f"method {name!r} has runs at several rho values {sorted(rhos)} "
                             "but no selected_rho: say which one to compare")
        rho = rhos.pop()
    chosen = [r for r in runs if _same_rho(r.get("rho"), rho)]
    if not chosen:
        raise ValueError(f"method {name!r} has no run at its selected rho {rho!r}")
    return chosen


def _same_rho(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)


def _by_seed(name: str, runs: Iterable[Mapping[str, Any]]) -> dict[int, Mapping[str, Any]]:
    out: dict[int, Mapping[str, Any]] = {}
    for r in runs:
        if "seed" not in r:
            raise ValueError(f"a run of method {name!r} has no seed")
        s = int(r["seed"])
        if s in out:
            raise ValueError(f"method {name!r} has two runs with seed {s} at its selected rho; "
                             "cannot pair them")
        out[s] = r
    return out


def _diverged(run: Mapping[str, Any]) -> bool:
    return bool(run.get("diverged"))


def left_out_seeds(results: Mapping[str, Any], baseline: str = "sqinv",
                   methods: Sequence[str] | None = None) -> dict[str, dict[int, str]]:
    """``{METHOD: {seed: why}}``: the seeds that :func:`paired_comparisons` leaves out of each
    method's comparison with ``baseline`` because a run of the pair is marked diverged (at the
    runs' selected rho); methods with nothing left out are absent."""
    all_methods = results["methods"]
    base = _by_seed(baseline, _selected_runs(baseline, all_methods[baseline]))
    out: dict[str, dict[int, str]] = {}
    for name in methods if methods is not None else [m for m in all_methods if m != baseline]:
        if name == baseline:
            continue
        mine = _by_seed(name, _selected_runs(name, all_methods[name]))
        gone = {}
        for s in sorted(set(mine) & set(base)):
            who = [m for m, r in ((name, mine[s]), (baseline, base[s])) if _diverged(r)]
            if who:
                gone[s] = f"{' and '.join(who)} diverged"
        if gone:
            out[name] = gone
    return out


def _metric(run: Mapping[str, Any], split: str, region: str, metric: str) -> float | None:
    v = run.get(split, {}).get(region, {}).get(metric)
    return float(v) if is_finite(v) else None


def paired_comparisons(
    results: Mapping[str, Any],
    baseline: str = "sqinv",
    *,
    methods: Sequence[str] | None = None,
    metrics: Sequence[tuple[str, str]] = COMPARISON_METRICS,
    split: str = "test",
    confidence: float = 0.95,
    unpaired: str = "error",
    effect: float | str | None = DEFAULT_EFFECT,
    power: float = DEFAULT_POWER,
) -> dict[str, dict[str, dict[str, Any] | None]]:
    """Every method against ``baseline`` on the seeds both ran, from a ``results.json`` dict.

    Each method is taken at its ``selected_rho`` (the rho chosen on validation; methods without
    rho have ``None``) and paired with the baseline seed by seed. A pair with a run marked
    ``diverged`` is left out (see :func:`left_out_seeds`); ``n`` counts the pairs used.

    Args:
        results: ``bsam bench``'s results (``{"methods": {NAME: {"runs": [{"seed", "rho",
            "test": REPORT, ...}], "selected_rho": ...}}}``).
        baseline: the method every other one is compared with.
        methods: which methods to compare (default: all but the baseline, in results' order).
        metrics: ``(metric, region)`` pairs; keys of the output are ``f"{metric}_{region}"``.
        split: which report of each run to compare (``"test"`` or ``"val"``).
        confidence: of the interval (0.95: a 95% interval).
        unpaired: ``"error"`` raises :class:`UnpairedRunsError` when a method and the baseline
            did not run the same seeds; ``"skip"`` compares the seeds they share and warns
            (``UserWarning``) naming the seeds left out.
        effect, power: the effect of interest (``"5%"`` of the baseline's mean, the paper's
            size, by default; or a number in the metric's units) and the power at which the
            detectable effect (``mde``) and the seeds it needs (``seeds_needed``) are stated.

    Returns:
        ``{METHOD: {"mae_all": {"mean", "ci_low", "ci_high", "wins", "n"} | None, ...}}``; an
        entry is ``None`` when the metric is missing or NaN (an empty region) in a paired run.
    """
    if unpaired not in ("error", "skip"):
        raise ValueError(f"unpaired must be 'error' or 'skip', got {unpaired!r}")
    if not isinstance(results, Mapping) or not isinstance(results.get("methods"), Mapping):
        raise ValueError("results must be a bench results dict with a 'methods' mapping")
    all_methods = results["methods"]
    if baseline not in all_methods:
        raise ValueError(f"baseline {baseline!r} is not among the results' methods "
                         f"({', '.join(all_methods) or 'none'})")
    if methods is None:
        methods = [m for m in all_methods if m != baseline]
    unknown = [m for m in methods if m not in all_methods]
    if unknown:
        raise ValueError(f"methods {unknown} are not in the results ({', '.join(all_methods)})")
    base = _by_seed(baseline, _selected_runs(baseline, all_methods[baseline]))
    out: dict[str, dict[str, dict[str, Any] | None]] = {}
    for name in methods:
        if name == baseline:
            continue
        mine = _by_seed(name, _selected_runs(name, all_methods[name]))
        shared = sorted(set(mine) & set(base))
        only_m, only_b = sorted(set(mine) - set(base)), sorted(set(base) - set(mine))
        if only_m or only_b:
            detail = (f"{name} has seeds {only_m} that {baseline} lacks" if only_m else "") + \
                ("; " if only_m and only_b else "") + \
                (f"{baseline} has seeds {only_b} that {name} lacks" if only_b else "")
            if unpaired == "error" or not shared:
                why = "" if shared else " (no seed in common)"
                raise UnpairedRunsError(f"cannot pair {name} with {baseline} seed by seed{why}: "
                                        f"{detail}; rerun the missing seeds or pass "
                                        "unpaired='skip' to compare the shared ones")
            warnings.warn(f"{name} vs {baseline}: comparing the {len(shared)} shared seed(s) "
                          f"{shared} and leaving out the unpaired ones: {detail}", stacklevel=2)
        shared = [s for s in shared if not (_diverged(mine[s]) or _diverged(base[s]))]
        cmp = _compare_on(mine, base, shared, metrics, split,
                          dict(confidence=confidence, effect=effect, power=power))
        out[name] = cmp
    return out


def _compare_on(mine: Mapping[int, Mapping[str, Any]], base: Mapping[int, Mapping[str, Any]],
                shared: Sequence[int], metrics: Sequence[tuple[str, str]], split: str,
                options: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """One method against the baseline on the ``shared`` seeds, metric by metric."""
    cmp: dict[str, dict[str, Any] | None] = {}
    for metric, region in metrics:
        a = [_metric(mine[s], split, region, metric) for s in shared]
        b = [_metric(base[s], split, region, metric) for s in shared]
        if not shared:  # every pair had a diverged run
            cmp[f"{metric}_{region}"] = {"mean": None, "ci_low": None, "ci_high": None,
                                         "wins": 0, "n": 0, "sd": None, "mde": None,
                                         "effect": None, "seeds_needed": None}
        elif any(v is None for v in a + b):
            cmp[f"{metric}_{region}"] = None
        else:
            cmp[f"{metric}_{region}"] = paired_difference(a, b, **options)  # type: ignore[arg-type]
    return cmp


# ---------------------------------------------------------------------------- text
def _verdict(c: Mapping[str, Any], name: str, baseline: str) -> str:
    if c["ci_low"] is None:
        return "one seed: no interval"
    if c["ci_high"] < 0:
        return f"{name} better (interval below 0)"
    if c["ci_low"] > 0:
        return f"{name} worse (interval above 0)"
    return "includes 0: no evidence of a difference"  # (the interval just before it)


def format_comparisons(comparisons: Mapping[str, Mapping[str, Mapping[str, Any] | None]],
                       baseline: str = "sqinv", *, unit: str = "", digits: int = 2,
                       confidence: float = 0.95, split: str = "test",
                       left_out: Mapping[str, Mapping[int, str]] | None = None,
                       power: bool = False, power_level: float = DEFAULT_POWER) -> str:
    """The comparisons as text, one line per method and metric: mean difference, interval,
    wins, and in words whether the interval excludes 0; ``left_out`` (as
    :func:`left_out_seeds` returns) adds a line per method naming the seeds left out.

    Where an interval includes 0, a second line says the smallest effect the seeds could have
    detected (``mde``); ``power=True`` adds that line to every comparison, with the seeds that
    the effect of interest would need."""
    if not comparisons:
        return f"no methods to compare with {baseline}"
    pct = f"{confidence * 100:g}%"
    head = (f"Paired differences on {split}: method - {baseline}"
            + (f" ({unit})" if unit else "")
            + f"; negative = lower error than {baseline}. Mean over paired seeds, {pct} "
            "interval (Student t), wins = seeds where the method's error is lower.")
    lines = [head]
    width = max(len(m) for m in comparisons)
    for name, cmp in comparisons.items():
        gone = (left_out or {}).get(name)
        if gone:
            lines.append(f"  {name:<{width}}  left out: " + "; ".join(
                f"seed {s} ({why})" for s, why in gone.items()) + " - n counts the pairs kept")
        for key, c in cmp.items():
            metric, _, region = key.partition("_")
            label = f"{_LABELS.get(metric, metric)} {_LABELS.get(region, region)}"
            if c is None:
                lines.append(f"  {name:<{width}}  {label:<9}  n/a (empty region in some run)")
                continue
            if c["mean"] is None:
                lines.append(f"  {name:<{width}}  {label:<9}  n/a (no pair left: diverged runs)")
                continue
            if c["ci_low"] is None:
                ci = "[undefined]"
            else:
                ci = f"[{c['ci_low']:+.{digits}f}, {c['ci_high']:+.{digits}f}]"
            lines.append(f"  {name:<{width}}  {label:<9}  {c['mean']:+.{digits}f} {ci:<18} "
                         f"wins {c['wins']}/{c['n']}  {_verdict(c, name, baseline)}")
            note = _power_note(c, digits, power, power_level)
            if note:
                lines.extend(textwrap.wrap(note, width=100, initial_indent=" " * 6,
                                           subsequent_indent=" " * 8))
    return "\n".join(lines)


def _power_note(c: Mapping[str, Any], digits: int, always: bool, level: float) -> str:
    """The power line under one comparison ('' when there is nothing to say)."""
    mde = c.get("mde")
    if mde is None:
        return ""
    open_ci = c["ci_low"] is not None and c["ci_low"] <= 0 <= c["ci_high"]
    if not (always or open_ci):
        return ""
    pct = f"{level * 100:g}%"
    text = (f"the seeds could not have detected an effect smaller than {mde:.{digits}f} "
            f"({pct} power)" if open_ci else
            f"smallest effect detectable at {pct} power: {mde:.{digits}f}")
    size, need = c.get("effect"), c.get("seeds_needed")
    if always and size is not None:
        text += (f"; an effect of {size:.{digits}f} needs {need} seeds" if need is not None
                 else f"; an effect of {size:.{digits}f} needs more than {MAX_SEEDS} seeds")
    return text
