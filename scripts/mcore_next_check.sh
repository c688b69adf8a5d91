#!/usr/bin/env bash
# Runs the Megatron-touching tests against a newer megatron-core (default 0.19.2, what new containers ship) on
# the project's Python 3.11: megatron-core >= 0.17 declares Python >= 3.12 but imports on 3.11, so its wheel and
# triton (which it imports) are installed with --no-deps --ignore-requires-python into .cache/engines/mcore-VERSION
# and put first on PYTHONPATH; torch and everything else stay the project's.
#   bash scripts/mcore_next_check.sh [pytest args]      (MCORE_VERSION=0.19.2 PROJECT_PYTHON=.venv/bin/python)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
version="${MCORE_VERSION:-0.19.2}"
python="${PROJECT_PYTHON:-$repo/.venv/bin/python}"
site="$repo/.cache/engines/mcore-$version"
if [ ! -d "$site/megatron" ]; then
    "$python" -m pip install -q --no-deps --ignore-requires-python --target "$site" "megatron-core==$version" triton
fi
cd "$repo"
PYTHONPATH="$site:$repo" "$python" -c "import megatron.core; print('megatron-core', megatron.core.__version__)"
PYTHONPATH="$site:$repo" exec "$python" -m pytest -q -p no:cacheprovider tests/unit/test_megatron_specs.py \
    tests/equivalence/test_megatron_args.py tests/integration/test_convert.py "$@"
