"""SCMA benchmark: fused Triton kernel vs the PyTorch reference vs plain SDPA (no calibration).

    python benchmarks/bench_scma.py [--batches 1 4 16] [--shots 1 5] [--dtypes fp16 bf16]
                                    [--tokens 1024] [--head-dim 256] [--heads 1] [--sweep]
                                    [--mode paper|official] [--out benchmarks/results]

--mode (default paper, as the committed GPU runs): the SCMA calibration of every shot; the model's
default is official (the released code's: the first shot only), the same arithmetic at one shot.

Shapes: q (B, H, N, c), k/v (B, H, K*N + N + P, c) with P = 4 * (K + 1) pointer tokens.
Rows:
  triton     `fssam.ops.scma.triton_kernel.triton_scma` in one pass (`auto_split=False`): the calibration
             kernels (per-shot similarities, shot-mean keys) then the one-pass attention, reading k and v
             in place
  triton_split  the same with the key-axis split where the heuristic splits (`auto_split=True`): what
             torch.ops.fssam.scma runs on CUDA (AUTO_SPLIT is on); column "chunks", 1 where the
             heuristic does not split. (In gpu-h200-20261126b run 3, triton ran this path too.)
  torchprep  the calibration inputs in PyTorch (`calibration_inputs`, as the ONNX graph in front of the
             fssam::SCMA node computes them) + the node's kernel `scma_fused`: what the op ran before
  fused      `fssam.ops.scma.triton_kernel.scma_fused` alone (calibration inputs precomputed), split over
             the keys where the heuristic would (`auto_split=True`, column "chunks")
  onepass    `scma_fused(..., num_splits=1)`: the one-pass kernel on the same shape (what the split gains)
  reference  `fssam.ops.scma.reference.scma_reference` (materialises the N x (2N + P) scores)
  sdpa       F.scaled_dot_product_attention on the shot-mean keys/values (2N + P), i.e. the
             same attention without the calibration: a floor for what SCMA can cost.
--sweep adds a table: the op's GPU time with each autotune candidate of its one-pass attention kernel
and with the split forced to 2, 4 and 8 key chunks, beside SDPA (what the autotuner and the split
heuristic choose between).
Times are the median of CUDA-event timed runs (triton.testing.do_bench: each call launched from
Python, so host launch overhead shows wherever the GPU work is shorter than it) and, column "graph",
of the same call replayed as a CUDA graph (triton.testing.do_bench_cudagraph: GPU time alone, as a
TensorRT engine or a CUDA-graph-captured model launches it). Memory is the peak
allocated during one call minus what was allocated before it. Writes a markdown table to
stdout, JSON (with the device name; rewritten after every shape, "complete": false until the end)
and a PNG plot under --out. Needs a CUDA GPU: on a machine
without one it exits with a message and writes nothing (no CPU numbers are passed off as GPU ones).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--tokens", type=int, default=1024, help="N = h * w query tokens")
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--mode", default="paper", choices=["paper", "official"])
    parser.add_argument("--warmup", type=int, default=25, help="ms of warm-up per measurement")
    parser.add_argument("--rep", type=int, default=100, help="ms of timed repetitions per measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--sweep", action="store_true",
                        help="also time, as CUDA graphs, every autotune candidate of the op's attention kernel "
                             f"and the key-axis split at {SWEEP_SPLITS} chunks, per shape (table 'sweep')")
    return parser.parse_args(argv)


SWEEP_SPLITS = (2, 4, 8)


def make_inputs(batch, shots, tokens, head_dim, heads, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    pointers = 4 * (shots + 1)
    length = (shots + 1) * tokens + pointers
    q = torch.randn(batch, heads, tokens, head_dim, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(batch, heads, length, head_dim, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(batch, heads, length, head_dim, device="cuda", dtype=dtype, generator=g)
    masks = (torch.rand(batch, shots, tokens, device="cuda", generator=g) > 0.5).to(dtype)
    return q, k, v, masks


def peak_memory(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak)


def measure(args, dtype_name: str, shots: int, batch: int) -> list[dict]:
    """Time and peak memory of every implementation on one shape; errors against fp32 of the same inputs."""
    import triton.testing

    from fssam.ops.scma.reference import calibration_inputs, calibration_term, scma_reference
    from fssam.ops.scma.triton_kernel import scma_fused, sm_count, split_plan, triton_scma

    q, k, v, masks = make_inputs(batch, shots, args.tokens, args.head_dim, args.heads, DTYPES[dtype_name])
    keys, values, w, _ = calibration_inputs(k, v, masks, args.mode)
    keys, values, cal = keys.contiguous(), values.contiguous(), calibration_term(w)

    def torch_prep(q, k, v, masks, mode):
        keys, values, w, _ = calibration_inputs(k, v, masks, mode)
        return scma_fused(q, keys, values, calibration_term(w))
    impls = {
        "triton": lambda: triton_scma(q, k, v, masks, args.mode, auto_split=False),
        "triton_split": lambda: triton_scma(q, k, v, masks, args.mode, auto_split=True),
        "torchprep": lambda: torch_prep(q, k, v, masks, args.mode),
        "fused": lambda: scma_fused(q, keys, values, cal, auto_split=True),
        "onepass": lambda: scma_fused(q, keys, values, cal, num_splits=1),
        "reference": lambda: scma_reference(q, k, v, masks, args.mode),
        "sdpa": lambda: F.scaled_dot_product_attention(q, keys, values),
    }
    exact = scma_reference(q.float(), k.float(), v.float(), masks.float(), args.mode)
    plan = split_plan(batch * args.heads, args.tokens, keys.shape[2], sm_count(q.device), auto=True)
    rows = []
    for name, fn in impls.items():
        error = None if name == "sdpa" else float((fn().float() - exact).abs().max())
        ms = triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")
        graph_ms, graph_error = graph_time(fn, args.rep)
        rows.append(dict(
            impl=name, dtype=dtype_name, batch=batch, shots=shots, tokens=args.tokens,
            head_dim=args.head_dim, heads=args.heads, pointers=4 * (shots + 1),
            time_ms=ms, graph_ms=graph_ms, graph_error=graph_error,
            peak_mem_mib=peak_memory(fn) / 2**20, max_abs_err_vs_fp32=error,
            chunks=plan.num_chunks if name in ("triton_split", "fused") else 1 if name in ("triton", "onepass") else None,
        ))
        graph = f"{graph_ms:8.3f} ms as a CUDA graph" if graph_ms is not None else f"no CUDA graph ({graph_error})"
        print(f"  {name:9s} {dtype_name} B={batch:2d} K={shots}: {ms:8.3f} ms, {graph}, "
              f"{rows[-1]['peak_mem_mib']:9.1f} MiB", file=sys.stderr)
    return rows


def graph_time(fn, rep: int):
    """Median ms of `fn` replayed as a CUDA graph (after the eager runs: autotuning is done), or
    (None, why) where it cannot be captured."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"), None
    except Exception as exc:  # noqa: BLE001  (reported beside the eager time, never as a time)
        torch.cuda.synchronize()
        return None, why(exc)


def why(exc: Exception) -> str:
    """One line for a failure that is recorded instead of a time."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def sweep(args, dtype_name: str, shots: int, batch: int) -> list[dict]:
    """GPU time (CUDA graph replay) of the op with each autotune candidate of its one-pass attention
    kernel, of the split path at SWEEP_SPLITS chunks, and of SDPA, on one shape: what the autotuner
    and the split heuristic choose between. Each candidate's output is checked with the kernel tests'
    rule (max abs error against fp32 at most twice the PyTorch reference's in the same dtype; in fp32
    1e-5 + 1e-5 max |fp32|); one
    that fails it, or fails to run, is recorded and never the best."""
    from fssam.ops.scma.reference import calibration_inputs, scma_reference
    from fssam.ops.scma.triton_kernel import autotune_configs, triton_scma

    q, k, v, masks = make_inputs(batch, shots, args.tokens, args.head_dim, args.heads, DTYPES[dtype_name])
    keys, values, _, _ = calibration_inputs(k, v, masks, args.mode)
    keys, values = keys.contiguous(), values.contiguous()
    candidates = {f"m{c['BLOCK_M']}n{c['BLOCK_N']}w{c['num_warps']}s{c['num_stages']}":
                  (lambda c=c: triton_scma(q, k, v, masks, args.mode, num_splits=1, config=c))
                  for c in autotune_configs("scma", args.head_dim, q.dtype)}
    candidates.update({f"split{n}": (lambda n=n: triton_scma(q, k, v, masks, args.mode, num_splits=n))
                       for n in SWEEP_SPLITS})
    candidates["sdpa"] = lambda: F.scaled_dot_product_attention(q, keys, values)
    scma_exact = scma_reference(q.float(), k.float(), v.float(), masks.float(), args.mode)
    if q.dtype == torch.float32:  # the fp32 kernel tests' tolerance (the reference is the exact result here)
        allowed = 1e-5 + 1e-5 * float(scma_exact.abs().max())
    else:
        allowed = 2 * float((scma_reference(q, k, v, masks, args.mode).float() - scma_exact).abs().max())
    rows = []
    for name, fn in candidates.items():
        error, within = None, name == "sdpa"
        try:
            if name != "sdpa":
                error = float((fn().float() - scma_exact).abs().max())
                within = error <= allowed
            graph_ms, graph_error = graph_time(fn, args.rep)
        except Exception as exc:  # noqa: BLE001  (a candidate that fails to compile or run is recorded as such)
            torch.cuda.synchronize()
            graph_ms, graph_error = None, why(exc)
        rows.append(dict(candidate=name, dtype=dtype_name, batch=batch, shots=shots, graph_ms=graph_ms,
                         graph_error=graph_error, max_abs_err_vs_fp32=error, error_allowed=allowed,
                         within_rule=within))
        print(f"  sweep {name:14s} {dtype_name} B={batch:2d} K={shots}: "
              f"{'n/a' if graph_ms is None else f'{graph_ms:.4f}'} ms as a CUDA graph", file=sys.stderr)
    return rows


def sweep_markdown(rows) -> str:
    names = list(dict.fromkeys(r["candidate"] for r in rows))
    shapes = sorted({(r["dtype"], r["batch"], r["shots"]) for r in rows})
    keyed = {(r["dtype"], r["batch"], r["shots"], r["candidate"]): r for r in rows}
    lines = ["\nsweep: GPU ms per call (CUDA graph replay, median) of the op per attention config / split:\n",
             "| dtype | batch | K | " + " | ".join(names) + " | best | best / sdpa |",
             "|" + "---|" * (len(names) + 5)]
    for shape in shapes:
        got = {name: keyed.get((*shape, name), {}).get("graph_ms") for name in names}
        fails = {name for name in names if not keyed.get((*shape, name), {}).get("within_rule", True)}
        timed = {n: t for n, t in got.items() if t is not None and n != "sdpa" and n not in fails}
        best = min(timed, key=timed.get) if timed else None
        ratio = f"{timed[best] / got['sdpa']:.2f}x" if best and got.get("sdpa") else "n/a"
        lines.append(f"| {shape[0]} | {shape[1]} | {shape[2]} | "
                     + " | ".join("n/a" if t is None else f"{t:.4f}" + (" (error over rule)" if n in fails else "")
                                  for n, t in got.items())
                     + f" | {best} | {ratio} |")
    return "\n".join(lines)


def autotune_choices() -> dict:
    """The config each autotuned kernel picked, per autotune key (shapes and dtypes)."""
    from fssam.ops.scma.triton_kernel import _AUTOTUNED

    return {name: {str(key): str(config) for key, config in tuner.cache.items()} for name, tuner in _AUTOTUNED.items()}


def _ms(row, key="time_ms") -> str:
    return "n/a" if row.get(key) is None else f"{row[key]:.3f}"


def _ratio(a, b, key="time_ms") -> str:
    return "n/a" if a.get(key) is None or b.get(key) is None else f"{a[key] / b[key]:.2f}x"


IMPLS = ("triton", "triton_split", "torchprep", "fused", "onepass", "reference", "sdpa")


def _best(*rows, key="time_ms"):
    timed = [r for r in rows if r.get(key) is not None]
    return min(timed, key=lambda r: r[key]) if timed else {}


def markdown(rows) -> str:
    keyed = {(r["dtype"], r["batch"], r["shots"], r["impl"]): r for r in rows}
    shapes = sorted({(r["dtype"], r["batch"], r["shots"]) for r in rows})
    lines = []
    for key, title in (("time_ms", "launched from Python (do_bench)"), ("graph_ms", "replayed as a CUDA graph")):
        lines += [f"\n{title}, ms (median):\n",
                  "| dtype | batch | K | chunks | " + " | ".join(IMPLS) + " | op vs reference | op / sdpa |",
                  "|" + "---|" * (len(IMPLS) + 6)]
        for dtype, batch, shots in shapes:
            got = {impl: keyed[(dtype, batch, shots, impl)] for impl in IMPLS}
            op = _best(got["triton"], got["triton_split"], key=key)  # the faster of one pass and split
            lines.append(f"| {dtype} | {batch} | {shots} | {got['fused']['chunks']} | "
                         + " | ".join(_ms(got[impl], key) for impl in IMPLS)
                         + f" | {_ratio(got['reference'], op, key)} | {_ratio(op, got['sdpa'], key)} |")
    lines += ["\npeak memory (MiB) and max abs error vs the fp32 reference on the same rounded inputs:\n",
              "| dtype | batch | K | triton MiB | reference MiB | sdpa MiB | triton err | triton_split err | reference err |",
              "|" + "---|" * 9]
    for dtype, batch, shots in shapes:
        got = {impl: keyed[(dtype, batch, shots, impl)] for impl in IMPLS}
        lines.append(f"| {dtype} | {batch} | {shots} | {got['triton']['peak_mem_mib']:.1f} "
                     f"| {got['reference']['peak_mem_mib']:.1f} | {got['sdpa']['peak_mem_mib']:.1f} "
                     f"| {got['triton']['max_abs_err_vs_fp32']:.2e} | {got['triton_split']['max_abs_err_vs_fp32']:.2e} "
                     f"| {got['reference']['max_abs_err_vs_fp32']:.2e} |")
    lines.append("\n\"op\": the faster of triton (one pass) and triton_split. The kernel's error must be <= 2x the "
                 "reference's in the same dtype. The CUDA-graph times are GPU time without Python launch overhead.")
    return "\n".join(lines)


def plot(rows, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover
        raise SystemExit("bench_scma: the plot needs matplotlib (pip install matplotlib)") from exc
    groups = sorted({(r["dtype"], r["shots"]) for r in rows})
    fig, axes = plt.subplots(2, len(groups), figsize=(4.5 * len(groups), 7), squeeze=False)
    for col, (dtype, shots) in enumerate(groups):
        for impl, marker in (("triton", "o"), ("triton_split", "v"), ("torchprep", "D"), ("fused", "x"),
                             ("onepass", "+"), ("reference", "s"), ("sdpa", "^")):
            sel = sorted((r for r in rows if (r["dtype"], r["shots"], r["impl"]) == (dtype, shots, impl)),
                         key=lambda r: r["batch"])
            batches = [r["batch"] for r in sel]
            axes[0][col].plot(batches, [r["time_ms"] for r in sel], marker=marker, label=impl)
            axes[1][col].plot(batches, [r["peak_mem_mib"] for r in sel], marker=marker, label=impl)
        axes[0][col].set_title(f"{dtype}, K={shots}")
        for row, ylabel in ((0, "time (ms)"), (1, "peak memory (MiB)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def shapes(args):
    return [(dtype_name, shots, batch) for dtype_name in args.dtypes for shots in args.shots for batch in args.batches]


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench_scma: no CUDA GPU on this machine. The benchmark times GPU kernels and reports "
            "nothing without one (run it on a GPU machine)."
        )
    import triton

    from fssam.files import write_json

    device = torch.cuda.get_device_name()
    print(f"SCMA benchmark on {device}: N={args.tokens}, c={args.head_dim}, H={args.heads}, P=4(K+1), "
          f"mode {args.mode}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    slug = "".join(ch if ch.isalnum() else "-" for ch in device).strip("-").lower()
    json_path = args.out / f"scma_{slug}_{stamp}.json"
    rows, swept = [], []

    def save(complete: bool) -> None:
        """(Re)write the JSON after every shape, by rename (never half-written): a run cut short, by a
        lease's time limit say, keeps what it measured, marked "complete": false."""
        meta = dict(
            device=device, capability=list(torch.cuda.get_device_capability()), torch=torch.__version__,
            triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(), date=stamp,
            tokens=args.tokens, head_dim=args.head_dim, heads=args.heads, mode=args.mode,
            timing="triton.testing.do_bench median, CUDA events; graph_ms: do_bench_cudagraph median",
            memory="peak allocated during one call minus baseline",
            sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
            autotuned=autotune_choices(), complete=complete,
        )
        write_json(str(json_path), dict(meta=meta, results=rows, sweep=swept))

    for shape in shapes(args):
        rows += measure(args, *shape)
        torch.cuda.empty_cache()
        save(complete=False)
    if args.sweep:
        for shape in shapes(args):
            swept += sweep(args, *shape)
            save(complete=False)
    save(complete=True)
    table = markdown(rows) + ("\n" + sweep_markdown(swept) if swept else "")
    print(f"### SCMA on {device} (N={args.tokens}, c={args.head_dim}, H={args.heads}, P=4(K+1))\n")
    print(table)
    png_path = json_path.with_suffix(".png")
    plot(rows, png_path, f"SCMA on {device}: N={args.tokens}, c={args.head_dim}")
    print(f"\nwrote {json_path} and {png_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
