#!/usr/bin/env bash
# GPU check for a bare single-GPU machine with Python 3.12 and torch but no network, megatron-core or
# Transformer Engine. Installs megatron-core and nemo-upcycle from the wheels beside this script (made on a
# networked machine by scripts/prepare_gpu_wheels.sh), then runs scripts/gpu_check.py (under 8 minutes on an
# H200). On a machine without a GPU it runs up to the first GPU-only step and says so.
#
#   bash scripts/gpu_check.sh [gpu_check.py options]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-python3}"
site="${GPU_CHECK_SITE:-/tmp/nemo_upcycle_site}"

if ls "$here"/wheels/*.whl >/dev/null 2>&1 && "$python" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$site" "$here"/wheels/*.whl; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no usable wheels in $here/wheels (see prepare_gpu_wheels.sh): using the installed packages and this checkout"
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
exec "$python" "$here/gpu_check.py" "$@"
