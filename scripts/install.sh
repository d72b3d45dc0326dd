#!/usr/bin/env bash
# Install fssam and its dependencies into the current Python (torch first, from this machine's
# wheel cache where present; sam2 is an sdist built without its CUDA extension).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
python -m pip show sam2 >/dev/null 2>&1 || SAM2_BUILD_CUDA=0 python -m pip install --quiet --no-build-isolation sam2==1.1.0
python -m pip install --quiet -e ".${extras:+[$extras]}"
