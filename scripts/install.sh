#!/usr/bin/env bash
# Install fssam and its dependencies into the current Python (torch first, from this machine's
# wheel cache where present; sam2 is an sdist built without its CUDA extension). An argument
# names extras, e.g. `test` or `serving`; both bring the Triton client and the tritonserver binary.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
python -m pip show sam2 >/dev/null 2>&1 || SAM2_BUILD_CUDA=0 python -m pip install --quiet --no-build-isolation sam2==1.1.0
python -m pip install --quiet -e ".${extras:+[$extras]}"
case ",$extras," in
  *,test,*|*,serving,*)
    # tritonserver 2.51 + its Python backend, from the wheel; --no-deps keeps numpy 2
    python -m pip show nvidia-pytriton >/dev/null 2>&1 || python -m pip install --quiet --no-deps nvidia-pytriton==0.7.0 ;;
esac
