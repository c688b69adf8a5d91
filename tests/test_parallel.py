"""Converted checkpoints load into Megatron-core models split across processes (tensor / expert parallel), with
Megatron's own sharded loader, and give the reference model's logits: two gloo processes on CPU via torchrun."""

import re
from pathlib import Path

import pytest

from nemo_upcycle.convert import convert
from nemo_upcycle.recipe import UpcycleConfig
from tests.conftest import random_model, small_config, torchrun
from tests.nemo_fixtures import write_nemo_dir

ROOT = Path(__file__).parent.parent


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
