#!/usr/bin/env bash
# The checks only a GPU can do, in one go, on a machine where fssam is installed (scripts/install.sh,
# plus `pip install tensorrt` for the TensorRT parts). Writes everything under one results folder:
#   gpu-tests.log    the GPU tests: compiled Triton kernel (fp16/fp32/bf16, one-pass and split), custom op on CUDA,
#                    TensorRT engines through the parity gate, the fssam::SCMA TensorRT plugin
#   gpu-tests-onnxruntime.log  (an onnxruntime with the CUDA provider) its runner and bench mode with IO binding
#   scma_*.json/png  benchmarks/bench_scma.py: kernel vs reference vs SDPA, time and memory
#   pipeline/        fssam bench on the GPU (eager, bf16 autocast, compile, ONNX Runtime, TensorRT)
#   aoti-artifacts/, aoti/   `--aoti` CUDA packages of small (gated) and benchmarks/bench_aoti.py at batch 1 and 8
#   deploy/          fssam deploy --config small --device cuda (where a tritonserver is found)
# Usage: bash scripts/gpu_check.sh [--quick] [results folder]   (default benchmarks/results/gpu-<date>)
#   --quick (first argument; for a short lease): bench_scma in fp16 only; the pipeline bench at 1 shot, 10
#   runs, without torch.compile (eager fp32, bf16 autocast, and TensorRT / ONNX Runtime GPU where installed). On the lent H200 (Triton 3.6, cold kernel cache) the GPU tests took 285 s and a
#   full bench_scma --sweep over 235 s; bench_scma runs first and rewrites its JSON after every shape.
# A GPU image with torch and triton but without fssam's other dependencies and no network: run
# `bash scripts/gpu_deps.sh` here first, carry .gpu-deps/ along, and run this script there with
# PYTHONPATH=$PWD/.gpu-deps:$PWD.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA GPU on this machine: nothing to check here')"
quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
out="${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M)}"
mkdir -p "$out"
# the compiled kernels, never the interpreter: tests/conftest.py only sets TRITON_INTERPRET on a
# machine without CUDA or when FSSAM_TRITON_INTERPRET=1, and test_gpu_kernel_runs_compiled checks it
unset TRITON_INTERPRET
export FSSAM_TRITON_INTERPRET=0
tests=(tests/test_kernels.py)
modes=eager_fp32,eager_bf16
[ "$quick" = 1 ] || modes="$modes,compile"
if python -c "import tensorrt" 2>/dev/null; then
    modes="$modes,tensorrt"; tests+=(tests/test_export.py)
else
    echo "gpu_check: tensorrt is not installed: no TensorRT tests or bench mode" >&2
fi
if python -c "import onnxruntime, sys; sys.exit('CUDAExecutionProvider' not in onnxruntime.get_available_providers())" 2>/dev/null; then
    modes="$modes,onnxruntime"; [[ " ${tests[*]} " == *test_export.py* ]] || tests+=(tests/test_export.py)
    ort_gpu_tests=1
else
    echo "gpu_check: this onnxruntime has no CUDA provider: no ONNX Runtime GPU tests or bench mode" >&2
fi
# each step runs even when one before it failed; the script fails if any did
failed=()
if [ "$quick" = 1 ]; then dtypes=(fp16); else dtypes=(fp16 bf16); fi
python benchmarks/bench_scma.py --sweep --dtypes "${dtypes[@]}" --out "$out" || failed+=(bench_scma)
python -m pytest -q -rs "${tests[@]}" 2>&1 | tee "$out/gpu-tests.log" || failed+=(tests)
if [ "${ort_gpu_tests:-0}" = 1 ]; then  # the CUDA provider with IO binding: runner, bench mode, TensorRT provider fallback
    python -m pytest -q -rs tests/test_runtime.py tests/test_bench.py -k "gpu or io_binding or tensorrt_provider" 2>&1 \
        | tee "$out/gpu-tests-onnxruntime.log" || failed+=(onnxruntime-tests)
fi
# torch AOTInductor packages of the two graphs on CUDA (static batch buckets, CUDA graphs) vs eager fp32 and
# eager bf16 autocast at batch 1 and 8; --quick: bf16 only, buckets 1 and 8
if [ "$quick" = 1 ]; then aoti=bf16; export FSSAM_AOTI_BUCKETS=1,8; else aoti=bf16,fp16,fp32; fi
python - "$out/aoti-artifacts" "$aoti" <<'PY' 2>&1 | tee "$out/aoti-export.log" || failed+=(aoti-export)
import sys
from fssam.export import export
manifest = export("small", out=sys.argv[1], stages=False, aoti=tuple(sys.argv[2].split(",")), aoti_device="cuda",
                  progress=False)
print({p: (e["passed"], e["parity"]["end_to_end"]) for p, e in manifest["aoti"].items()})
PY
python benchmarks/bench_aoti.py --artifacts "$out/aoti-artifacts" --batches 1,8 --out "$out/aoti" || failed+=(bench_aoti)
python -m pytest -q -rs tests/test_torch_backend.py tests/test_scma.py 2>&1 | tee "$out/gpu-tests-torch.log" || failed+=(torch-tests)
# the main job on the GPU: AOTInductor bf16 / fp16 / fp32 packages gated and timed there, the fastest served by
# python-torch through tritonserver (the nvidia-pytriton wheel's, or one on PATH), against eager on the GPU
if python -c "from fssam.serving.server import find_tritonserver; find_tritonserver()" 2>/dev/null; then
    python -m fssam.cli deploy --config small --device cuda --out "$out/deploy" --no-progress 2>&1 \
        | tee "$out/deploy.log" || failed+=(deploy)
else
    echo "gpu_check: no tritonserver here (nvidia-pytriton wheel or PATH): fssam deploy --device cuda not run" >&2
fi
if [ "$quick" = 1 ]; then pipeline=(--shots 1 --iterations 10 --warmup 2); else pipeline=(--shots 1,5 --iterations 20 --warmup 3); fi
python -m fssam.cli bench --config small --modes "$modes" "${pipeline[@]}" --out "$out/pipeline" || failed+=(pipeline)
if [ ${#failed[@]} -gt 0 ]; then echo "gpu_check: failed: ${failed[*]} (results in $out)" >&2; exit 1; fi
echo "gpu_check: results in $out"
