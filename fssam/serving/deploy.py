"""`fssam deploy`: export -> time every runtime here -> repository with the fastest that passed its
gate -> serve on free loopback ports -> check one episode against eager -> served latency.

1. Export fp32 ONNX (gated on ONNX Runtime) and the OpenVINO plans, each gated against eager
   PyTorch: fp32; bf16 where the CPU has native bf16; int8 with --int8 (--calibration DIR).
2. Time, on one episode, interleaved (fssam.bench.harness): eager fp32, eager bf16 autocast,
   ONNX Runtime fp32 and every exported OpenVINO plan. The candidates are the exported runtimes
   whose gate passed; the one with the lowest median episode latency is chosen.
3. Write the repository with it (python-ort, or python-openvino at its precision) and serve it.
4. Check the served logits against eager fp32 with the gate's end-to-end check (limits from eager
   bf16 autocast for bf16 / int8) on the gate's episode, and against the same runtime in process.
5. Served latency (client over gRPC; new support set / cached support) interleaved with the same
   runtime in process and the two eager baselines, and the server's overhead.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch

from fssam.errors import InputError
from fssam.serving import ServingError

STAGE_BACKENDS = {"onnxruntime": "python-ort", "openvino": "python-openvino"}  # in-process runtime: served as
LABELS = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
GATE_EPISODE_SEED = 7  # fssam.export gates on sample_episode(seed + 7)
STEPS = 6


@dataclass
class Measured:
    """One timed mode: an eager baseline (runtime None), or an exported runtime and its gate."""

    label: str
    mode: object  # fssam.bench.harness.StageMode
    runtime: str | None = None
    precision: str = "fp32"
    runner: object = None  # the in-process stage runner (torch in / out)
    passed: bool = False

    @property
    def stage_backend(self) -> str:
        return STAGE_BACKENDS[self.runtime]


def _step(i: int, text: str, progress: bool) -> float:
    if progress:
        print(f"[{i}/{STEPS}] {text}", flush=True)
    return time.perf_counter()


def openvino_precisions(int8: bool) -> tuple[str, ...]:
    """The OpenVINO plans to export here: fp32, bf16 on a CPU with native bf16, int8 if asked."""
    from fssam.runtime.cpu import native_bf16

    return ("fp32",) + (("bf16",) if native_bf16() else ()) + (("int8",) if int8 else ())


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _measured(model, artifacts: str, manifest: dict) -> list[Measured]:
    """The eager baselines, ONNX Runtime fp32 and every exported OpenVINO plan, opened for timing."""
    from fssam.bench.harness import StageMode
    from fssam.runtime import as_torch, open_runner
    from fssam.runtime.runners.openvino import PRECISIONS

    rows = [Measured("eager fp32", StageMode("eager fp32", model)),
            Measured("eager bf16 autocast", StageMode("eager bf16 autocast", model, context=_autocast), precision="bf16")]
    gates = {("onnxruntime", "fp32"): manifest["parity"]["onnxruntime"]["passed"]}
    gates.update({("openvino", p): manifest["openvino"][p]["parity"]["passed"]
                  for p in PRECISIONS if p in manifest.get("openvino", {})})
    for (runtime, precision), passed in gates.items():
        label = f"{LABELS[runtime]} {precision}"
        runner = as_torch(open_runner(runtime, artifacts, precision=precision))
        rows.append(Measured(label, StageMode(label, runner), runtime, precision, runner, passed))
    return rows


def choose(rows: list[Measured], results: dict) -> Measured:
    """The exported runtime with the lowest median episode latency among those that passed their gate."""
    candidates = [row for row in rows if row.runtime and row.passed]
    if not candidates:
        raise ServingError("no exported runtime passed its parity gate: nothing to serve")
    return min(candidates, key=lambda row: results[row.label]["episode"]["median_ms"])


def _gate_text(row: Measured) -> str:
    return "reference" if row.runtime is None else ("passed" if row.passed else "FAILED")


def _print_table(rows: list[Measured], results: dict, runs: int) -> None:
    print(f"      in process, median of {runs} interleaved runs on one episode:")
    print(f"        {'runtime':22s} {'gate':10s} {'episode ms':>11s} {'cached ms':>10s}")
    for row in rows:
        result = results[row.label]
        print(f"        {row.label:22s} {_gate_text(row):10s} {result['episode']['median_ms']:11.1f} "
              f"{result['cached_support']['median_ms']:10.1f}")


def _print_choice(chosen: Measured, rows: list[Measured], results: dict) -> None:
    from fssam.runtime import cpu

    ms = {row.label: results[row.label]["episode"]["median_ms"] for row in rows}
    others = sorted((ms[row.label], row.label) for row in rows if row.runtime and row.passed and row is not chosen)
    runner_up = f"; next {others[0][1]} {others[0][0]:.1f} ms" if others else ""
    print(f"      chosen: {chosen.runner.describe()} -> stage backend {chosen.stage_backend}: the fastest that passed "
          f"its gate ({ms[chosen.label]:.1f} ms{runner_up})", flush=True)
    if not cpu.native_bf16():
        print(f"      OpenVINO bf16 was not a candidate: this CPU has no native bf16 "
              f"({' or '.join(cpu.NATIVE_BF16_FLAGS)}): {cpu.describe()}", flush=True)


def check_served(model, chosen: Measured, served, episode) -> tuple[dict, list[str], float]:
    """The gate's end-to-end check of served logits vs eager fp32 (limits from eager bf16 autocast
    for a bf16 / int8 runtime), and the max abs difference to the same runtime in process."""
    from fssam.runtime.parity import Baseline, check_end_to_end

    kind = chosen.runner.baseline
    with torch.inference_mode():
        eager = model(*episode)
        inprocess = chosen.runner(*episode).float()
    low = Baseline(model, chosen.precision, kind).episode(*episode) if kind != "fp32" else None
    end, failures = check_end_to_end(served, eager, low, kind)
    return end, failures, float((served - inprocess).abs().max())


def _check_cache(remote, episode) -> object:
    """Logits of the episode, sent twice: new support set (not cached), then the same (cached)."""
    logits, first = remote.infer(*episode)
    _, second = remote.infer(*episode)
    if bool(first.any()):
        raise ServingError("a new support set was reported as cached: the support cache key is wrong")
    if not bool(second.all()):
        raise ServingError("a repeated support set was not served from the cache")
    return logits


def _overhead(served: float, inprocess: float) -> str:
    return f"{100 * (served / inprocess - 1):+.1f}%"


def _served_latency(url: str, chosen: Measured, rows: list[Measured], episode, runs: int) -> dict:
    """Served (client over gRPC) interleaved with the same runtime in process and the eager baselines."""
    from fssam.bench.commands import _Served
    from fssam.bench.harness import EpisodeMode, run_interleaved

    served = _Served(url)
    try:
        modes = [EpisodeMode("served", served), chosen.mode] + [row.mode for row in rows if row.runtime is None]
        return run_interleaved(modes, episode, iterations=runs, warmup=1)
    finally:
        served.remote.close()


def _print_latency(latency: dict, chosen: Measured, runs: int, config: str, shots: int) -> dict:
    def pair(name):
        return latency[name]["episode"]["median_ms"], latency[name]["cached_support"]["median_ms"]

    served, inprocess = pair("served"), pair(chosen.label)
    figures = {"served_ms": served[0], "served_cached_ms": served[1], "inprocess_ms": inprocess[0],
               "inprocess_cached_ms": inprocess[1], "overhead": _overhead(served[0], inprocess[0]),
               "overhead_cached": _overhead(served[1], inprocess[1])}
    print(f"      served ({chosen.stage_backend} {chosen.precision}, client over gRPC, median of {runs}; {config}, "
          f"{shots}-shot, CPU): new support set {served[0]:.1f} ms, cached support {served[1]:.1f} ms")
    print(f"      in-process {chosen.label}: {inprocess[0]:.1f} ms, cached support {inprocess[1]:.1f} ms; server "
          f"overhead at concurrency 1: {figures['overhead']} (cached {figures['overhead_cached']})")
    eager = []
    for label in ("eager fp32", "eager bf16 autocast"):
        full, cached = pair(label)
        figures[label] = {"ms": full, "cached_ms": cached}
        eager.append(f"{label} {full:.1f} ms (cached support {cached:.1f} ms)")
    print(f"      same run: {'; '.join(eager)}")
    return figures


def _export(config, artifacts, checkpoint, shots, seed, progress, int8, calibration) -> dict:
    from fssam.export import export

    precisions = openvino_precisions(int8)
    start = _step(1, f"export {config} ({shots}-shot, fp32 ONNX; OpenVINO {', '.join(precisions)}) -> {artifacts}",
                  progress)
    manifest = export(config, out=artifacts, checkpoint=checkpoint, shots=shots, precision="fp32", seed=seed,
                      progress=progress, openvino=precisions, calibration=calibration)
    weights = manifest["weights"]
    print(f"      exported in {time.perf_counter() - start:.1f} s; weights: {weights['source']}", flush=True)
    if "note" in weights:
        print(f"      note: {weights['note']}", flush=True)
    return manifest


def deploy(config: str, out: str, checkpoint=None, shots: int = 1, seed: int = 0, runs: int = 5,
           progress: bool = True, int8: bool = False, calibration: str | None = None) -> dict:
    from fssam.bench.harness import run_interleaved
    from fssam.model import build
    from fssam.runtime.parity import sample_episode
    from fssam.serving.client import RemoteFSSAM
    from fssam.serving.repository import write_repository
    from fssam.serving.server import TritonServer

    if runs < 1:
        raise InputError(f"--runs must be >= 1, got {runs}")
    if calibration is not None and not int8:
        raise InputError("--calibration is for int8 quantization: add --int8")
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    artifacts, repository = os.path.join(out, "artifacts"), os.path.join(out, "repository")
    manifest = _export(config, artifacts, checkpoint, shots, seed, progress, int8, calibration)
    weights = manifest["weights"]

    _step(2, "time every runtime in process (interleaved) and choose", progress)
    model = build(config, checkpoint=checkpoint, seed=seed)
    episode = sample_episode(model.config, shots, batch=1, seed=seed + GATE_EPISODE_SEED)
    rows = _measured(model, artifacts, manifest)
    results = run_interleaved([row.mode for row in rows], episode, iterations=runs, warmup=1)
    _print_table(rows, results, runs)
    chosen = choose(rows, results)
    _print_choice(chosen, rows, results)

    _step(3, f"model repository ({chosen.stage_backend}, {chosen.precision}) -> {repository}", progress)
    write_repository(artifacts, repository, stage_backend=chosen.stage_backend,
                     precision=chosen.precision if chosen.runtime == "openvino" else None)

    start = _step(4, "start tritonserver on 127.0.0.1 (free ports)", progress)
    server = TritonServer(repository, http_port=0, grpc_port=0)
    server.start()
    try:
        print(f"      ready in {time.perf_counter() - start:.1f} s: gRPC {server.grpc_url}, HTTP {server.http_url}",
              flush=True)
        _step(5, "the gate's episode through the server vs eager PyTorch", progress)
        with RemoteFSSAM(server.grpc_url) as remote:
            served = _check_cache(remote, episode)
        end, failures, vs_inprocess = check_served(model, chosen, served, episode)
        print(f"      logits max abs {end['max_abs']:.2e} (limit {end['limit']:.3g}), mask IoU {end['mask_iou']:.4f} "
              f"(min {end['min_iou']:.4f}) vs eager fp32: {'PASS' if not failures else 'FAIL'}; vs in-process "
              f"{chosen.label}: max abs {vs_inprocess:.2e}", flush=True)

        _step(6, f"latency: served vs in process, interleaved, median of {runs} runs", progress)
        latency = _served_latency(server.grpc_url, chosen, rows, episode, runs)
    finally:
        server.stop()
    figures = _print_latency(latency, chosen, runs, config, shots)
    print(f"deployed {config}: {repository} ({chosen.stage_backend} {chosen.precision}; serve it with "
          f"`fssam serve --repository {repository}`); weights: {weights['source']}")
    if weights["source"].startswith("random"):
        print("note: random-init weights (no --checkpoint): the server's masks are not a trained model's predictions",
              file=sys.stderr)
    if failures:
        raise ServingError(f"served logits differ from eager PyTorch: {'; '.join(failures)}")
    return {
        "config": config, "weights": weights["source"], "chosen": chosen.label, "stage_backend": chosen.stage_backend,
        "precision": chosen.precision, "inprocess": {row.label: results[row.label] for row in rows},
        "end_to_end": end, "passed": not failures, "served_vs_inprocess_max_abs": vs_inprocess, **figures,
        "artifacts": artifacts, "repository": repository,
    }
