"""``bsam bench``: methods x seeds (x rho) on a registered dataset or a CSV table -> results,
table, paired comparisons, plots.

:func:`run_bench` takes a :class:`BenchConfig` (the bench's options, validated once), loads the
data once through the registry
(:func:`balanced_sam.data.registry.load_data`: splits, training-label bins, target scaling,
fingerprint) and trains every (method, rho, seed) with :func:`balanced_sam.train.fit`, in this
process (``jobs=1``) or in ``jobs`` worker processes (:mod:`balanced_sam.parallel`), one per
device with ``devices``, or on a Ray or Slurm cluster (``executor``; docs/cluster.md). Every run is
pinned to ``threads`` CPU threads (default 1) and its initial weights are built from its seed
alone (the same for every method of a seed), so a run's figures are bit-identical whatever
``jobs`` is and in whatever order the runs are scheduled. It writes into ``out``:

* ``results.json`` (schema below), ``results.csv`` (one row per run);
* ``label_histogram.png``, ``per_bin_mae.png``, ``paired_differences.png`` (each method minus
  the baseline, seed by seed, with its interval) and, for several rho values, ``rho_sweep.png``;
* ``runs/<method>[-rho<r>]-seed<s>/``: each run's ``best.pt``, ``log.csv`` and ``result.json``.

**The folder** is the project's: a bench writes only into a new or empty ``out`` or one a bench
marked (``.bsam-manifest.json``, listing every file and run folder it wrote;
:mod:`balanced_sam.outputs`); another non-empty folder is refused, naming ``--out``.
``overwrite`` first removes exactly what the manifest lists, never following a link.

A bench that dies (or is stopped with Ctrl-C) can be run again with the same ``out``: finished
runs are read back from their ``result.json`` and an interrupted one resumes from its
``last.pt``, as long as the data have the same fingerprint; a run on data that changed since is
trained again. The same folder may take more methods and seeds; its ``results.json`` and
``results.csv`` always hold every run finished in it (``config.this_bench`` then names what the
latest bench ran), while :func:`run_bench` prints and returns the methods it was asked for.

**Diverged runs.** A run is marked ``diverged`` when its predictions became NaN/inf during
training (the run ends there with NaN figures and a ``failure``; the bench goes on), when its
validation or test MAE is NaN/inf, when
the optimizer skipped steps for a non-finite gradient (``skipped_steps``; not counted under fp16
AMP, whose loss scaler skips steps by design), or when its test MAE exceeds ``diverge_factor``
(default 3) times the median test MAE of its method's seeds at the same rho (so it needs 3+
seeds to fire). A diverged run stays in ``runs`` with the reason, and is left out of the mean ±
std, of the choice of rho and of every paired comparison it belongs to (``n`` then counts the
pairs kept).

**Paired comparisons.** Every method is compared with ``baseline`` (default ``sqinv`` when it is
among the methods) seed by seed: the mean of the per-seed differences, a Student-t interval
(95% by default) and wins k of n, for MAE All / Many / Med. / Few, GM All and bMAE
(:func:`balanced_sam.stats.paired_comparisons`). Runs that share a seed share split, initial
weights and batch order, so this is how methods are told apart; the table's mean ± std is each
method's spread, not a test of a difference. :func:`compare_results` (``bsam compare``) redoes
the flags and the comparisons of a finished ``results.json``.

``results.json``::

    {"dataset": str, "config": {...}, "split": {"train": n, "val": n, "test": n, "bins": K,
     "regions": {"many": k, "medium": k, "few": k}, ...}, "bins": LabelBins.to_dict(),
     "fingerprint": {"digest", "files", "params"}, "warnings": [str],
     "methods": {NAME: {"runs": [{"seed", "rho", "best_epoch", "train_seconds",
                                  "skipped_steps", "val", "test", "test_per_bin",
                                  "data_fingerprint", "diverged", "diverged_reason"?,
                                  "failure"?, "stalled"}],
                        "mean": REPORT | null, "std": REPORT | null, "selected_rho": r,
                        "by_rho": {str(r): {"mean", "std", "val_mae", "n", "diverged"}}}},
     "divergence": {"factor": k, "rule": str, "diverged": {NAME: [{"seed", "rho", "reason"}]},
                    "stalled": {NAME: [seed]}, "stalled_rule": str},
     "comparisons": {NAME: {"mae_all": {"mean", "ci_low", "ci_high", "wins", "n"},
                            "mae_many", "mae_medium", "mae_few", "gm_all", "bmae_all"}},
     "comparisons_info": {"baseline": str | null, "confidence": 0.95, "split": "test",
                          "difference": str, "left_out": {NAME: {seed: why}}},
     "parallel": {"jobs", "threads_per_run", "start_method"},
     "executor": {"name": "local" | "ray" | "slurm", ...}, "total_seconds": s}

``executor`` says where this bench's runs trained (:mod:`balanced_sam.bench.executors`):
``local``: ``jobs``, ``devices`` and per run label its ``device``, ``host``, ``pid``, ``start``
and ``end``; ``ray``: ``address``, ``gpus_per_run``, ``cpus_per_run``; ``slurm``: ``cluster``,
``partition``, ``time``, ``gpus_per_run``, ``cpus_per_run``; both with ``retries`` and the
``attempts`` of each run. ``parallel.start_method`` is ``spawn``, ``in-process``, ``ray`` or
``slurm``.

``REPORT = {region: {metric: value}}`` (regions all/many/medium/few; metrics mae, mse, rmse, gm,
bmae, count); ``mean``/``std`` are over the kept (not diverged) seeds at ``selected_rho``, the
rho with the lowest mean validation MAE over its kept runs (for methods without rho, over all
runs). Empty regions are ``null``. ``config.train.balance`` says what bMAE averages over
(``label`` or ``bin``). ``comparisons`` is empty when there is no baseline among the methods.
"""

from __future__ import annotations

from balanced_sam.bench.executors import RunsFailedError
from balanced_sam.bench.plan import (
    DEFAULT_SEEDS,
    EXECUTORS,
    QUICK,
    BenchConfig,
    ExecutorConfig,
    RunKey,
    bench_data_spec,
    bench_defaults,
    load_bench_data,
)
from balanced_sam.bench.report import bench_table, compare_results, comparison_text
from balanced_sam.bench.run import BenchInterrupted, run_bench
from balanced_sam.bench.summary import (
    CONFIDENCE,
    DEFAULT_BASELINE,
    DIVERGE_FACTOR,
    STALLED_RULE,
    finish_results,
)

__all__ = ["run_bench", "BenchConfig", "ExecutorConfig", "EXECUTORS", "RunKey",
           "compare_results", "finish_results",
           "bench_defaults", "load_bench_data", "bench_data_spec", "bench_table",
           "comparison_text", "QUICK", "DEFAULT_SEEDS", "DEFAULT_BASELINE", "DIVERGE_FACTOR",
           "CONFIDENCE", "STALLED_RULE", "BenchInterrupted", "RunsFailedError"]
