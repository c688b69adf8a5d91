#!/usr/bin/env bash
# Companion of gpu_check.sh, run on a machine with network: puts into scripts/wheels/ the wheels a bare GPU
# machine (Python 3.12, torch present) lacks to run the check: megatron-core and nemo-upcycle itself (no NeMo,
# Hydra or lm-eval: the check does not import them). About 4 MB in all, well under the 60 MB budget.
#
#   bash scripts/prepare_gpu_wheels.sh [megatron-core version, default 0.16.1]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="${1:-0.16.1}"
python="${PYTHON:-python3}"
mkdir -p "$here/wheels"
rm -f "$here"/wheels/*.whl
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$here/wheels" "megatron-core==$version"
"$python" -m pip wheel --no-deps -q -w "$here/wheels" "$(dirname "$here")"
du -ch "$here"/wheels/*.whl | tail -1
