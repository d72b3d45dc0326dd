#!/usr/bin/env bash
# The checks only a GPU can do, in one go, on a machine where fssam is installed (scripts/install.sh,
# plus `pip install tensorrt` for the TensorRT parts). Writes everything under one results folder:
#   gpu-tests.log    the GPU tests: compiled Triton kernel (fp16/fp32/bf16, one-pass and split), custom op on CUDA,
#                    TensorRT engines through the parity gate, the fssam::SCMA TensorRT plugin
#   scma_*.json/png  benchmarks/bench_scma.py: kernel vs reference vs SDPA, time and memory
#   pipeline/        fssam bench on the GPU (eager, bf16 autocast, compile, ONNX Runtime, TensorRT)
# Usage: bash scripts/gpu_check.sh [results folder]   (default benchmarks/results/gpu-<date>)
# A GPU image with torch and triton but without fssam's other dependencies and no network: run
# `bash scripts/gpu_deps.sh` here first, carry .gpu-deps/ along, and run this script there with
# PYTHONPATH=$PWD/.gpu-deps:$PWD.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA GPU on this machine: nothing to check here')"
out="${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M)}"
mkdir -p "$out"
# the compiled kernels, never the interpreter: tests/conftest.py only sets TRITON_INTERPRET on a
# machine without CUDA or when FSSAM_TRITON_INTERPRET=1, and test_gpu_kernel_runs_compiled checks it
unset TRITON_INTERPRET
export FSSAM_TRITON_INTERPRET=0
modes=eager_fp32,eager_bf16,compile,onnxruntime
python -c "import tensorrt" 2>/dev/null && modes="$modes,tensorrt" || echo "gpu_check: tensorrt is not installed: TensorRT tests skip and the bench has no tensorrt mode" >&2
python -m pytest -q -rs tests/test_kernels.py tests/test_export.py 2>&1 | tee "$out/gpu-tests.log"
python benchmarks/bench_scma.py --out "$out"
python -m fssam.cli bench --config small --shots 1,5 --modes "$modes" --iterations 20 --warmup 3 --out "$out/pipeline"
echo "gpu_check: results in $out"
