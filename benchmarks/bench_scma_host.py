"""SCMA host cost: the Python work of one `triton_scma` call on the CUDA path, measured without a GPU.

    python benchmarks/bench_scma_host.py [--batches 1 4 16] [--shots 1 5] [--repo PATH]
                                         [--calls 2000] [--out out/bench_scma_host]

A model launched from Python (eager PyTorch, no CUDA graph) pays this on every SCMA call; at batch 1
the GPU work (about 0.055 ms on an H200) is shorter than it, so it sets the op's time there.
What runs: the op's own host code (shape checks, launch plan, workspace allocations, autotuner
dispatch), on CPU tensors of the serving shape (fp16, N=1024, c=256, one head), with
  * each Triton launch replaced by what `JITFunction.run` does before its C launcher: argument
    binding and the kernel cache key, for an sm_90 target (Triton's own binder);
  * the autotuner's one-time benchmark replaced by a fixed pick (not written to Triton's disk
    cache), the SM count set to 132 (H100 / H200, so the split heuristic decides as it does
    there) and the device check skipped (CPU tensors stand in for CUDA ones).
So the figures leave out, per call: the C launcher and cuLaunchKernel, JITFunction.run's current
device / stream queries and kernel cache lookup (together a few microseconds a launch), the
`torch.cuda.device` switch, CUDA allocations (the CPU allocator stands in) and any GPU time. They
compare host code paths with each other; a real CUDA call costs more. Rows: `default` (what torch.ops.fssam.scma
runs: the key-axis split where the heuristic splits) and `one_pass` (auto_split=False). `--repo`
times another checkout of fssam (e.g. a git worktree of an older commit) in the same way.
Prints a markdown table, writes JSON (CPU model, Triton version, git commit) and a PNG under --out.
Needs a Triton with its CUDA backend (the default wheel); TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SM_COUNT = 132  # H100 SXM / H200
TOKENS, HEAD_DIM = 1024, 256


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--calls", type=int, default=2000, help="calls per timing (the best of 5 timings is kept)")
    parser.add_argument("--repo", type=Path, default=None, help="time the fssam package of this checkout instead")
    parser.add_argument("--out", type=Path, default=Path("out/bench_scma_host"))
    return parser.parse_args(argv)


LAUNCH_OPTIONS = ("BLOCK_M", "BLOCK_N", "BLOCK_T", "num_warps", "num_stages")


@contextlib.contextmanager
def stubbed_launches(triton_kernel):
    """Triton launches become argument binding + cache key for sm_90. Yields the list of launches,
    (kernel name, its LAUNCH_OPTIONS values), in order (tests/test_kernels.py reads it too)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binders, launches = {}, []

    def run(self, *args, grid, warmup, **kwargs):
        launches.append((self.__name__, tuple(kwargs.get(name) for name in LAUNCH_OPTIONS)))
        if self not in binders:
            binders[self] = (create_function_from_signature(self.signature, self.params, backend), {})
        binder, key_cache = binders[self]
        kwargs.setdefault("debug", False)
        bound, specialization, options = binder(*args, **kwargs)
        compute_cache_key(key_cache, specialization, options)
        if callable(grid):
            grid(bound)

    saved = (JITFunction.run, Autotuner._bench, triton_kernel.sm_count, triton_kernel._check_device)
    tuners = list(triton_kernel._AUTOTUNED.values())
    disk_cache = [tuner.cache_results for tuner in tuners]
    JITFunction.run = run
    Autotuner._bench = lambda self, *args, config, **meta: [float(config.kwargs["BLOCK_M"])]  # a fixed pick
    triton_kernel.sm_count = lambda device: SM_COUNT
    triton_kernel._check_device = lambda *tensors: None  # CPU tensors stand in for CUDA ones
    for tuner in tuners:
        tuner.cache_results = False  # the fixed picks never reach Triton's disk cache
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner._bench, triton_kernel.sm_count, triton_kernel._check_device = saved
        for tuner, cached in zip(tuners, disk_cache):
            tuner.cache_results = cached
            tuner.cache.clear()  # nor stay in this process: real launches autotune afresh
        triton_kernel._PICKED.clear()


def best_microseconds(call, calls: int) -> float:
    for _ in range(max(50, calls // 10)):
        call()
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        timings.append(1e6 * (time.perf_counter() - start) / calls)
    return min(timings)


def measure(triton_kernel, batches, shots_list, calls: int) -> list[dict]:
    import torch

    rows = []
    with stubbed_launches(triton_kernel) as launches:
        for shots in shots_list:
            for batch in batches:
                gen = torch.Generator().manual_seed(batch * 10 + shots)
                keys = (shots + 1) * TOKENS + 4 * (shots + 1)
                q = torch.randn(batch, 1, TOKENS, HEAD_DIM, generator=gen).half()
                k = torch.randn(batch, 1, keys, HEAD_DIM, generator=gen).half()
                v = torch.randn(batch, 1, keys, HEAD_DIM, generator=gen).half()
                masks = (torch.rand(batch, shots, TOKENS, generator=gen) > 0.5).half()  # as the model passes them
                for path, options in (("default", {}), ("one_pass", {"auto_split": False})):
                    def call():
                        triton_kernel.triton_scma(q, k, v, masks, "paper", **options)
                    call()  # the autotuner's pick, once
                    launches.clear()
                    call()
                    count = len(launches)
                    rows.append(dict(batch=batch, shots=shots, path=path, launches=count,
                                     host_us=round(best_microseconds(call, calls), 1)))
                    print(f"  B={batch} K={shots} {path}: {rows[-1]['host_us']} us, {count} launches",
                          file=sys.stderr)
    return rows


def markdown(rows) -> str:
    lines = ["| batch | K | path | launches | host us / call |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['shots']} | {r['path']} | {r['launches']} | {r['host_us']:.1f} |" for r in rows]
    return "\n".join(lines)


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(r["batch"], r["shots"]) for r in rows})
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 4))
    width = 0.4
    for offset, path_name in ((-width / 2, "default"), (width / 2, "one_pass")):
        values = [next(r["host_us"] for r in rows if (r["batch"], r["shots"], r["path"]) == (*label, path_name))
                  for label in labels]
        ax.bar([i + offset for i in range(len(labels))], values, width, label=path_name)
    ax.set_xticks(range(len(labels)), [f"B={b} K={k}" for b, k in labels])
    ax.set_ylabel("host microseconds per call")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def git_commit(repo: Path) -> str:
    result = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (result.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("bench_scma_host: unset TRITON_INTERPRET (the interpreter has no launcher to time)")
    repo = (args.repo or Path(__file__).resolve().parent.parent).resolve()
    if not (repo / "fssam" / "ops" / "scma" / "triton_kernel.py").is_file():
        raise SystemExit(f"bench_scma_host: {repo} holds no fssam/ops/scma/triton_kernel.py")
    sys.path.insert(0, str(repo))
    import triton

    from fssam.files import write_json
    from fssam.ops.scma import triton_kernel
    from fssam.runtime.cpu import cpu_info

    if not Path(triton_kernel.__file__).resolve().is_relative_to(repo):
        raise SystemExit(f"bench_scma_host: fssam was imported from {triton_kernel.__file__}, not from {repo}")
    cpu = cpu_info()["model"]
    commit = git_commit(repo)
    print(f"SCMA host cost per call ({repo}, {commit}) on {cpu}: launches stubbed, sm_90, {SM_COUNT} SMs",
          file=sys.stderr)
    rows = measure(triton_kernel, args.batches, args.shots, args.calls)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.out / f"scma_host_{commit}_{stamp}.json"
    meta = dict(cpu=cpu, triton=triton.__version__, python=platform.python_version(), commit=commit,
                repo=str(repo), date=stamp, tokens=TOKENS, head_dim=HEAD_DIM, dtype="fp16", heads=1,
                sm_count=SM_COUNT, timing=f"best of 5 timings of {args.calls} calls (perf_counter)",
                stub="Triton launches: binder + cache key for sm_90, no C launcher; autotuner benchmark: fixed pick")
    write_json(str(json_path), dict(meta=meta, results=rows))
    print(f"### SCMA host cost per call, {commit} ({cpu}, Triton {triton.__version__})\n")
    print(markdown(rows))
    png_path = json_path.with_suffix(".png")
    plot(rows, png_path, f"SCMA host cost per call, {commit}")
    print(f"\nwrote {json_path} and {png_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
