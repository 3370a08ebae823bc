"""Choose the weights of the feature regularisers for a bench dataset on the *validation* set.

    python benchmarks/tune_baselines.py --dataset diamonds [--seeds 0,1] [--out runs/tune-b]

The authors' weights (RankSim gamma 100, ConR beta 4, Ordinal Entropy lambda 1) were set for
their own recipes (Adam, batch 64-256, ResNet-50 on ages). On a bench dataset trained by its own
recipe they can swamp the L1 term (on diamonds, SGD lr 0.2: RankSim with gamma 10 or 100 makes
the MLP diverge), so each regulariser's weight is chosen once, like the SAM family's rho
(benchmarks/tune_diamonds.py): the authors' value times 1, 0.1, 0.01 and 0.001, each plug-in on
plain L1, the dataset's recipe, mean validation MAE over the seeds. RnC's linear head is tuned
the same way (its lr, as a factor of the recipe's lr, which the contrastive pre-training keeps).
A run that diverges scores infinity. Prints every cell and the choice; test numbers are not
looked at.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

from balanced_sam.baselines.plugins import PLUGINS
from balanced_sam.bench import BenchConfig, run_bench
from balanced_sam.data.registry import get_entry

#: the weight of each regulariser, and which options it sets (rnc: its linear head's lr, as a
#: factor of the recipe's lr, which its contrastive pre-training keeps)
WEIGHTS = {"ranksim": ("gamma",), "conr": ("beta",), "ordinal-entropy": ("lambda_d", "lambda_t"),
           "rnc": ("head_lr",)}


def val_mae(dataset: str, method: str, options: dict, seeds: list[int], epochs: int | None,
            out: Path, data_root: str | None = None, jobs: int = 1) -> float:
    shutil.rmtree(out, ignore_errors=True)
    plugins = {"plugins": {method: options}} if options else {}
    try:
        res = run_bench(BenchConfig(dataset=dataset, methods=[method], seeds=seeds, epochs=epochs,
                                    plots=False, data_root=data_root, jobs=jobs,
                                    overrides={"device": "cpu", **plugins}, out=out),
                        log=lambda s: None)
    except ValueError as exc:  # a setting the method refuses
        print(f"    {method} {options}: {exc}", flush=True)
        return math.inf
    runs = res["methods"][method]["runs"]
    gone = [r for r in runs if r.get("failure")]
    if gone:  # the bench marks a diverged run (NaN predictions) and goes on
        print(f"    {method} {options}: {gone[0]['diverged_reason']}", flush=True)
        return math.inf
    return sum(r["val"]["all"]["mae"] for r in runs) / len(runs)


def base_value(dataset: str, method: str, key: str) -> float:
    """The authors' weight, or for a null default (rnc's head lr) the recipe's lr."""
    value = PLUGINS[method].defaults[key]
    return float(get_entry(dataset).recipe.train["lr"] if value is None else value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="diamonds")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, help="default: the dataset's recipe")
    ap.add_argument("--factors", default="1,0.1,0.01,0.001")
    ap.add_argument("--methods", default=",".join(WEIGHTS))
    ap.add_argument("--out", default="runs/tune-baselines")
    ap.add_argument("--data-root", help="the dataset's files (MNIST IDX folder)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (bsam bench --jobs)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    factors = [float(f) for f in args.factors.split(",")]
    out = Path(args.out) / args.dataset
    print(f"{args.dataset}: validation MAE (mean over seeds {seeds}) against the weight")
    ref = val_mae(args.dataset, "vanilla", {}, seeds, args.epochs, out / "vanilla",
                  args.data_root, args.jobs)
    print(f"  vanilla (no regulariser): {ref:.4g}", flush=True)
    for method in args.methods.split(","):
        keys = WEIGHTS[method]
        scores = {}
        for f in factors:
            opts = {k: base_value(args.dataset, method, k) * f for k in keys}
            scores[f] = val_mae(args.dataset, method, opts, seeds, args.epochs,
                                out / f"{method}-x{f:g}", args.data_root, args.jobs)
            shown = ", ".join(f"{k} {v:g}" for k, v in opts.items())
            print(f"  {method:<16} {shown:<28} {scores[f]:.4g}", flush=True)
        best = min(scores, key=scores.get)
        choice = ", ".join(f"{k} {base_value(args.dataset, method, k) * best:g}" for k in keys)
        print(f"  choice for {method}: {choice}", flush=True)


if __name__ == "__main__":
    main()
