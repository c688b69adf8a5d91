"""Converted checkpoints load into Megatron-core models split across processes (tensor / expert parallel), with
Megatron's own sharded loader, and give the reference model's logits: two gloo processes on CPU via torchrun."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_upcycle.convert import convert
from nemo_upcycle.recipe import UpcycleConfig
from tests.conftest import random_model, small_config
from tests.nemo_fixtures import write_nemo_dir

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("fmt, parallel", [("nemo", "--tp"), ("nemo", "--ep"), ("megatron", "--tp")])
def test_converted_checkpoint_loads_at_tp2_and_ep2(megatron, tmp_path, fmt, parallel):
    dense = write_nemo_dir(tmp_path / "dense", random_model(small_config()), spm=None)
    out = tmp_path / "moe"
    convert(dense, out, UpcycleConfig.from_shorthand("E4G2T2"), output_format=fmt, pack=False, progress=False)
    target = out if fmt == "nemo" else out / "iter_0000000"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           str(ROOT / "scripts" / "parallel_load_check.py"), str(target), parallel, "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PYTHONWARNINGS": "ignore"}, timeout=300)
    ranks = re.findall(r"rank (\d): TP=\d EP=\d max abs logit diff vs reference ([0-9.e+-]+)", proc.stdout)
    assert proc.returncode == 0 and sorted(r for r, _ in ranks) == ["0", "1"], proc.stdout[-2000:] + proc.stderr[-3000:]
    assert max(float(d) for _, d in ranks) < 1e-4
