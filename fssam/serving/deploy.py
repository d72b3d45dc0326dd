"""`fssam deploy`: export -> repository (python-ort) -> serve on free loopback ports -> one episode
through the server vs eager PyTorch -> client-side latency (support cached vs not), in one go."""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from fssam.errors import InputError
from fssam.serving import ServingError

LOGITS_ATOL = 1e-3  # the fp32 export gate (fssam.runtime.parity)
MIN_IOU = 0.999


def _step(i: int, n: int, text: str, progress: bool) -> float:
    if progress:
        print(f"[{i}/{n}] {text}", flush=True)
    return time.perf_counter()


def _inprocess_latency(artifacts, query, supports, masks, runs: int) -> tuple[float, float]:
    """Median seconds of the same episode in ONNX Runtime in this process: full, and with the support cached."""
    from fssam.runtime import as_torch, open_runner

    stages = as_torch(open_runner("onnxruntime", artifacts))
    stages(query, supports, masks)  # warm-up
    full = []
    for _ in range(runs):
        t0 = time.perf_counter()
        stages(query, supports, masks)
        full.append(time.perf_counter() - t0)
    support = stages.encode_support(supports, masks)
    cached = []
    for _ in range(runs):
        t0 = time.perf_counter()
        stages.segment(query, support)
        cached.append(time.perf_counter() - t0)
    return statistics.median(full), statistics.median(cached)


def deploy(config: str, out: str, checkpoint=None, shots: int = 1, seed: int = 0, runs: int = 5,
           progress: bool = True) -> dict:
    from fssam.export import export
    from fssam.runtime.parity import mask_iou, sample_episode
    from fssam.model import build
    from fssam.serving.client import RemoteFSSAM
    from fssam.serving.repository import write_repository
    from fssam.serving.server import TritonServer

    if runs < 1:
        raise InputError(f"--runs must be >= 1, got {runs}")
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    artifacts, repository = os.path.join(out, "artifacts"), os.path.join(out, "repository")
    n = 5
    start = _step(1, n, f"export {config} ({shots}-shot, fp32) -> {artifacts}", progress)
    manifest = export(config, out=artifacts, checkpoint=checkpoint, shots=shots, precision="fp32", seed=seed,
                      progress=progress)
    weights = manifest["weights"]
    print(f"      exported in {time.perf_counter() - start:.1f} s; weights: {weights['source']}", flush=True)
    if "note" in weights:
        print(f"      note: {weights['note']}", flush=True)

    _step(2, n, f"model repository (python-ort) -> {repository}", progress)
    write_repository(artifacts, repository, stage_backend="python-ort")

    start = _step(3, n, "start tritonserver on 127.0.0.1 (free ports)", progress)
    server = TritonServer(repository, http_port=0, grpc_port=0)
    server.start()
    try:
        print(f"      ready in {time.perf_counter() - start:.1f} s: gRPC {server.grpc_url}, HTTP {server.http_url}",
              flush=True)
        _step(4, n, "one episode through the server vs eager PyTorch", progress)
        model = build(config, checkpoint=checkpoint, seed=seed)
        query, supports, masks = sample_episode(model.config, shots, batch=1, seed=seed + 11)
        with torch.inference_mode():
            eager = model(query, supports, masks)
        with RemoteFSSAM(server.grpc_url) as remote:
            served, _ = remote.infer(query, supports, masks)
            max_abs = float((served - eager).abs().max())
            iou = mask_iou(served, eager)
            passed = max_abs <= LOGITS_ATOL and iou >= MIN_IOU
            print(f"      logits max abs {max_abs:.2e} (gate {LOGITS_ATOL:g}), mask IoU {iou:.4f} (gate {MIN_IOU}): "
                  f"{'PASS' if passed else 'FAIL'}", flush=True)

            _step(5, n, f"latency, client-measured over gRPC, median of {runs} runs", progress)
            uncached = []
            for i in range(runs):  # a new support set each time: encoded on every request
                fresh = supports + (i + 1) * 1e-3
                t0 = time.perf_counter()
                _, hit = remote.infer(query, fresh, masks)
                uncached.append(time.perf_counter() - t0)
                if bool(hit.any()):
                    raise ServingError("a new support set was reported as cached: the support cache key is wrong")
            remote.infer(query, supports, masks)  # make sure it is cached
            cached = []
            for _ in range(runs):
                t0 = time.perf_counter()
                _, hit = remote.infer(query, supports, masks)
                cached.append(time.perf_counter() - t0)
                if not bool(hit.all()):
                    raise ServingError("a repeated support set was not served from the cache")
        inprocess_full, inprocess_cached = _inprocess_latency(artifacts, query, supports, masks, runs)
    finally:
        server.stop()
    result = {
        "config": config, "weights": weights["source"], "max_abs": max_abs, "iou": iou, "passed": passed,
        "latency_uncached_ms": 1000 * statistics.median(uncached), "latency_cached_ms": 1000 * statistics.median(cached),
        "inprocess_ort_ms": 1000 * inprocess_full, "inprocess_ort_cached_ms": 1000 * inprocess_cached,
        "artifacts": artifacts, "repository": repository,
    }
    print(f"      uncached support: {result['latency_uncached_ms']:.1f} ms  cached support: "
          f"{result['latency_cached_ms']:.1f} ms  (median of {runs}; {config}, {shots}-shot, CPU, python-ort)")
    print(f"      in-process ONNX Runtime: {result['inprocess_ort_ms']:.1f} ms, cached support "
          f"{result['inprocess_ort_cached_ms']:.1f} ms; server overhead at concurrency 1: "
          f"{100 * (result['latency_uncached_ms'] / result['inprocess_ort_ms'] - 1):+.1f}% "
          f"(cached {100 * (result['latency_cached_ms'] / result['inprocess_ort_cached_ms'] - 1):+.1f}%)")
    print(f"deployed {config}: {repository} (serve it with `fssam serve --repository {repository}`); "
          f"weights: {weights['source']}")
    if weights["source"].startswith("random"):
        print("note: random-init weights (no --checkpoint): the server's masks are not a trained model's predictions",
              file=sys.stderr)
    if not passed:
        raise ServingError(f"served logits differ from eager PyTorch: max abs {max_abs:.2e}, IoU {iou:.4f}")
    return result
