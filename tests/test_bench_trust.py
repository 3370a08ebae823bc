"""The bench's side of issue 17: its folder is the project's only if marked (item 5), its record
keeps every finished method (item 6), a diverging run is marked † and the bench goes on
(item 11), and `bsam compare` names what is wrong with a malformed results.json (item 15).
Plus the bench's plan objects of issue 18 (BenchConfig validated once, RunKey labels)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from test_bench import _write_table

from balanced_sam.bench import BenchConfig, RunKey, run_bench
from balanced_sam.cli import main
from balanced_sam.methods import get_method
from balanced_sam.outputs import MANIFEST

#: the smallest bench: the generated table, one seed, one epoch
SMALL = ["--target", "target", "--bin-width", "10", "--cap", "20", "--epochs", "1", "--rho",
         "0.05", "--seeds", "1", "--jobs", "1", "--no-plots"]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return _write_table(tmp_path_factory.mktemp("tbl") / "table.csv")


def _bench(table, out, *more):
    return main(["bench", "--csv", str(table), *SMALL, "--out", str(out), *more])


# ---------------------------------------------------------------------------- item 5
def test_bench_refuses_a_folder_it_did_not_mark(table, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.json").write_text("my own results")
    (out / "notes.txt").write_text("mine")
    assert _bench(table, out, "--methods", "sqinv") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "not empty" in err
    # before: results.json was replaced by the bench's
    assert (out / "results.json").read_text() == "my own results"
    assert sorted(os.listdir(out)) == ["notes.txt", "results.json"]
    # --overwrite removes only what a bench wrote: here nothing, so it is refused too
    assert _bench(table, out, "--methods", "sqinv", "--overwrite") == 2
    assert "--out" in capsys.readouterr().err
    assert (out / "results.json").read_text() == "my own results"
    # the library says the same, naming its keyword
    with pytest.raises(FileExistsError, match=r"out .*mine is not empty"):
        run_bench(BenchConfig(csv_path=str(table), target="target", methods=["sqinv"],
                              seeds=[0], epochs=1, bin_width=10, cap=20, out=out, plots=False),
                  log=lambda s: None)


def test_overwrite_removes_exactly_the_manifests_files(table, tmp_path, capsys):
    out = tmp_path / "b"
    assert _bench(table, out, "--methods", "sqinv") == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["kind"] == "bench"
    assert set(manifest["entries"]) == {"bench_config.json", "results.json", "results.csv",
                                        "runs/sqinv-seed0"}
    (out / "notes.txt").write_text("mine")  # the user's, beside the bench's files
    outside = tmp_path / "elsewhere.csv"
    outside.write_text("keep me")
    (out / "results.csv").unlink()
    (out / "results.csv").symlink_to(outside)  # a listed file replaced by a link
    capsys.readouterr()
    # without --overwrite the same folder resumes: the run is read back, the link refused
    assert _bench(table, out, "--methods", "sqinv") == 2
    assert "symbolic link" in capsys.readouterr().err
    assert _bench(table, out, "--methods", "sqinv", "--overwrite") == 0
    text = capsys.readouterr().out
    assert "read back" not in text  # trained afresh
    assert (out / "notes.txt").read_text() == "mine"  # not listed: kept
    assert outside.read_text() == "keep me"  # the link was removed, never its target
    assert not (out / "results.csv").is_symlink() and (out / "results.csv").stat().st_size > 100
    assert json.loads((out / "results.json").read_text())["methods"]["sqinv"]["runs"]


def test_a_bench_folder_of_the_previous_release_is_adopted_and_read_back(table, tmp_path,
                                                                         capsys):
    out = tmp_path / "old"
    assert _bench(table, out, "--methods", "sqinv,bsam") == 0
    for m in out.rglob(MANIFEST):  # as the previous release left it: no manifest anywhere
        m.unlink()
    capsys.readouterr()
    assert _bench(table, out, "--methods", "sqinv,bsam") == 0
    text = capsys.readouterr().out
    assert "adopted" in text and text.count("done earlier, read back") == 2
    assert json.loads((out / MANIFEST).read_text())["kind"] == "bench"
    # a folder with anything else in it is not taken for one
    for m in out.rglob(MANIFEST):
        m.unlink()
    (out / "runs" / "notes").mkdir()
    assert _bench(table, out, "--methods", "sqinv,bsam") == 2
    assert "not written by bsam" in capsys.readouterr().err


# ---------------------------------------------------------------------------- item 6
def test_a_narrower_bench_keeps_every_finished_method_in_the_folders_record(table, tmp_path,
                                                                           capsys):
    out = tmp_path / "b"
    assert _bench(table, out, "--methods", "vanilla,sqinv") == 0
    first = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert _bench(table, out, "--methods", "vanilla") == 0
    printed = capsys.readouterr().out
    # what is printed: the methods asked for
    assert "| vanilla |" in printed and "| sqinv |" not in printed
    assert "also holds the finished runs of sqinv" in printed
    # the folder's record: every finished method, as before (before: only vanilla was left)
    again = json.loads((out / "results.json").read_text())
    assert list(again["methods"]) == ["vanilla", "sqinv"]
    for name in ("vanilla", "sqinv"):
        assert again["methods"][name]["runs"][0]["test"] == \
            first["methods"][name]["runs"][0]["test"]
    assert again["comparisons"] == first["comparisons"]
    assert again["config"]["methods"] == ["vanilla", "sqinv"]
    assert again["config"]["this_bench"] == {"methods": ["vanilla"], "seeds": [0]}
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2
    # the returned results are those of the methods asked for
    res = run_bench(BenchConfig(csv_path=str(table), target="target", methods=["vanilla"],
                                seeds=[0], epochs=1, rho=0.05, bin_width=10, cap=20, out=out,
                                plots=False), log=lambda s: None)
    assert list(res["methods"]) == ["vanilla"]
    # more seeds of one method: the record compares it with sqinv on the seeds they share
    capsys.readouterr()
    more = [*SMALL]
    more[more.index("--seeds") + 1] = "2"
    assert main(["bench", "--csv", str(table), *more, "--out", str(out), "--methods",
                 "vanilla"]) == 0
    record = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in record["methods"]["vanilla"]["runs"]] == [0, 1]
    assert [r["seed"] for r in record["methods"]["sqinv"]["runs"]] == [0]
    assert record["comparisons"]["vanilla"]["mae_all"]["n"] == 1
    assert main(["compare", str(out / "results.json")]) == 0


# ---------------------------------------------------------------------------- item 11
def test_a_diverging_run_is_marked_and_the_bench_goes_on(table, tmp_path, capsys):
    out = tmp_path / "b"
    # before: the bench stopped with "preds hold NaN/inf values" (exit 2), nothing written
    assert _bench(table, out, "--methods", "sqinv,bsam", "--lr", "1e6") == 0
    printed = capsys.readouterr().out
    assert "| sqinv † |" in printed and "| bsam (rho 0.05) † |" in printed
    assert "every run of bsam diverged: no figures to show" in printed
    res = json.loads((out / "results.json").read_text())
    for name in ("sqinv", "bsam"):
        run = res["methods"][name]["runs"][0]
        assert run["diverged"] and "predictions" in run["diverged_reason"]
        assert res["methods"][name]["mean"] is None
    assert res["comparisons"]["bsam"]["mae_all"]["n"] == 0
    # read back as diverged, not trained again
    assert _bench(table, out, "--methods", "sqinv,bsam", "--lr", "1e6") == 0
    assert "done earlier, read back" in capsys.readouterr().out


def test_one_diverging_seed_is_left_out_and_the_others_kept(table, tmp_path):
    from balanced_sam.bench import run as bench_run

    real = bench_run.fit

    def fit(model, *args, **kwargs):  # seed 1 of bsam diverges; everything else trains
        cfg = args[3]
        if cfg.method == "bsam" and cfg.seed == 1:
            args = (*args[:3], dataclasses.replace(cfg, lr=1e6))
        return real(model, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(bench_run, "fit", fit)
    try:
        res = run_bench(BenchConfig(csv_path=str(table), target="target",
                                    methods=["sqinv", "bsam"], seeds=[0, 1], epochs=1, rho=0.05,
                                    bin_width=10, cap=20, out=tmp_path / "b", plots=False),
                        log=lambda s: None)
    finally:
        mp.undo()
    runs = res["methods"]["bsam"]["runs"]
    assert [r["diverged"] for r in runs] == [False, True]
    assert res["methods"]["bsam"]["mean"]["all"]["mae"] == runs[0]["test"]["all"]["mae"]
    assert res["comparisons"]["bsam"]["mae_all"]["n"] == 1


# ---------------------------------------------------------------------------- item 15
def _good_results():
    report = {r: {"mae": 1.0 + i, "mse": 1.0, "rmse": 1.0, "gm": 1.0, "bmae": 1.0, "count": 3}
              for i, r in enumerate(("all", "many", "medium", "few"))}
    runs = [{"seed": s, "rho": None, "best_epoch": 1, "val": report, "test": report}
            for s in (0, 1)]
    return {"dataset": "x", "methods": {"sqinv": {"runs": runs}, "vanilla": {"runs": runs}}}


@pytest.mark.parametrize("content,what", [
    ("[1, 2]", "expected a JSON object with 'methods', got a list"),
    ('{"methods": {}}', "it has no methods"),
    ('{"methods": {"sqinv": {"runs": [{"seed": 0, "rho": null}]}}}',
     "methods.sqinv.runs[0].test must be a report"),
    ('{"methods": {"sqinv": {"runs": [{"seed": "a", "rho": null, "test": {}}]}}}',
     "methods.sqinv.runs[0].seed must be an integer"),
    ('{"methods": {"sqinv": {"runs": [{"seed": 0, "rho": null, "test": {"all": {"mae": "x"}}}]}}}',
     "methods.sqinv.runs[0].test.all.mae must be a number or null"),
    ('{"methods": {"sqinv": 3}}', "methods.sqinv has no 'runs' list"),
    (b"\xff\xfe\x00binary", "not UTF-8 text"),
    ("{not json", "is not valid JSON"),
])
def test_compare_names_the_file_and_what_is_wrong(tmp_path, capsys, content, what):
    path = tmp_path / "results.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    # before: AssertionError / KeyError: 'test' tracebacks
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and what in err


def test_compare_still_reads_a_well_formed_file(tmp_path, capsys):
    path = tmp_path / "results.json"
    good = _good_results()
    path.write_text(json.dumps(good))
    assert main(["compare", str(path)]) == 0
    assert "Paired differences on test: method - sqinv" in capsys.readouterr().out
    good["comparisons_info"] = {"confidence": "high"}
    path.write_text(json.dumps(good))
    assert main(["compare", str(path)]) == 2
    assert "comparisons_info.confidence must be a number" in capsys.readouterr().err


# ---------------------------------------------------------------------------- issue 18: plan
def test_run_keys_and_the_config_are_checked_once():
    key = RunKey(get_method("bsam-i5"), 1e-05, 3)
    assert key.label == "bsam-i5-rho1e-05-seed3" and RunKey.parse(key.label) == key
    assert RunKey.parse("sqinv-seed0") == RunKey(get_method("sqinv"), None, 0)
    for bad in ("sqinv", "nosuch-seed1", "bsam-rho0.050-seed1"):
        with pytest.raises(ValueError, match="not a bench run label"):
            RunKey.parse(bad)
    cfg = BenchConfig(rho=[0.05, 0.2], seeds=range(3))
    assert cfg.rho == (0.05, 0.2) and cfg.seeds == (0, 1, 2)
    for kw, msg in (({"rho": [0.1, float("nan")]}, "rho values must be finite"),
                    ({"rho": [0.1, 0.1000000001]}, "rho names a value twice"),
                    ({"methods": ["bsam", "nosuch"]}, "unknown method 'nosuch'"),
                    ({"jobs": 0}, "jobs must be an integer >= 1"),
                    ({"seeds": []}, "seeds is empty")):
        with pytest.raises(ValueError, match=msg):
            BenchConfig(**kw)
