"""Converted checkpoints load into Megatron-core models split across processes (tensor / expert parallel), with
Megatron's own sharded loader, and give the reference model's logits: two gloo processes on CPU via torchrun."""

import re
from pathlib import Path

import pytest

from nemo_upcycle.convert import convert
from nemo_upcycle.recipe import UpcycleConfig
from tests.conftest import random_model, small_config, torchrun
from tests.nemo_fixtures import write_nemo_dir

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize("fmt, parallel", [("nemo", "--tp"), ("nemo", "--ep"), ("megatron", "--tp")])
def test_converted_checkpoint_loads_at_tp2_and_ep2(megatron, tmp_path, fmt, parallel):
    dense = write_nemo_dir(tmp_path / "dense", random_model(small_config()), spm=None)
    out = tmp_path / "moe"
    convert(dense, out, UpcycleConfig.from_shorthand("E4G2T2"), output_format=fmt, pack=False, progress=False)
    target = out if fmt == "nemo" else out / "iter_0000000"
    proc = torchrun([str(ROOT / "scripts" / "parallel_load_check.py"), str(target), parallel, "2"], timeout=300)
    ranks = re.findall(r"rank (\d): TP=\d EP=\d max abs logit diff vs reference ([0-9.e+-]+)", proc.stdout)
    assert proc.returncode == 0 and sorted(r for r, _ in ranks) == ["0", "1"], proc.stdout[-2000:] + proc.stderr[-3000:]
    assert max(float(d) for _, d in ranks) < 1e-4


# ---- Megatron-core's training engine on each parallel layout vs one process (scripts/parallel_train_check.py) ----
CHECK = ROOT / "scripts" / "parallel_train_check.py"


@pytest.fixture(scope="module")
def engine_reference(tmp_path_factory):
    """One process: the seeded starting weights and the weights after two Adam steps through the engine."""
    import os
    import subprocess
    import sys

    work = tmp_path_factory.mktemp("engine")
    launcher = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # this session's own group
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    proc = subprocess.run([sys.executable, str(CHECK), str(work), "--reference"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def _layouts(work: Path, layouts: list[str], nproc: int) -> dict[str, tuple[float, float]]:
    proc = torchrun([str(CHECK), str(work), *layouts], nproc=nproc, timeout=600)
    found = {m[0]: (float(m[1]), float(m[2])) for m in
             re.findall(r"layout (\S+): max abs diff ([0-9.e+-]+) moved ([0-9.e+-]+)", proc.stdout)}
    assert proc.returncode == 0 and sorted(found) == sorted(layouts), proc.stdout[-2000:] + proc.stderr[-3000:]
    return found


def test_engine_on_two_processes_equals_one_process(engine_reference):
    """TP=2 (sequence parallel), PP=2 (1F1B), EP=2, DP=2, the
    distributed optimizer with overlapped bucketed reduce, and a resume from a sharded model + Adam checkpoint
    at another TP/PP layout: every result equals the one-process run's weights. Expert gradients reduced over
    the data-parallel group instead of the expert-data-parallel one (the old flat reduction's mistake) do not."""
    layouts = ["tp2", "pp2", "ep2", "dp2", "dp2+do+og", "ep2+do", "pp2>tp2"]
    found = _layouts(engine_reference, layouts + ["ep2+flat"], nproc=2)
    for name in layouts:
        diff, moved = found[name]
        assert moved > 1e-2 and diff < 1e-6, (name, diff, moved)
    assert found["ep2+flat"][0] > 1e-3, found["ep2+flat"]


@pytest.mark.slow
def test_engine_on_four_processes_tp2_pp2_equals_one_process(engine_reference):
    """TP=2 x PP=2 (and TP=2 x EP=2), with and without the distributed optimizer, on four processes (slow: four
    processes on the CI's two cores)."""
    layouts = ["tp2pp2", "tp2pp2+do", "tp2ep2"]
    found = _layouts(engine_reference, layouts, nproc=4)
    for name in layouts:
        diff, moved = found[name]
        assert moved > 1e-2 and diff < 1e-6, (name, diff, moved)
