"""`fssam bench`: every mode on the same inputs in one run, reported as ratios to eager fp32."""

from __future__ import annotations

import os
import sys

import torch
from tqdm import tqdm

from fssam.bench.harness import StageMode, run_interleaved
from fssam.bench.report import machine, markdown, write
from fssam.errors import ConfigError, InputError

MODES = ("eager_fp32", "eager_bf16", "compile", "onnxruntime", "tensorrt", "triton")
CONCURRENCY = (1, 2, 4, 8)
DEFAULT_MODES = ("eager_fp32", "eager_bf16", "compile", "onnxruntime")
QUICK = {"config": "tiny", "iterations": 3, "warmup": 1, "shots": "1", "modes": "eager_fp32,eager_bf16,onnxruntime"}


class CompiledStages:
    """torch.compile of each stage method of the eager model (compiled on first use)."""

    def __init__(self, model):
        from fssam.runtime.contract import STAGE_ORDER

        self._compiled = {name: torch.compile(getattr(model, name), dynamic=False) for name in STAGE_ORDER}

    def __getattr__(self, name):
        try:
            return self._compiled[name]
        except KeyError:
            raise AttributeError(name) from None


def _artifacts_for(args, shots: int, progress: bool) -> str:
    """The export folder for `shots`: --artifacts when its manifest matches, else a fresh export
    (with TensorRT engines when the tensorrt mode is asked for)."""
    from fssam.export import export, load_manifest

    engines = "tensorrt" in args.mode_list
    if args.artifacts:
        manifest = load_manifest(args.artifacts)
        if engines and "tensorrt" not in manifest:
            raise InputError(f"--artifacts {args.artifacts!r} has no TensorRT engines, which the tensorrt mode needs: "
                             "export it with --tensorrt on this GPU machine, or leave --artifacts out")
        if manifest["shots"] == shots and manifest["config"]["name"] == args.config:
            return args.artifacts
        if len(args.shot_list) == 1:
            raise InputError(
                f"--artifacts {args.artifacts!r} holds {manifest['config']['name']} {manifest['shots']}-shot graphs, "
                f"but the bench asks for {args.config} {shots}-shot"
            )
    folder = os.path.join(args.out, f"artifacts-{shots}shot")
    manifest_path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(manifest_path) or (engines and "tensorrt" not in load_manifest(folder, verify=False)):
        print(f"exporting {args.config} {shots}-shot to {folder} ...", file=sys.stderr)
        export(args.config, out=folder, checkpoint=args.checkpoint, shots=shots, seed=args.seed, progress=progress,
               tensorrt=engines)
    return folder


def _modes(args, model, shots: int, progress: bool):
    """Eager, autocast and compile run on args.device (the model is already there); ONNX Runtime
    on its CPU provider; TensorRT on the GPU with CUDA tensors between stages; triton is client-side."""
    device = args.device_resolved
    modes = []
    for name in args.mode_list:
        if name == "eager_fp32":
            modes.append(StageMode(name, model, device=device))
        elif name == "eager_bf16":
            modes.append(StageMode(name, model, context=lambda: torch.autocast(device.type, dtype=torch.bfloat16),
                                   device=device))
        elif name == "compile":
            modes.append(StageMode(name, CompiledStages(model), device=device))
        elif name == "onnxruntime":
            from fssam.runtime import as_torch, open_runner

            modes.append(StageMode(name, as_torch(open_runner("onnxruntime", _artifacts_for(args, shots, progress)))))
        elif name == "triton":
            modes.append(_triton_mode(args, shots, progress))
        elif name == "tensorrt":
            from fssam.runtime import open_runner

            modes.append(StageMode(name, open_runner("tensorrt", _artifacts_for(args, shots, progress)), device="cuda"))
    return modes


class _Served:
    """A served pipeline as a bench mode: `cache=False` sends a support set the server has not
    seen (a tiny perturbation of the images), `cache=True` repeats the cached one."""

    def __init__(self, url: str):
        from fssam.serving.client import RemoteFSSAM

        self.url = url
        self.remote = RemoteFSSAM(url)
        self.calls = 0

    def __call__(self, query, supports, masks, cache: bool):
        if not cache:
            self.calls += 1
            supports = supports + self.calls * 1e-3
        self.remote.infer(query, supports, masks)


def _triton_mode(args, shots: int, progress: bool):
    from fssam.bench.harness import EpisodeMode

    if args.url:
        served = _Served(args.url)
    else:
        from fssam.serving.repository import write_repository
        from fssam.serving.server import TritonServer

        repository = os.path.join(args.out, f"repository-{shots}shot")
        write_repository(_artifacts_for(args, shots, progress), repository, stage_backend="python-ort")
        server = TritonServer(repository, http_port=0, grpc_port=0, log_path=os.path.join(args.out, f"tritonserver-{shots}shot.log"))
        server.start(timeout=600)
        args.servers.append(server)
        served = _Served(server.grpc_url)
    mode = EpisodeMode("triton", served)
    mode.url = served.url
    return mode


def concurrency_sweep(url: str, inputs, levels=CONCURRENCY, requests_per_client: int = 5) -> list[dict]:
    """Client-measured throughput with C clients sending cached-support requests at once."""
    import statistics
    import threading
    import time

    from fssam.serving.client import RemoteFSSAM

    rows = []
    for level in levels:
        latencies, failures, lock = [], [0], threading.Lock()

        def client():
            with RemoteFSSAM(url) as remote:
                for _ in range(requests_per_client):
                    start = time.perf_counter()
                    try:
                        remote.infer(*inputs)
                    except Exception:
                        with lock:
                            failures[0] += 1
                        continue
                    with lock:
                        latencies.append(time.perf_counter() - start)

        threads = [threading.Thread(target=client) for _ in range(level)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        rows.append({
            "concurrency": level,
            "requests": level * requests_per_client,
            "failures": failures[0],
            "median_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
            "throughput": len(latencies) / wall,
        })
    return rows


def run_bench(args) -> dict:
    from fssam.runtime.parity import sample_episode
    from fssam.model import build, describe_weights

    unknown = [m for m in args.mode_list if m not in MODES]
    if unknown:
        raise ConfigError(f"unknown bench mode(s) {', '.join(unknown)}: expected some of {', '.join(MODES)}")
    if "tensorrt" in args.mode_list:
        from fssam.export.tensorrt import require_tensorrt

        require_tensorrt()
    from fssam.device import resolve_device

    args.device_resolved = resolve_device(args.device)
    progress = not args.no_progress
    os.makedirs(args.out, exist_ok=True)
    model = build(args.config, checkpoint=args.checkpoint, seed=args.seed).to(args.device_resolved)
    result = {
        "config": args.config,
        "device": str(args.device_resolved),
        "weights": describe_weights(model),
        "iterations": args.iterations,
        "warmup": args.warmup,
        "machine": machine(),
        "runs": {},
    }
    args.servers = []
    try:
        for shots in args.shot_list:
            modes = _modes(args, model, shots, progress)
            inputs = sample_episode(model.config, shots, batch=1, seed=args.seed + 100)
            bar = tqdm(total=(args.warmup + args.iterations) * len(modes), desc=f"bench {shots}-shot", disable=not progress)
            runs = {"modes": run_interleaved(modes, inputs, args.iterations, args.warmup, progress=bar)}
            bar.close()
            served = [m for m in modes if m.name == "triton"]
            if served:
                runs["concurrency"] = concurrency_sweep(served[0].url, inputs)
            result["runs"][str(shots)] = runs
    finally:
        for server in args.servers:
            server.stop()
    files = write(result, args.out)
    result["files"] = files
    return result


def cmd_bench(args) -> int:
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == PARSER_DEFAULTS[key]:
                setattr(args, key, value)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.shot_list = [int(k) for k in str(args.shots).split(",")]
    result = run_bench(args)
    print(markdown(result))
    print(f"wrote {result['files']['json']}, {result['files']['markdown']} and {len(result['files']['plots'])} plots")
    return 0


PARSER_DEFAULTS = {"config": "small", "iterations": 10, "warmup": 2, "shots": "1,5", "modes": ",".join(DEFAULT_MODES)}


def register(sub) -> None:
    bench = sub.add_parser("bench", help="latency/throughput of eager, compiled and exported modes on the same inputs")
    bench.add_argument("--config", default=PARSER_DEFAULTS["config"])
    bench.add_argument("--checkpoint", action="append")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="where eager, eager_bf16 and compile run (auto: cuda when available)")
    bench.add_argument("--artifacts", help="an export folder to reuse (its config and shots must match)")
    bench.add_argument("--url", help="triton mode: a running fssam server (host:gRPC-port); default: start one")
    bench.add_argument("--modes", default=PARSER_DEFAULTS["modes"], help=f"comma list of {', '.join(MODES)}")
    bench.add_argument("--shots", default=PARSER_DEFAULTS["shots"], help="comma list, e.g. 1,5")
    bench.add_argument("--iterations", type=int, default=PARSER_DEFAULTS["iterations"], help="timed runs per mode")
    bench.add_argument("--warmup", type=int, default=PARSER_DEFAULTS["warmup"])
    bench.add_argument("--quick", action="store_true", help="tiny config, 3 runs: checks the pipeline, not the timings")
    bench.add_argument("--out", required=True, help="results folder (JSON, markdown, PNG plots)")
    bench.add_argument("--no-progress", action="store_true")
    bench.set_defaults(func=cmd_bench)
