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
:func:`format_comparisons` prints it. The Student-t quantile (:func:`t_ppf`) is
computed here from the regularised incomplete beta function, so no SciPy is needed.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "t_cdf",
    "t_ppf",
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
def _betainc_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), valid and quickly
    convergent for ``x < (a + 1) / (a + b + 2)``."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    frac = d
    for m in range(1, 10_000):
        # even step: d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m))
        num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        frac *= d * c
        # odd step: d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))
        num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        frac *= step
        if abs(step - 1.0) < 1e-16:
            return frac
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, "
                          f"x={x})")


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function :math:`I_x(a, b)` for ``a, b > 0``, ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (a * math.log(x) + b * math.log1p(-x)
                 - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betainc_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betainc_cf(b, a, 1.0 - x) / b


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
    if math.isinf(x):
        return 1.0 if x > 0 else 0.0
    # P(|T| > |x|) = I_{df / (df + x^2)}(df / 2, 1 / 2)
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + x * x))
    return 1.0 - tail if x > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (inverse of
    :func:`t_cdf`), e.g. ``t_ppf(0.975, 4) = 2.776...``. Exact forms for ``df`` 1 and 2,
    otherwise bisection on :func:`t_cdf` to full double precision."""
    df = _check_df(df)
    q = float(q)
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be a probability strictly between 0 and 1, got {q!r}")
    return _t_ppf(q, df)


@functools.lru_cache(maxsize=1024)
def _t_ppf(q: float, df: float) -> float:
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -_t_ppf(1.0 - q, df)
    if df == 1.0:
        return math.tan(math.pi * (q - 0.5))
    if df == 2.0:
        a = 4.0 * q * (1.0 - q)
        return (2.0 * q - 1.0) * math.sqrt(2.0 / a)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, 2.0 * hi
        if hi > 1e300:
            raise ArithmeticError(f"t quantile {q} with df {df} is out of range")
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):  # adjacent doubles: converged
            break
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------- one comparison
def is_finite(v: Any) -> bool:
    """A real number (int, float or a numpy scalar) that is neither NaN nor infinite."""
    return v is not None and isinstance(v, (int, float, np.floating, np.integer)) \
        and math.isfinite(float(v))


def paired_difference(values: Sequence[float], baseline: Sequence[float], *,
                      confidence: float = 0.95) -> dict[str, Any]:
    """Compare per-seed ``values`` of a method with the ``baseline``'s on the same seeds (same
    order; lower is better): ``{"mean", "ci_low", "ci_high", "wins", "n"}`` as described in the
    module docstring. With one pair the interval is ``None`` (undefined)."""
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
    d = np.asarray(values, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    n = int(d.size)
    mean = float(d.mean())
    out: dict[str, Any] = {"mean": mean, "ci_low": None, "ci_high": None,
                           "wins": int((d < 0).sum()), "n": n}
    if n >= 2:
        half = t_ppf(0.5 + confidence / 2.0, n - 1) * float(d.std(ddof=1)) / math.sqrt(n)
        out["ci_low"], out["ci_high"] = mean - half, mean + half
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
        cmp: dict[str, dict[str, Any] | None] = {}
        for metric, region in metrics:
            a = [_metric(mine[s], split, region, metric) for s in shared]
            b = [_metric(base[s], split, region, metric) for s in shared]
            if not shared:  # every pair had a diverged run
                cmp[f"{metric}_{region}"] = {"mean": None, "ci_low": None, "ci_high": None,
                                             "wins": 0, "n": 0}
                continue
            if any(v is None for v in a + b):
                cmp[f"{metric}_{region}"] = None
                continue
            cmp[f"{metric}_{region}"] = paired_difference(a, b, confidence=confidence)  # type: ignore[arg-type]
        out[name] = cmp
    return out


# ---------------------------------------------------------------------------- text
def _verdict(c: Mapping[str, Any], name: str, baseline: str) -> str:
    if c["ci_low"] is None:
        return "one seed: no interval"
    if c["ci_high"] < 0:
        return f"{name} better (interval below 0)"
    if c["ci_low"] > 0:
        return f"{name} worse (interval above 0)"
    return "interval includes 0: no evidence of a difference"


def format_comparisons(comparisons: Mapping[str, Mapping[str, Mapping[str, Any] | None]],
                       baseline: str = "sqinv", *, unit: str = "", digits: int = 2,
                       confidence: float = 0.95, split: str = "test",
                       left_out: Mapping[str, Mapping[int, str]] | None = None) -> str:
    """The comparisons as text, one line per method and metric: mean difference, interval,
    wins, and in words whether the interval excludes 0; ``left_out`` (as
    :func:`left_out_seeds` returns) adds a line per method naming the seeds left out."""
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
    return "\n".join(lines)
