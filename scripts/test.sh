#!/usr/bin/env bash
# Install with test extras and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
python -m pytest -q "$@"
