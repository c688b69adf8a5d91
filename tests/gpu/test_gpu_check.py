"""scripts/gpu_check.sh: without a GPU it runs up to the first GPU-only step and says so; with one (pytest -m gpu)
it runs whole."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[2] / "scripts" / "gpu_check.sh"


def run_check(tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), "--workdir", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: see the gpu-marked test")
def test_gpu_check_stops_before_gpu_steps_on_cpu(tmp_path):
    proc = run_check(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "identical to in-memory upcycling: True" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("[4/6] STOP: no CUDA device here")


@pytest.mark.gpu
def test_gpu_check_on_a_gpu(tmp_path):
    proc = run_check(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FAILED" not in proc.stdout and "tokens/s" in proc.stdout
