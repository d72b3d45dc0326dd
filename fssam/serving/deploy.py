"""`fssam deploy`: export -> time the deployable graphs on every runtime here -> repository with the
fastest that passed its gate -> serve it (Triton ensemble, response cache) -> parity and overheads.

1. Export fp32 ONNX (stages and the two graphs, gated on ONNX Runtime) and the OpenVINO plans:
   fp32, and bf16 where the CPU has native bf16 (the graphs gated whole).
2. Time, in process and interleaved (fssam.bench.harness.GraphMode): eager fp32, eager bf16
   autocast, ONNX Runtime fp32 and OpenVINO at each gated graph precision. The fastest runtime
   whose graph gate passed is chosen.
3. Write the repository with it (python-ort or python-openvino) and serve it with Triton's
   response cache on support_encoder.
4. The gate's episode through the ensemble vs eager fp32 (the end-to-end check; limits from eager
   bf16 autocast for bf16); it and a fresh episode vs the same runtime in process (fp32 limit);
   the gate's episode sent twice, the second must be a cache hit in Triton's statistics with
   identical logits.
5. Latency at concurrency 1, interleaved: served (new support set / cached support) vs the same
   runtime in process and the two eager baselines; the server's overhead.
6. Throughput at concurrency 1, 2, 4, 8 (dynamic batching), cached and new support sets, and the
   request payload (UINT8 vs the FP32 the per-stage pipeline took).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch

from fssam.errors import InputError
from fssam.files import check_output_folder, json_with, write_json
from fssam.serving import DEFAULT_CACHE_MB, ServingError

BACKENDS = {"onnxruntime": "python-ort", "openvino": "python-openvino"}  # in-process runtime: served as
LABELS = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
GATE_EPISODE_SEED = 7  # fssam.export gates on sample_episode(seed + 7)
FRESH_EPISODE_SEED = 1000  # an episode no gate saw, for the served-vs-in-process check
STEPS = 6
RESULT_FILE = "deploy.json"
DEPLOY_FORMAT = "fssam-deploy/1"  # deploy.json: the folder is a deploy run's own, which a later run may replace


@dataclass
class Measured:
    """One timed mode: an eager baseline (runtime None), or an exported runtime's graphs and their gate."""

    label: str
    mode: object  # fssam.bench.harness.GraphMode
    runtime: str | None = None
    precision: str = "fp32"
    runner: object = None  # the in-process runner (torch in / out)
    passed: bool = False

    @property
    def backend(self) -> str:
        return BACKENDS[self.runtime]


def _step(i: int, text: str, progress: bool) -> float:
    if progress:
        print(f"[{i}/{STEPS}] {text}", flush=True)
    return time.perf_counter()


def openvino_precisions() -> tuple[str, ...]:
    """The OpenVINO plans to export here: fp32, and bf16 on a CPU with native bf16."""
    from fssam.runtime.cpu import native_bf16

    return ("fp32",) + (("bf16",) if native_bf16() else ())


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def graph_gates(manifest: dict) -> dict:
    """{(runtime, precision): passed} of the deployable graphs' gates in an export manifest.
    An OpenVINO bf16 plan whose graphs fell back to fp32 is the fp32 candidate, not a second one."""
    gates = {("onnxruntime", "fp32"): manifest["graph_parity"]["onnxruntime"]["passed"]}
    for precision, entry in manifest.get("openvino", {}).items():
        graphs = entry.get("graphs") if isinstance(entry, dict) else None
        if graphs and graphs["precision"] == precision:
            gates[("openvino", precision)] = graphs["parity"]["passed"]
    return gates


def _measured(model, artifacts: str, manifest: dict) -> list[Measured]:
    """The eager baselines and every gated runtime's graphs, opened for timing."""
    from fssam.bench.harness import GraphMode
    from fssam.runtime import as_torch, open_runner

    rows = [Measured("eager fp32", GraphMode("eager fp32", model)),
            Measured("eager bf16 autocast", GraphMode("eager bf16 autocast", model, context=_autocast),
                     precision="bf16")]
    for (runtime, precision), passed in graph_gates(manifest).items():
        label = f"{LABELS[runtime]} {precision}"
        runner = as_torch(open_runner(runtime, artifacts, precision=precision))
        rows.append(Measured(label, GraphMode(label, runner), runtime, precision, runner, passed))
    return rows


def choose(rows: list[Measured], results: dict) -> Measured:
    """The exported runtime with the lowest median episode latency among those that passed their gate."""
    candidates = [row for row in rows if row.runtime and row.passed]
    if not candidates:
        raise ServingError("no exported runtime passed its parity gate: nothing to serve")
    return min(candidates, key=lambda row: results[row.label]["episode"]["median_ms"])


def _print_table(rows: list[Measured], results: dict, runs: int) -> None:
    print(f"      in process (the two graphs), median of {runs} interleaved runs on one episode:")
    print(f"        {'runtime':22s} {'gate':10s} {'episode ms':>11s} {'cached ms':>10s}")
    for row in rows:
        result = results[row.label]
        gate = "reference" if row.runtime is None else ("passed" if row.passed else "FAILED")
        print(f"        {row.label:22s} {gate:10s} {result['episode']['median_ms']:11.1f} "
              f"{result['cached_support']['median_ms']:10.1f}")


def _print_choice(chosen: Measured, rows: list[Measured], results: dict) -> None:
    from fssam.runtime import cpu

    ms = {row.label: results[row.label]["episode"]["median_ms"] for row in rows}
    others = sorted((ms[row.label], row.label) for row in rows if row.runtime and row.passed and row is not chosen)
    runner_up = f"; next {others[0][1]} {others[0][0]:.1f} ms" if others else ""
    print(f"      chosen: {chosen.label} -> backend {chosen.backend}: the fastest that passed its gate "
          f"({ms[chosen.label]:.1f} ms{runner_up})", flush=True)
    if not cpu.native_bf16():
        print(f"      OpenVINO bf16 was not a candidate: this CPU has no native bf16 "
              f"({' or '.join(cpu.NATIVE_BF16_FLAGS)}): {cpu.describe()}", flush=True)


def check_served(model, chosen: Measured, served, episode, fresh_served,
                 fresh) -> tuple[dict, list[str], dict, list[str]]:
    """The gate's end-to-end check of served logits vs eager fp32 (limits from eager bf16 autocast
    for bf16) on the gate's episode; and, on that episode and a fresh one, the served logits vs the
    same runtime in process, held to the fp32 limit (the same computation: a difference is wiring).
    Returns (end-to-end stats, its failures, {episode: served vs in process}, their failures)."""
    from fssam.runtime.contract import run_graphs
    from fssam.runtime.parity import Baseline, check_end_to_end, fp32_limit

    kind = chosen.runner.baseline
    with torch.inference_mode():
        eager = model(*episode)
        inprocess = {"gate_episode": run_graphs(chosen.runner, *episode).float(),
                     "fresh_episode": run_graphs(chosen.runner, *fresh).float()}
    low = Baseline(model, chosen.precision, kind).episode(*episode) if kind != "fp32" else None
    end, failures = check_end_to_end(served, eager, low, kind)
    same, wiring = {}, []
    for name, got in (("gate_episode", served), ("fresh_episode", fresh_served)):
        diff, limit = float((got - inprocess[name]).abs().max()), fp32_limit(float(inprocess[name].abs().max()))
        same[name] = {"max_abs": diff, "limit": limit}
        if not diff <= limit:
            wiring.append(f"served vs in-process {chosen.label} on the {name.replace('_', ' ')}: "
                          f"max abs {diff:.3g} > {limit:.3g}")
    return end, failures, same, wiring


def check_cache(remote, episode) -> tuple[torch.Tensor, dict]:
    """The episode sent twice: the second must be a response-cache hit on support_encoder in
    Triton's statistics, with identical logits. Returns (logits, {"hits", "misses"} added)."""
    before = remote.cache_stats()
    first = remote.infer(*episode)
    middle = remote.cache_stats()
    second = remote.infer(*episode)
    after = remote.cache_stats()
    if middle["hits"] != before["hits"] and middle["misses"] == before["misses"]:
        raise ServingError("a new support set was answered from the response cache: the cache key is wrong")
    if after["hits"] != middle["hits"] + 1:
        raise ServingError(f"a repeated support set was not a response-cache hit on support_encoder "
                           f"(Triton statistics: {middle} -> {after}); is the server started with --cache-config?")
    if not torch.equal(first, second):
        raise ServingError(f"cached support gave different logits (max abs {float((first - second).abs().max()):.3g})")
    return first, {"hits": after["hits"] - before["hits"], "misses": after["misses"] - before["misses"]}


def _overhead(served: float, inprocess: float) -> str:
    return f"{100 * (served / inprocess - 1):+.1f}%"


def _served_latency(url: str, chosen: Measured, rows: list[Measured], episode, runs: int) -> dict:
    """Served (client over gRPC) interleaved with the same runtime in process and the eager baselines."""
    from fssam.bench.harness import EpisodeMode, run_interleaved
    from fssam.bench.served import Served

    served = Served(url)
    try:
        modes = [EpisodeMode("served", served), chosen.mode] + [row.mode for row in rows if row.runtime is None]
        for mode in modes[1:]:
            mode.support = None  # cached support of this episode, encoded once per mode
        return run_interleaved(modes, episode, iterations=runs, warmup=1)
    finally:
        served.close()


def _latency_figures(latency: dict, chosen: Measured) -> dict:
    def pair(name):
        return latency[name]["episode"]["median_ms"], latency[name]["cached_support"]["median_ms"]

    served, inprocess = pair("served"), pair(chosen.label)
    figures = {"served_ms": served[0], "served_cached_ms": served[1], "inprocess_ms": inprocess[0],
               "inprocess_cached_ms": inprocess[1], "overhead": _overhead(served[0], inprocess[0]),
               "overhead_cached": _overhead(served[1], inprocess[1])}
    for label in ("eager fp32", "eager bf16 autocast"):
        full, cached = pair(label)
        figures[label] = {"ms": full, "cached_ms": cached}
    return figures


def _print_latency(figures: dict, chosen: Measured, runs: int, config: str, shots: int) -> None:
    print(f"      served ({chosen.backend} {chosen.precision}, client over gRPC, median of {runs}; {config}, "
          f"{shots}-shot, CPU): new support set {figures['served_ms']:.1f} ms, cached support "
          f"{figures['served_cached_ms']:.1f} ms")
    print(f"      in-process {chosen.label}: {figures['inprocess_ms']:.1f} ms, cached support "
          f"{figures['inprocess_cached_ms']:.1f} ms; server overhead at concurrency 1: {figures['overhead']} "
          f"(cached {figures['overhead_cached']})")
    eager = [f"{label} {figures[label]['ms']:.1f} ms (cached support {figures[label]['cached_ms']:.1f} ms)"
             for label in ("eager fp32", "eager bf16 autocast")]
    print(f"      same run: {'; '.join(eager)}")
    for label in ("eager fp32", "eager bf16 autocast"):
        print(f"      served vs {label}: {figures[label]['ms'] / figures['served_ms']:.2f}x "
              f"(cached support {figures[label]['cached_ms'] / figures['served_cached_ms']:.2f}x)")


def _print_throughput(rows: list[dict], payload: dict) -> None:
    print(f"        {'clients':>7s} {'support':>8s} {'episodes/s':>11s} {'median ms':>10s} {'failures':>9s}")
    for row in rows:
        print(f"        {row['concurrency']:7d} {'cached' if row['cached_support'] else 'new':>8s} "
              f"{row['episodes_per_s']:11.2f} {row['median_ms']:10.1f} {row['failures']:9d}")
    print(f"      request payload per episode: {payload['uint8']:,} bytes as UINT8 (was {payload['fp32']:,} as FP32, "
          f"{payload['ratio']:.0f}x less)")


def _export(config, artifacts, checkpoint, shots, seed, progress, overrides) -> dict:
    from fssam.export import export

    precisions = openvino_precisions()
    start = _step(1, f"export {config} ({shots}-shot, fp32 ONNX stages + graphs; OpenVINO {', '.join(precisions)}) "
                     f"-> {artifacts}", progress)
    manifest = export(config, out=artifacts, checkpoint=checkpoint, shots=shots, precision="fp32", seed=seed,
                      progress=progress, openvino=precisions, **overrides)
    weights = manifest["weights"]
    print(f"      exported in {time.perf_counter() - start:.1f} s; weights: {weights['source']}", flush=True)
    if "note" in weights:
        print(f"      note: {weights['note']}", flush=True)
    return manifest


def _forget_earlier_run(out: str, repository: str) -> None:
    """Before anything is replaced, remove an earlier run's deploy.json and repository (each only if
    it is that run's: check_output_folder checked the JSON, remove_repository checks the repository
    first). Its artifacts are then replaced whole by the export, so a run stopped part way leaves one
    self-consistent export (and perhaps its new repository), never files of two models with a
    deploy.json describing one of them."""
    from fssam.serving.repository import remove_repository

    if os.path.isdir(repository):
        remove_repository(repository)
    result = os.path.join(out, RESULT_FILE)
    if os.path.isfile(result):
        os.remove(result)


def deploy(config: str, out: str, checkpoint=None, shots: int = 1, seed: int = 0, runs: int = 5,
           progress: bool = True, cache_mb: int = DEFAULT_CACHE_MB, clients=None, requests_per_client: int = 3,
           **overrides) -> dict:
    """`overrides`: num_refine, refine_version, scma_mode, as `fssam.model.build` takes them (None: the config's)."""
    from fssam.bench.harness import run_interleaved
    from fssam.bench.report import machine
    from fssam.bench.served import CONCURRENCY, concurrency_sweep, payload_bytes
    from fssam.model import build
    from fssam.runtime.parity import sample_episode
    from fssam.serving.client import RemoteFSSAM
    from fssam.serving.repository import write_repository
    from fssam.serving.server import TritonServer

    if runs < 1:
        raise InputError(f"--runs must be >= 1, got {runs}")
    if cache_mb < 1:
        raise InputError(f"--cache-mb must be >= 1 for deploy (the support cache is part of what it measures), got {cache_mb}")
    if shots < 1:
        raise InputError(f"--shots must be >= 1, got {shots}")
    from fssam.model import get_config

    overrides = {key: value for key, value in overrides.items() if value is not None}
    get_config(config, **overrides)  # a bad config or option fails before any folder is made
    clients = tuple(clients or CONCURRENCY)
    out = check_output_folder(out, RESULT_FILE, json_with("format", DEPLOY_FORMAT), "--out",
                              (r"artifacts", r"repository", r"\.(artifacts|repository)\.partial-.*"))
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    artifacts, repository = os.path.join(out, "artifacts"), os.path.join(out, "repository")
    try:
        _forget_earlier_run(out, repository)
        manifest = _export(config, artifacts, checkpoint, shots, seed, progress, overrides)
    except BaseException:
        if created and not os.listdir(out):  # a run that failed before writing anything leaves no --out
            os.rmdir(out)
        raise
    weights = manifest["weights"]

    _step(2, "time the graphs on every runtime in process (interleaved) and choose", progress)
    model = build(config, checkpoint=checkpoint, seed=seed, **overrides)
    episode = sample_episode(model.config, shots, batch=1, seed=seed + GATE_EPISODE_SEED)
    rows = _measured(model, artifacts, manifest)
    results = run_interleaved([row.mode for row in rows], episode, iterations=runs, warmup=1)
    _print_table(rows, results, runs)
    chosen = choose(rows, results)
    _print_choice(chosen, rows, results)

    _step(3, f"model repository (ensemble fssam: validate -> support_encoder -> query_segmenter; {chosen.backend} "
             f"{chosen.precision}) -> {repository}", progress)
    write_repository(artifacts, repository, backend=chosen.backend,
                     precision=chosen.precision if chosen.runtime == "openvino" else None)

    start = _step(4, f"start tritonserver on 127.0.0.1 (free ports, response cache {cache_mb} MB)", progress)
    server = TritonServer(repository, http_port=0, grpc_port=0, cache_mb=cache_mb)
    server.start()
    try:
        print(f"      ready in {time.perf_counter() - start:.1f} s: gRPC {server.grpc_url}, HTTP {server.http_url}",
              flush=True)
        _step(5, "the gate's episode through the ensemble vs eager PyTorch; the response cache", progress)
        fresh = sample_episode(model.config, shots, batch=1, seed=seed + FRESH_EPISODE_SEED)
        with RemoteFSSAM(server.grpc_url) as remote:
            served, cache = check_cache(remote, episode)
            fresh_served = remote.infer(*fresh)
        end, failures, vs_inprocess, wiring = check_served(model, chosen, served, episode, fresh_served, fresh)
        print(f"      logits max abs {end['max_abs']:.2e} (limit {end['limit']:.3g}), mask IoU {end['mask_iou']:.4f} "
              f"(min {end['min_iou']:.4f}) vs eager fp32: {'FAIL' if failures else 'PASS'}; vs in-process "
              f"{chosen.label}, this episode and a fresh one: max abs {vs_inprocess['gate_episode']['max_abs']:.2e}, "
              f"{vs_inprocess['fresh_episode']['max_abs']:.2e} (limit {vs_inprocess['gate_episode']['limit']:.3g}): "
              f"{'FAIL' if wiring else 'PASS'}", flush=True)
        failures += wiring
        print(f"      same support set again: a response-cache hit on support_encoder (Triton statistics: "
              f"+{cache['hits']} hit, +{cache['misses']} miss), identical logits", flush=True)

        _step(6, f"latency (median of {runs}, interleaved) and throughput at {', '.join(map(str, clients))} clients",
              progress)
        latency = _served_latency(server.grpc_url, chosen, rows, episode, runs)
        figures = _latency_figures(latency, chosen)
        _print_latency(figures, chosen, runs, config, shots)
        throughput = (concurrency_sweep(server.grpc_url, episode, clients, requests_per_client, cached=True)
                      + concurrency_sweep(server.grpc_url, episode, clients, requests_per_client, cached=False))
        payload = payload_bytes(*episode)
        _print_throughput(throughput, payload)
    finally:
        server.stop()
    print(f"deployed {config}: {repository} ({chosen.backend} {chosen.precision}; serve it with "
          f"`fssam serve --repository {repository}`); weights: {weights['source']}")
    if weights["source"].startswith("random"):
        print("note: random-init weights (no --checkpoint): the server's masks are not a trained model's predictions",
              file=sys.stderr)
    result = {
        "format": DEPLOY_FORMAT, "config": config, "shots": shots, "weights": weights["source"], "chosen": chosen.label,
        "backend": chosen.backend, "precision": chosen.precision,
        "inprocess": {row.label: results[row.label] for row in rows}, "served": latency,
        "end_to_end": end, "passed": not failures, "served_vs_inprocess": vs_inprocess,
        "cache_check": cache, **figures, "throughput": throughput, "payload_bytes": payload,
        "machine": machine(), "artifacts": artifacts, "repository": repository,
    }
    write_json(os.path.join(out, RESULT_FILE), result)
    if failures:
        raise ServingError(f"served logits differ from eager PyTorch or the same runtime in process: "
                           f"{'; '.join(failures)}")
    return result

