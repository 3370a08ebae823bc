"""Choose the diamonds recipe on the *validation* set, once (issue 3: "chosen once on the
validation set and recorded in the config").

    python benchmarks/tune_diamonds.py [--out runs/tune] [--seeds 0,1]

Stage 1: base optimizer, learning rate and epochs for the non-SAM methods (vanilla, sqinv).
Stage 2: rho for the SAM family (sam, imbsam, bsam) at the stage-1 recipe, over a grid that
reaches down to 0.01 (the prototype's best rho sat at the bottom of {0.05, ..., 0.5}).
Prints validation MAE (mean over seeds) for every cell; test numbers are not looked at.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from balanced_sam.bench import BenchConfig, run_bench


def val_mae(results: dict, method: str, rho: float | None = None) -> float:
    runs = [r for r in results["methods"][method]["runs"] if rho is None or r["rho"] == rho]
    return sum(r["val"]["all"]["mae"] for r in runs) / len(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/tune-diamonds")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--lrs", default="0.02,0.05,0.1")
    ap.add_argument("--epochs", default="30,60")
    ap.add_argument("--optimizers", default="sgd,adam")
    ap.add_argument("--rhos", default="0.01,0.02,0.05,0.1,0.2")
    ap.add_argument("--stage", choices=["1", "2", "both"], default="both")
    ap.add_argument("--lr", type=float, help="stage 2 lr (default: stage 1's best)")
    ap.add_argument("--epochs2", type=int, help="stage 2 epochs (default: stage 1's best)")
    ap.add_argument("--optimizer2", help="stage 2 optimizer (default: stage 1's best)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    best = (args.optimizer2 or "sgd", args.lr or 0.05, args.epochs2 or 30)
    if args.stage in ("1", "both"):
        print("stage 1: val MAE of vanilla / sqinv (mean over seeds)")
        scores = {}
        for opt, lr, ep in itertools.product(args.optimizers.split(","),
                                             [float(v) for v in args.lrs.split(",")],
                                             [int(v) for v in args.epochs.split(",")]):
            if opt == "adam":
                lr = lr / 50  # Adam's scale: 4e-4 .. 2e-3 for the same grid
            res = run_bench(BenchConfig(dataset="diamonds", methods=["vanilla", "sqinv"],
                                        seeds=seeds, epochs=ep,
                                        overrides={"lr": lr, "optimizer": opt}, plots=False,
                                        out=out / f"s1-{opt}-lr{lr:g}-ep{ep}"), log=lambda s: None)
            v, s = val_mae(res, "vanilla"), val_mae(res, "sqinv")
            scores[(opt, lr, ep)] = (v + s) / 2
            print(f"  {opt:<5} lr {lr:<8g} epochs {ep:<4} vanilla {v:8.1f}  sqinv {s:8.1f}",
                  flush=True)
        best = min(scores, key=scores.get)
        print(f"stage 1 choice: {best[0]} lr {best[1]:g}, {best[2]} epochs")
    if args.stage in ("2", "both"):
        opt, lr, ep = best
        rhos = [float(v) for v in args.rhos.split(",")]
        print(f"stage 2: val MAE against rho at {opt} lr {lr:g}, {ep} epochs")
        res = run_bench(BenchConfig(dataset="diamonds", methods=["sam", "imbsam", "bsam"],
                                    seeds=seeds, epochs=ep, rho=rhos,
                                    overrides={"lr": lr, "optimizer": opt}, plots=False,
                                    out=out / f"s2-{opt}-lr{lr:g}-ep{ep}"), log=lambda s: None)
        for m in ("sam", "imbsam", "bsam"):
            cells = "  ".join(f"rho {r:g}: {val_mae(res, m, r):7.1f}" for r in rhos)
            print(f"  {m:<7} {cells}", flush=True)


if __name__ == "__main__":
    main()
