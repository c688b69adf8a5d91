"""Every Hugging Face export, served by vLLM (scripts/engine_check.sh), matches transformers and the dense source.
Runs only with `-m engines` and when the vLLM venv exists (bash scripts/engine_venv.sh builds it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("ENGINE_VENV", REPO / ".cache" / "engines" / "vllm"))


@pytest.mark.engines
@pytest.mark.skipif(not (VENV / "bin" / "python").exists(), reason=f"no vLLM venv at {VENV} (scripts/engine_venv.sh)")
def test_vllm_serves_every_export_as_transformers_computes_it(tmp_path):
    got = subprocess.run(["bash", str(REPO / "scripts" / "engine_check.sh"), str(tmp_path)], capture_output=True,
                         text=True, env={**os.environ, "ENGINE_VENV": str(VENV), "PROJECT_PYTHON": sys.executable},
                         timeout=3600)
    assert got.returncode == 0, got.stdout + got.stderr[-3000:]
    cases = json.loads((tmp_path / "engine_check.json").read_text())["cases"]
    assert {c["arch"] for c in cases} == {"mixtral", "qwen2_moe", "qwen3_moe"} and all(c["ok"] for c in cases)
    for case in cases:  # the engine built the router the config asks for
        sparse = [flag for cls, flag in case["router"] if flag is not None]
        assert sparse and all(flag is (case["arch"] == "mixtral" or "softmax_then_topk" not in case["name"])
                              for flag in sparse), case
