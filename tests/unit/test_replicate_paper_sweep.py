"""benchmarks/replicate_paper.py --sweep: the learning-rate sweep table is rebuilt from run folders and sweep files."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "replicate_paper.py"
SHAPE = {"dense": "dense_plateau.nemo", "steps": 4000, "batch": 8, "seq": 257, "val_batches": 16}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("replicate_paper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_folder(path: Path, lr: float, runs: dict, overrides: list[str] = (), steps: int = 4000,
               corpus: str | None = None) -> Path:
    """A results folder as a run of replicate_paper.py writes it (only the fields --sweep reads); without `corpus`,
    as runs before --corpus existed wrote it (no corpus field: they all continued on the stdlib)."""
    meta = {**SHAPE, "dense": f"/somewhere/else/{SHAPE['dense']}", "steps": steps, "lr": lr,
            "moe_overrides": list(overrides), **({} if corpus is None else {"corpus": corpus})}
    runs = {arm: [{"seed": seed, "after": after, "seconds": 1.0} for seed, after in by_seed.items()]
            for arm, by_seed in runs.items()}
    path.mkdir()
    (path / "results.json").write_text(json.dumps({"meta": meta, "runs": runs}))
    return path


def test_sweep_pairs_each_run_with_the_best_dense_and_the_same_lr(bench, tmp_path):
    hi = run_folder(tmp_path / "hi", 3e-3, {"dense continued": {0: 1.30, 1: 1.28}, "E8G1T2": {0: 1.20, 1: 1.25}})
    lo = run_folder(tmp_path / "lo", 1e-3, {"dense continued": {0: 1.25, 1: 1.29}, "E8G1T2": {0: 1.10}})
    tweak = run_folder(tmp_path / "tweak", 1e-3, {"E8G1T2": {0: 1.00}}, overrides=["expert_lr_mult=2"])
    # an earlier sweep file holds a note and a stale E8G1T2 seed-1 run at 1e-3 that no folder replaces
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**SHAPE, "notes": {"E8G1T2": "kept"}, "runs": [
        {"arm": "E8G1T2", "lr": 1e-3, "seed": 1, "after": 1.29, "seconds": 1.0},
        {"arm": "E8G1T2", "lr": 1e-3, "seed": 0, "after": 9.99, "seconds": 1.0}]}))
    sweep = bench.sweep_records([old, hi, lo, tweak])
    assert {k: sweep[k] for k in SHAPE} == SHAPE and sweep["corpus"] == "stdlib" and sweep["notes"] == {"E8G1T2": "kept"}
    after = {(r["arm"], r["lr"], r["seed"]): r["after"] for r in sweep["runs"]}
    assert after[("E8G1T2", 1e-3, 0)] == 1.10  # the later folder replaced the file's seed-0 run
    assert after[("E8G1T2", 1e-3, 1)] == 1.29 and after[("E8G1T2, expert_lr_mult=2", 1e-3, 0)] == 1.00
    assert [r["arm"] for r in sweep["runs"]][:4] == ["dense continued"] * 4  # dense first, high lr first

    table = bench.sweep_tables(sweep)
    # the header gives the command that reruns a row and the held-out set the losses are means over
    assert "--steps 4000 --batch 8 --lr LR" in table and "mean over 16 x 8 held-out sequences" in table
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ")]
    grid = {r[0]: r[1:] for r in rows if len(r) == 3}
    assert grid["arm"] == ["peak lr 0.003", "peak lr 0.001"]
    assert grid["E8G1T2"] == ["1.2000 / 1.2500", "1.1000 / 1.2900"]
    assert grid["E8G1T2, expert_lr_mult=2"] == ["-", "1.0000"]
    # best dense: lr 1e-3 (mean 1.27 < 1.29) even though lr 3e-3 has the lowest single seed-1 run (1.28)
    assert "Against the best dense (peak lr 0.001, seed 0 / 1: 1.2500 / 1.2900)" in table
    paired = {tuple(r[:3]): r[3:] for r in rows if len(r) == 5}
    assert paired[("E8G1T2", "0.003", "0")] == ["-4.00%", "-7.69%"]  # vs 1.25 best, vs 1.30 at 3e-3
    assert paired[("E8G1T2, expert_lr_mult=2", "0.001", "0")] == ["-20.00%", "-20.00%"]


@pytest.mark.parametrize("other", [dict(steps=500), dict(corpus="pandas")])
def test_sweep_refuses_runs_of_another_length_or_corpus(bench, tmp_path, other):
    a = run_folder(tmp_path / "a", 3e-3, {"dense continued": {0: 1.3}})
    b = run_folder(tmp_path / "b", 1e-3, {"dense continued": {0: 1.3}}, **other)
    with pytest.raises(SystemExit, match="one corpus at one run length"):
        bench.sweep_records([a, b])


def test_sweep_needs_a_dense_run(bench, tmp_path):
    sweep = bench.sweep_records([run_folder(tmp_path / "a", 3e-3, {"E8G1T2": {0: 1.2}})])
    with pytest.raises(SystemExit, match="no 'dense continued' run"):
        bench.sweep_tables(sweep)


def test_sweep_names_a_source_that_is_neither_folder_nor_file(bench, tmp_path):
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "missing.json", tmp_path / "empty"):
        with pytest.raises(SystemExit, match="neither a results folder"):
            bench.sweep_records([bad])


def test_merge_joins_arms_of_one_setting_and_a_later_run_of_a_seed_replaces_the_earlier(bench, tmp_path):
    a = run_folder(tmp_path / "a", 3e-3, {"E8G8T8": {0: 1.4}, "dense continued": {0: 1.3, 1: 1.28}})
    b = run_folder(tmp_path / "b", 3e-3, {"dense continued": {0: 1.29}, "E8G1T2": {0: 1.2}})
    results, meta = bench.merge_records([a, b])
    assert list(results) == ["dense continued", "E8G1T2", "E8G8T8"]  # ARMS order, not the folders'
    assert [(r["seed"], r["after"]) for r in results["dense continued"]] == [(0, 1.29), (1, 1.28)]
    assert meta["lr"] == 3e-3 and meta["steps"] == 4000
    # a run that records its corpus as the stdlib merges with one from before the field (which ran on it too)
    c = run_folder(tmp_path / "c", 3e-3, {"E8G1T2": {1: 1.21}}, corpus="stdlib")
    assert [r["seed"] for r in bench.merge_records([a, c])[0]["E8G1T2"]] == [1]


@pytest.mark.parametrize("other", [dict(lr=1e-3), dict(steps=500), dict(overrides=["expert_lr_mult=2"]),
                                   dict(corpus="pandas")])
def test_merge_refuses_folders_of_another_setting(bench, tmp_path, other):
    a = run_folder(tmp_path / "a", 3e-3, {"dense continued": {0: 1.3}})
    b = run_folder(tmp_path / "b", other.pop("lr", 3e-3), {"E8G1T2": {0: 1.2}}, **other)
    with pytest.raises(SystemExit, match="one table compares arms at one setting"):
        bench.merge_records([a, b])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="has no results.json"):
        bench.merge_records([a, tmp_path / "empty"])
