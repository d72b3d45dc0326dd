"""`fssam deploy`: export the two deployable graphs -> the graph plan of this machine (every runtime
and precision gated and timed, the fastest that passes per graph) -> a repository serving that plan
-> tritonserver with its response cache -> parity, latency and throughput.

1. Export (lean): the two graphs only (`fssam export` keeps writing the six stage files), gated
   on ONNX Runtime fp32; then the graph plan (fssam.export.graph_plan): ONNX Runtime fp32 / int8,
   OpenVINO fp32 / bf16 (native-bf16 CPUs) / int8, each graph gated against eager PyTorch and timed
   here; per graph the fastest that passed; the pair checked end to end.
2. The repository: each graph on its chosen backend (python-ort or python-openvino), one ensemble.
3. tritonserver on 127.0.0.1 (free ports) with the response cache on support_encoder.
4. The gate's episode through the ensemble vs eager fp32 (limits from eager bf16 autocast when a
   graph runs int8 or bf16); it and a fresh episode vs the same plan in process (fp32 limit: the
   same computation, a difference is wiring); the gate's episode twice, the second a cache hit.
5. Latency at concurrency 1, interleaved and adaptive (each mode until its median is stable or its
   time budget is spent): served (new support set / cached support) vs the plan in process and the
   two eager baselines, eager fp32 and eager bf16 autocast (timed once and labelled "emulated" on a
   CPU without native bf16, where PyTorch emulates it at about a minute an episode).
6. Throughput at 1, 2, 4, 8 clients (dynamic batching), cached and new support sets, and the
   request payload. deploy.json records every phase's wall time and the total.

`device`: auto (a CUDA GPU when torch sees one, else the CPU), cpu or cuda. On a GPU the
candidates are the AOTInductor packages of the two graphs at bf16, fp16 and fp32
(fssam.export.aoti: static batch buckets, max-autotune, replayed from CUDA graphs), each gated and
timed there, the fastest that passed served by python-torch on the GPU; the baselines are eager
fp32 (IEEE: no TF32) and eager bf16 autocast on the same GPU.
"""

from __future__ import annotations

import os
import re
import sys
import time

import torch
from tqdm import tqdm

from fssam.errors import InputError
from fssam.files import check_output_folder, json_with, write_json
from fssam.serving import DEFAULT_CACHE_MB, ServingError

GATE_EPISODE_SEED = 7  # fssam.export gates on sample_episode(seed + 7)
FRESH_EPISODE_SEED = 1000  # an episode no gate saw, for the served-vs-in-process check
STEPS = 6
RESULT_FILE = "deploy.json"
SERVER_LOG = "tritonserver.log"
DEPLOY_FORMAT = "fssam-deploy/2"  # deploy.json: the folder is a deploy run's own, which a later run may replace
OLDER_FORMATS = ("fssam-deploy/1",)
BASELINES = ("eager fp32", "eager bf16 autocast")
# deploy's graph plan, bounded to fit its time (`fssam export --plan` has none of these bounds): past
# 150 s of planning no further int8 fall-back is quantized (each is a new NNCF quantization, about a
# minute a small graph on two cores, where the plan itself takes about four), NNCF int8 skips its
# fast bias correction (a sub-model compiled and run per quantized layer, about 13 s a small graph
# there), and ONNX Runtime's static QDQ int8 is left out (calibration and quantization about 40 s a
# small graph there, and slower than its dynamic int8 where measured); the gate judges the rest
PLAN_OPTIONS = {"budget_s": 150, "bias_correction": False,
                "leave_out": {"onnxruntime int8-static": "left out of fssam deploy's bounded plan (its calibration and "
                                                        "quantization take about 40 s a small graph on two cores): "
                                                        "`fssam export --plan` tries it"}}
SERVED, INPROCESS = "served", "plan in process"


def _step(i: int, text: str, progress: bool) -> float:
    """The step's line (always: without progress bars too, a log shows where the time went)."""
    print(f"[{i}/{STEPS}] {text}", flush=True)
    return time.perf_counter()


CUDA_PRECISIONS = ("bf16", "fp16", "fp32")  # --device cuda: the AOTInductor candidates
# the gate's reference of a served precision: eager fp32 for fp32; the official bf16 autocast's
# error bounds bf16; eager fp16's own error bounds fp16
REFERENCE = {"fp32": "fp32", "bf16": "bf16_autocast", "fp16": "same_dtype"}


def _autocast(device: str = "cpu"):
    return torch.autocast(device, dtype=torch.bfloat16)


def plan_label(manifest: dict) -> str:
    if "aoti_plan" in manifest:
        entry = manifest["aoti"][manifest["aoti_plan"]["chosen"]]
        return f"both graphs torch AOTInductor {manifest['aoti_plan']['chosen']} ({entry['device']})"
    chosen = manifest["graph_plan"]["chosen"]
    return "; ".join(f"{name} {entry['runtime']} {entry['precision']}" for name, entry in chosen.items())


def check_served(model, pair, kind: str, served, episode, fresh_served, fresh,
                 precision: str = "fp32") -> tuple[dict, list[str], dict, list[str]]:
    """The gate's end-to-end check of served logits vs eager fp32 (limits from eager bf16 autocast
    when a graph is reduced) on the gate's episode; and, on that episode and a fresh one, the served
    logits vs the same plan in process, held to the fp32 limit (the same computation: a difference
    is wiring). Returns (end-to-end stats, its failures, {episode: served vs in process}, their failures)."""
    from fssam.runtime.contract import run_graphs
    from fssam.runtime.parity import Baseline, check_end_to_end, fp32_limit, ieee_fp32

    device = next(model.parameters()).device
    on = tuple(t.to(device) for t in episode)  # the eager model's device; the figures on the CPU
    with torch.inference_mode(), ieee_fp32():
        eager = model(*on).cpu()
        inprocess = {"gate_episode": run_graphs(pair, *episode).float().cpu(),
                     "fresh_episode": run_graphs(pair, *fresh).float().cpu()}
    low = Baseline(model, precision, kind).episode(*on).cpu() if kind != "fp32" else None
    end, failures = check_end_to_end(served, eager, low, kind)
    same, wiring = {}, []
    for name, got in (("gate_episode", served), ("fresh_episode", fresh_served)):
        diff, limit = float((got - inprocess[name]).abs().max()), fp32_limit(float(inprocess[name].abs().max()))
        same[name] = {"max_abs": diff, "limit": limit}
        if not diff <= limit:
            wiring.append(f"served vs the plan in process on the {name.replace('_', ' ')}: "
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


def _latency(url: str, pair, model, episode, runs: int, budget_s: float, emulated: bool, progress: bool,
             warm=(), device: str = "cpu") -> dict:
    """Served (a client of the front, HTTP binary tensors) interleaved with the plan in process and
    the eager baselines, each mode adaptively (fssam.bench.harness.run_adaptive); the modes in
    `warm` ran this episode in the checks: no warm-up."""
    from fssam.bench.harness import EpisodeMode, GraphMode, run_adaptive
    from fssam.bench.served import Served
    from fssam.runtime.parity import ieee_fp32

    served = Served(url, protocol="http")
    try:
        modes = [EpisodeMode(SERVED, served), GraphMode(INPROCESS, pair, device=device),
                 GraphMode(BASELINES[0], model, context=ieee_fp32, device=device),  # IEEE: no TF32 on a GPU
                 GraphMode(BASELINES[1], model, context=lambda: _autocast(device), device=device)]
        bar = tqdm(desc="latency", unit="episode", disable=not progress, leave=False)
        try:
            return run_adaptive(modes, episode, min_runs=runs, budget_s=budget_s,
                                once=(BASELINES[1],) if emulated else (), progress=bar, warm=warm)
        finally:
            bar.close()
    finally:
        served.close()


def _latency_figures(latency: dict, emulated: bool) -> dict:
    def pair(name):
        return latency[name]["episode"]["median_ms"], latency[name]["cached_support"]["median_ms"]

    served, inprocess = pair(SERVED), pair(INPROCESS)
    figures = {"served_ms": served[0], "served_cached_ms": served[1], "inprocess_ms": inprocess[0],
               "inprocess_cached_ms": inprocess[1], "overhead": _overhead(served[0], inprocess[0]),
               "overhead_cached": _overhead(served[1], inprocess[1])}
    for label in BASELINES:
        full, cached = pair(label)
        figures[label] = {"ms": full, "cached_ms": cached, "runs": latency[label]["runs"],
                          **({"emulated": True} if label == BASELINES[1] and emulated else {})}
    figures["speedups"] = {label: {"episode": figures[label]["ms"] / served[0],
                                   "cached_support": figures[label]["cached_ms"] / served[1]} for label in BASELINES}
    return figures


def _print_latency(figures: dict, latency: dict, plan: str, config: str, shots: int, device: str = "cpu") -> None:
    runs = ", ".join(f"{name} {entry['runs']}" for name, entry in latency.items())
    print(f"      served ({plan}; client of the front over HTTP; {config}, {shots}-shot, {device.upper()}): new support set "
          f"{figures['served_ms']:.1f} ms, cached support {figures['served_cached_ms']:.1f} ms (runs: {runs})")
    print(f"      plan in process: {figures['inprocess_ms']:.1f} ms, cached support {figures['inprocess_cached_ms']:.1f} ms; "
          f"server overhead at concurrency 1: {figures['overhead']} (cached {figures['overhead_cached']})")
    for label in BASELINES:
        entry = figures[label]
        note = " (emulated: no native bf16 on this CPU, timed once)" if entry.get("emulated") else ""
        print(f"      {label}{note}: {entry['ms']:.1f} ms (cached support {entry['cached_ms']:.1f} ms) -> served "
              f"{figures['speedups'][label]['episode']:.2f}x (cached support "
              f"{figures['speedups'][label]['cached_support']:.2f}x)")


def _print_throughput(rows: list[dict], payload: dict) -> None:
    from fssam.bench.report import reported

    print(f"        {'clients':>7s} {'support':>8s} {'episodes/s':>11s} {'median ms':>10s} {'failures':>9s} "
          f"{'cache hits':>10s} {'misses':>7s}")
    for row in rows:
        print(f"        {row['concurrency']:7d} {'cached' if row['cached_support'] else 'new':>8s} "
              f"{row['episodes_per_s']:11.2f} {row['median_ms']:10.1f} {row['failures']:9d} "
              f"{reported(row['cache_hits']):>10s} {reported(row['cache_misses']):>7s}")
    print(f"      request payload per episode: {payload['uint8']:,} bytes as UINT8 (was {payload['fp32']:,} as FP32, "
          f"{payload['ratio']:.0f}x less)")


def describe_aoti(manifest: dict) -> list[str]:
    """Lines for the terminal: each AOTInductor precision's gate and time, and the choice."""
    plan = manifest["aoti_plan"]
    lines = []
    for precision, entry in plan["candidates"].items():
        package = manifest["aoti"][precision]
        if "error" in package:
            gate = "FAILED to compile"
        else:
            parity = package["parity"]["end_to_end"]
            gate = (f"passed (max abs {parity['max_abs']:.2e}, limit {parity['limit']:.2e})" if entry["passed"]
                    else "FAILED its gate")
        timed = f"{entry['ms']:9.2f} ms" if entry["passed"] else "not timed"
        lines.append(f"    torch AOTInductor {precision:5s} {gate:45s} {timed}"
                     + (" <- chosen" if precision == plan["chosen"] else ""))
        if "error" in package:
            lines.append(f"      with the SCMA kernel: {package.get('scma_error')}; with the reference SCMA: "
                         f"{package['error']}")
        elif package.get("scma") == "reference":
            lines.append(f"      SCMA as the reference's torch ops: the packages with the Triton kernel failed "
                         f"({package['scma_error']})")
        if "compile_s" in package:
            lines.append(f"      compiled in {package['compile_s']:.0f} s; runs as: {package['parity']['runtime']}")
    return lines


def _export(config, artifacts, checkpoint, shots, seed, progress, calibration, threads, overrides,
            device: str = "cpu", precisions: tuple | None = None) -> dict:
    from fssam.export import export
    from fssam.export.graph_plan import describe

    if precisions:
        where = "this GPU" if device == "cuda" else "this CPU"
        start = _step(1, f"export {config} ({shots}-shot, the two deployable graphs) as AOTInductor {device.upper()} "
                         f"packages at {', '.join(precisions)}, each gated and timed on {where} -> {artifacts}", progress)
        manifest = export(config, out=artifacts, checkpoint=checkpoint, shots=shots, precision="fp32", seed=seed,
                          progress=progress, stages=False, aoti=precisions, aoti_device=device, aoti_plan=True,
                          **overrides)
        lines = describe_aoti(manifest)
    else:
        start = _step(1, f"export {config} ({shots}-shot, the two deployable graphs) and plan them on this machine "
                         f"(every runtime and precision gated and timed) -> {artifacts}", progress)
        manifest = export(config, out=artifacts, checkpoint=checkpoint, shots=shots, precision="fp32", seed=seed,
                          progress=progress, stages=False, plan=True, calibration=calibration, threads=threads,
                          plan_options=PLAN_OPTIONS, **overrides)
        lines = describe(manifest["graph_plan"])
    weights = manifest["weights"]
    print(f"      exported and planned in {time.perf_counter() - start:.1f} s; weights: {weights['source']}", flush=True)
    print("\n".join(lines), flush=True)
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
    from fssam.serving.server import written_log

    if os.path.isdir(repository):
        remove_repository(repository)
    result, log = os.path.join(out, RESULT_FILE), os.path.join(out, SERVER_LOG)
    if os.path.isfile(result):
        os.remove(result)
    if os.path.isfile(log) and written_log(log):  # its server's log (a file of another kind stays)
        os.remove(log)


def deploy(config: str, out: str, checkpoint=None, shots: int = 1, seed: int = 0, runs: int = 3,
           budget_s: float = 12.0, progress: bool = True, cache_mb: int = DEFAULT_CACHE_MB, clients=None,
           requests_per_client: int = 2, calibration: str | None = None, threads: int | None = None,
           device: str = "auto", precisions=None, **overrides) -> dict:
    """`overrides`: num_refine, refine_version, scma_mode, as `fssam.model.build` takes them (None: the
    config's). `runs`: at least this many timed episodes per latency mode; `budget_s`: a mode stops
    once its median is stable or it has spent this many seconds. `device`: auto, cpu or cuda (see
    the module docstring); `precisions`: the AOTInductor precisions tried (a comma list or a
    sequence): on cuda (default bf16, fp16, fp32); on the CPU, given, the packages (fp32, bf16 on a
    native-bf16 CPU) gated, timed and served by python-torch there instead of the graph plan."""
    from fssam.bench.report import machine
    from fssam.device import resolve_device
    from fssam.export.aoti import check_target, parse_precisions
    from fssam.bench.served import concurrency_sweep, default_levels, payload_bytes
    from fssam.export.graph_plan import open_plan
    from fssam.model import build, get_config
    from fssam.runtime import cpu
    from fssam.runtime.parity import sample_episode
    from fssam.serving.client import RemoteFSSAM
    from fssam.serving.front import Front
    from fssam.serving.repository import PLAN, read_repository, write_repository
    from fssam.serving.server import TritonServer

    begin = time.perf_counter()
    target = resolve_device(device).type  # cuda without a GPU: one ConfigError line, before any work
    if precisions is not None:
        precisions = parse_precisions(precisions, "--precisions")
        check_target(precisions, target, "--precisions")  # fp16 on the CPU, bf16 on a CPU without it: one line
    elif target == "cuda":
        precisions = CUDA_PRECISIONS
    packages = bool(precisions)  # AOTInductor packages served by python-torch, not the CPU graph plan
    if runs < 1:
        raise InputError(f"--runs must be >= 1, got {runs}")
    if not budget_s > 0:
        raise InputError(f"--budget-s must be > 0, got {budget_s}")
    if cache_mb < 1:
        raise InputError(f"--cache-mb must be >= 1 for deploy (the support cache is part of what it measures), got {cache_mb}")
    if shots < 1:
        raise InputError(f"--shots must be >= 1, got {shots}")
    if calibration is not None and not os.path.isdir(calibration):
        raise InputError(f"calibration folder {calibration!r} does not exist")
    overrides = {key: value for key, value in overrides.items() if value is not None}
    get_config(config, **overrides)  # a bad config or option fails before any folder is made
    clients = tuple(clients or default_levels())
    out = check_output_folder(out, RESULT_FILE, json_with("format", DEPLOY_FORMAT, *OLDER_FORMATS), "--out",
                              (r"artifacts", r"repository", r"\.(artifacts|repository)\.partial-.*", re.escape(SERVER_LOG)))
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    artifacts, repository = os.path.join(out, "artifacts"), os.path.join(out, "repository")
    phases = {}
    try:
        _forget_earlier_run(out, repository)
        manifest = _export(config, artifacts, checkpoint, shots, seed, progress, calibration, threads, overrides,
                           target, precisions)
    except BaseException:
        if created and not os.listdir(out):  # a run that failed before writing anything leaves no --out
            os.rmdir(out)
        raise
    phases["export_and_plan_s"] = time.perf_counter() - begin
    weights = manifest["weights"]
    plan = plan_label(manifest)
    if packages:
        precision = manifest["aoti_plan"]["chosen"]
        backend, kind = "python-torch", REFERENCE[precision]
    else:
        phases["plan_s"] = manifest["graph_plan"]["wall_s"]
        precision, backend = None, PLAN
        kind = manifest["graph_plan"]["end_to_end"]["baseline"]  # the gate's reference of the chosen pair

    start = _step(2, f"model repository (ensemble fssam: validate -> support_encoder -> query_segmenter; {plan}) "
                     f"-> {repository}", progress)
    write_repository(artifacts, repository, backend=backend, **({"precision": precision} if precision else {}))
    phases["repository_s"] = time.perf_counter() - start

    start = _step(3, f"start tritonserver on 127.0.0.1 (free ports, response cache {cache_mb} MB) behind the front",
                  progress)
    server_log = os.path.join(out, SERVER_LOG)  # kept: what the served models said (a failed CUDA graph capture)
    server = TritonServer(repository, http_port=0, grpc_port=0, cache_mb=cache_mb, log_path=server_log)
    server.start()
    front = None
    try:
        front = Front(server.http_url, read_repository(repository), port=0).start()
        url = f"127.0.0.1:{front.port}"  # what clients reach: every served figure goes through the front
        phases["server_start_s"] = time.perf_counter() - start
        print(f"      ready in {phases['server_start_s']:.1f} s: the front {front.url} (tritonserver "
              f"{server.http_url} behind it)", flush=True)
        start = _step(4, "the gate's episode through the ensemble vs eager PyTorch; the response cache", progress)
        model = build(config, checkpoint=checkpoint, seed=seed, **overrides).to(target)
        if packages:
            from fssam.runtime import as_torch
            from fssam.runtime.runners.torch import TorchRunner

            pair = as_torch(TorchRunner(artifacts, precision=precision, device=target), device=target)  # no host trips
        else:
            pair = open_plan(artifacts, manifest, threads)
        episode = sample_episode(model.config, shots, batch=1, seed=seed + GATE_EPISODE_SEED)
        fresh = sample_episode(model.config, shots, batch=1, seed=seed + FRESH_EPISODE_SEED)
        with RemoteFSSAM(url, protocol="http") as remote:
            served, cache = check_cache(remote, episode)
            fresh_served = remote.infer(*fresh)
        end, failures, vs_inprocess, wiring = check_served(model, pair, kind, served, episode, fresh_served,
                                                           fresh, precision or "fp32")
        print(f"      logits max abs {end['max_abs']:.2e} (limit {end['limit']:.3g}), mask IoU {end['mask_iou']:.4f} "
              f"(min {end['min_iou']:.4f}) vs eager fp32: {'FAIL' if failures else 'PASS'}; vs the plan in process, "
              f"this episode and a fresh one: max abs {vs_inprocess['gate_episode']['max_abs']:.2e}, "
              f"{vs_inprocess['fresh_episode']['max_abs']:.2e} (limit {vs_inprocess['gate_episode']['limit']:.3g}): "
              f"{'FAIL' if wiring else 'PASS'}", flush=True)
        failures += wiring
        print(f"      same support set again: a response-cache hit on support_encoder (Triton statistics: "
              f"+{cache['hits']} hit, +{cache['misses']} miss), identical logits", flush=True)
        phases["checks_s"] = time.perf_counter() - start

        emulated = target == "cpu" and not cpu.native_bf16()
        start = _step(5, f"latency at concurrency 1 (interleaved; each mode until its median is stable, at least "
                         f"{runs} runs, at most {budget_s:g} s)", progress)
        # the checks ran the gate's episode served, in process and in eager fp32 (and eager bf16
        # autocast when a graph is reduced): those modes need no warm-up
        warm = (SERVED, INPROCESS, BASELINES[0]) + ((BASELINES[1],) if kind == "bf16_autocast" else ())
        if target == "cuda":
            warm = ()  # a GPU's first calls (kernel selection, allocator) are not its speed: each mode warms up
        latency = _latency(url, pair, model, episode, runs, budget_s, emulated, progress, warm, target)
        figures = _latency_figures(latency, emulated)
        _print_latency(figures, latency, plan, config, shots, target)
        phases["latency_s"] = time.perf_counter() - start

        start = _step(6, f"throughput at {', '.join(map(str, clients))} clients ({requests_per_client} requests each; "
                         "cached and new support sets)", progress)
        bar = tqdm(total=2 * len(clients), desc="throughput", unit="level", disable=not progress, leave=False)
        throughput = []
        if target == "cuda":  # untimed, each level once: the batch buckets' CUDA graphs captured before timing
            for level in clients:
                concurrency_sweep(url, episode, (level,), 1, cached=False, protocol="http")
        for cached in (True, False):
            for level in clients:
                throughput += concurrency_sweep(url, episode, (level,), requests_per_client, cached=cached,
                                                protocol="http")
                bar.update()
        bar.close()
        payload = payload_bytes(*episode)
        _print_throughput(throughput, payload)
        phases["throughput_s"] = time.perf_counter() - start
    finally:
        if front is not None:
            front.stop()
        server.stop()
    phases["total_s"] = time.perf_counter() - begin
    phases = {key: round(value, 1) for key, value in phases.items()}
    print(f"deployed {config} in {phases['total_s']:.0f} s: {repository} ({plan}; serve it with "
          f"`fssam serve --repository {repository}`); weights: {weights['source']}")
    if weights["source"].startswith("random"):
        print("note: random-init weights (no --checkpoint): the server's masks are not a trained model's predictions",
              file=sys.stderr)
    result = {
        "format": DEPLOY_FORMAT, "config": config, "shots": shots, "weights": weights["source"], "device": target,
        **({"plan": manifest["graph_plan"]["chosen"], "plan_candidates": manifest["graph_plan"]["candidates"],
            "plan_skipped": manifest["graph_plan"]["skipped"]} if not packages else
           {"plan": {"torch aoti": precision}, "plan_candidates": manifest["aoti_plan"]["candidates"],
            "aoti": {p: {k: v for k, v in e.items() if k != "graphs"} for p, e in manifest["aoti"].items()}}),
        "backend": backend, "precision": ("reduced" if kind != "fp32" else "fp32") if not packages else precision,
        "served": latency,
        "end_to_end": end, "passed": not failures, "served_vs_inprocess": vs_inprocess,
        "cache_check": cache, **figures, "throughput": throughput, "payload_bytes": payload,
        "phases": phases, "wall_s": phases["total_s"], "machine": machine(), "artifacts": artifacts,
        "repository": repository, "server_log": server_log,
    }
    write_json(os.path.join(out, RESULT_FILE), result)
    if failures:
        raise ServingError(f"served logits differ from eager PyTorch or the same plan in process: "
                           f"{'; '.join(failures)}")
    return result
