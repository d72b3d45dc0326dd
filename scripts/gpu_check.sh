#!/usr/bin/env bash
# The checks only a GPU can do, in one command, within a deadline (default 8 minutes: a lent machine's
# lease is 15 minutes in all, its start included). Steps run in this order, most wanted first; each
# gets the time left, a step that would start with under 20 s left is skipped and said so, and every
# step runs even when one before it failed (the script fails if any did):
#   deploy/      fssam deploy --config small --device cuda: AOTInductor CUDA packages of both graphs
#                (bf16; --full: bf16, fp16, fp32 with max-autotune), gated, timed, the fastest served by
#                python-torch through tritonserver behind the front, vs eager fp32 and eager bf16 autocast
#                on the GPU (where no tritonserver can run here: the packages are still built and gated)
#   aoti/        benchmarks/bench_aoti.py on deploy's packages at batch 1 and 8 vs both eager baselines
#   scma_*       benchmarks/bench_scma.py: the SCMA op vs SDPA (fp16; --full: fp16 and bf16, --sweep)
#   gpu-tests.log  the GPU tests: compiled Triton kernels (fp16/fp32/bf16), the triton_op in eager,
#                torch.compile and a CUDA AOTInductor package (--full: all of test_kernels, the torch
#                backend and the TensorRT / ONNX Runtime GPU tests where installed); gpu-tests-torch.log:
#                tiny's CUDA packages replayed from CUDA graphs, in process and served
#   pipeline/    (--full only) fssam bench on the GPU: eager fp32, bf16 autocast, torch.compile, ...
#   gpu-check.json  the device (GPU name, torch, triton), each step's status and seconds
# The big files (packages, repository) go to a work folder outside the results ($FSSAM_GPU_WORK, default
# /tmp/fssam-gpu-work); the results folder holds JSON, logs and plots only.
#
# Usage: bash scripts/gpu_check.sh [--full] [results folder]   (default benchmarks/results/gpu-<date>)
#   $FSSAM_GPU_CHECK_S: the deadline in seconds (default 480; --full: none)
# On a lent machine whose image has torch, triton and nvcc but not fssam's other packages, no network
# and Python 3.12: here, `bash scripts/gpu_deps.sh` (writes .gpu-deps/, git-ignored, about 47 MB), then
# with the device tool, carry [".gpu-deps"], timeout_s 570 and, as the command (the outer timeout
# leaves the tar its time even if this script overran):
#   mkdir -p /tmp/gpu; timeout 545 bash scripts/gpu_check.sh /tmp/gpu; tar -czf $OUT/gpu.tgz -C /tmp gpu
# This script finds .gpu-deps/ itself (PYTHONPATH; the tritonserver unpacked under $FSSAM_GPU_WORK).
set -uo pipefail
cd "$(dirname "$0")/.."
work="${FSSAM_GPU_WORK:-/tmp/fssam-gpu-work}"
if ! command -v python >/dev/null 2>&1 && command -v python3 >/dev/null 2>&1; then
    # images with `python3` alone: a `python` that execs it (a wrapper, not a link, so that a venv's
    # python3 still finds its pyvenv.cfg)
    mkdir -p "$work/bin"
    printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" >"$work/bin/python"
    chmod +x "$work/bin/python"
    export PATH="$work/bin:$PATH"
fi
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA GPU on this machine: nothing to check here')" || exit 1
full=0
if [ "${1:-}" = "--full" ]; then full=1; shift; fi
if [ "${1:-}" = "--quick" ]; then shift; fi  # the bounded run is the default now
out="${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M)}"
mkdir -p "$out" "$work"
out=$(cd "$out" && pwd)
begin=$(date +%s)
if [ "$full" = 1 ]; then deadline=0; else deadline=$((begin + ${FSSAM_GPU_CHECK_S:-480})); fi

source scripts/gpu_env.sh  # the kit of scripts/gpu_deps.sh, when it was carried here
# the compiled kernels, never the interpreter: tests/conftest.py only sets TRITON_INTERPRET on a
# machine without CUDA or when FSSAM_TRITON_INTERPRET=1, and test_gpu_kernel_runs_compiled checks it
unset TRITON_INTERPRET
export FSSAM_TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5  # bars in the logs: a line each 5 s

steps="$out/steps.tsv"
: >"$steps"
failed=()
# step NAME CMD...: run CMD with the time left (SIGTERM, then SIGKILL 20 s later), log to $out/NAME.log
step() {
    local name=$1; shift
    local now left status rc start tenths
    now=$(date +%s)
    left=$((deadline - now - 25))
    if [ "$deadline" != 0 ] && [ "$left" -lt 20 ]; then
        echo "gpu_check: $name skipped: the deadline (${FSSAM_GPU_CHECK_S:-480} s) is near" >&2
        printf '%s\tskipped\t\t0\tthe deadline was near\n' "$name" >>"$steps"; return 0
    fi
    echo "gpu_check: $name ($(( now - begin )) s in)" >&2
    start=$(date +%s%N)
    if [ "$deadline" = 0 ]; then "$@" >"$out/$name.log" 2>&1; rc=$?
    else timeout --kill-after=20 "$left" "$@" >"$out/$name.log" 2>&1; rc=$?; fi
    case $rc in 0) status=passed ;; 124|137) status=timed-out ;; *) status=failed ;; esac
    [ "$rc" = 0 ] || failed+=("$name")
    tenths=$(( ($(date +%s%N) - start) / 100000000 ))
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((tenths / 10)).$((tenths % 10))" "$(tail -n 1 "$out/$name.log" | tr '\r' '\n' | tail -n 1 | tr '\t' ' ' | cut -c1-300)" >>"$steps"
    tail -n 3 "$out/$name.log" | tr '\r' '\n' | tail -n 3 >&2
}

# the tritonserver of the nvidia-pytriton wheel (or one on PATH) and whether its Python stub loads here
python - >"$out/preflight.log" 2>&1 <<'PY'
import json, os, subprocess, sys, torch
from fssam.serving.server import STUB, find_tritonserver, server_environment
report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
          "python": sys.version.split()[0]}
try:
    found = find_tritonserver()
    report["tritonserver"] = found["binary"]
    if found["wheel_root"]:
        stub = os.path.join(found["wheel_root"], "python_backend_stubs", f"{sys.version_info[0]}.{sys.version_info[1]}", STUB)
        ldd = subprocess.run(["ldd", stub], capture_output=True, text=True, env=server_environment(found["wheel_root"]))
        missing = [line.split()[0] for line in ldd.stdout.splitlines() if "not found" in line]
        report["stub_missing_libraries"] = missing if os.path.isfile(stub) else [f"no stub {stub}"]
except Exception as error:
    report["tritonserver"] = None
    report["why"] = str(error)
print(json.dumps(report))
PY
cat "$out/preflight.log" >&2
serve=$(python -c "import json, sys; r = json.loads(open(sys.argv[1]).read().splitlines()[-1]); print(int(bool(r.get('tritonserver')) and not r.get('stub_missing_libraries')))" "$out/preflight.log" 2>/dev/null || echo 0)

if [ "$full" = 1 ]; then precisions=bf16,fp16,fp32; else precisions=bf16; export FSSAM_AOTI_BUCKETS=1,8 FSSAM_AOTI_AUTOTUNE=0; fi
if [ "$serve" = 1 ]; then
    step deploy python -m fssam.cli deploy --config small --device cuda --precisions "$precisions" --out "$work/deploy"
    [ -f "$work/deploy/deploy.json" ] && cp "$work/deploy/deploy.json" "$out/deploy.json"
    [ -f "$work/deploy/tritonserver.log" ] && cp "$work/deploy/tritonserver.log" "$out/deploy-tritonserver.log"
    artifacts="$work/deploy/artifacts"
else
    echo "gpu_check: no tritonserver can run here (see preflight.log): the packages are built and gated, not served" >&2
    step aoti-export python - "$work/artifacts" "$precisions" <<'PY'
import sys
from fssam.export import export
manifest = export("small", out=sys.argv[1], stages=False, aoti=tuple(sys.argv[2].split(",")), aoti_device="cuda",
                  aoti_plan=True, progress=False)
print({p: (e["passed"], e["parity"]["end_to_end"]) for p, e in manifest["aoti"].items()})
print(manifest["aoti_plan"])
PY
    artifacts="$work/artifacts"
fi
[ -f "$artifacts/manifest.json" ] && cp "$artifacts/manifest.json" "$out/manifest.json"
if [ -f "$artifacts/manifest.json" ]; then
    step bench-aoti python benchmarks/bench_aoti.py --artifacts "$artifacts" --batches 1,8 --out "$out/aoti"
else
    printf 'bench-aoti\tskipped\t\t0\tno packages: the export did not finish\n' >>"$steps"
fi
if [ "$full" = 1 ]; then
    step bench-scma python benchmarks/bench_scma.py --sweep --dtypes fp16 bf16 --out "$out"
else
    step bench-scma python benchmarks/bench_scma.py --dtypes fp16 --batches 1 8 --shots 1 --out "$out"
fi
tests=(tests/test_kernels.py)
if [ "$full" = 1 ]; then
    tests+=(tests/test_torch_backend.py tests/test_scma.py tests/test_aoti.py)
    python -c "import tensorrt" 2>/dev/null && tests+=(tests/test_export.py)
    step gpu-tests python -m pytest -q -rs "${tests[@]}"
    if python -c "import onnxruntime, sys; sys.exit('CUDAExecutionProvider' not in onnxruntime.get_available_providers())" 2>/dev/null; then
        step gpu-tests-onnxruntime python -m pytest -q -rs tests/test_runtime.py tests/test_bench.py -k "gpu or io_binding or tensorrt_provider"
    fi
    step pipeline python -m fssam.cli bench --config small --modes eager_fp32,eager_bf16,compile --shots 1,5 --iterations 20 --warmup 3 --out "$out/pipeline" --no-progress
else
    step gpu-tests python -m pytest -q -rs tests/test_kernels.py -k "gpu or bf16 or compiled or aoti"
    step gpu-tests-torch python -m pytest -q -rs tests/test_torch_backend.py -k cuda_packages
fi

python - "$out" "$steps" "$begin" "$full" "$serve" <<'PY'
import json, os, sys, time, torch
out, steps, begin, full, serve = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1", sys.argv[5] == "1"
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
rows = []
for line in open(steps, encoding="utf-8", errors="replace"):  # a log's last line cut mid-character
    name, status, rc, seconds, last = line.rstrip("\n").split("\t")
    rows.append({"step": name, "status": status, "rc": int(rc) if rc else None, "wall_s": float(seconds),
                 "last_line": last})
summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": triton_version, "mode": "full" if full else "bounded", "tritonserver_usable": serve, "steps": rows,
           "wall_s": round(time.time() - begin, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
with open(os.path.join(out, "gpu-check.json"), "w") as handle:
    json.dump(summary, handle, indent=1)
print(json.dumps(summary, indent=1))
PY
skipped=$(awk -F'\t' '$2 == "skipped" {printf "%s%s", sep, $1; sep = " "}' "$steps")
[ -z "$skipped" ] || echo "gpu_check: skipped: $skipped (see gpu-check.json)" >&2
if [ ${#failed[@]} -gt 0 ]; then echo "gpu_check: failed: ${failed[*]} (results in $out)" >&2; exit 1; fi
echo "gpu_check: results in $out"
