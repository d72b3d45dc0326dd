"""`fssam bench`: every mode on the same inputs in one run, reported as ratios to the two eager
baselines (fp32, and bf16 autocast), which always run. A mode this machine cannot run (OpenVINO
bf16 without native bf16, TensorRT without a GPU) is recorded as skipped, with the reason."""

from __future__ import annotations

import argparse
import os
import sys

import torch
from tqdm import tqdm

from fssam.bench.harness import StageMode, run_interleaved
from fssam.bench.report import BASELINES, machine, markdown, speedups, write
from fssam.errors import ConfigError, FSSAMError, InputError

MODES = ("eager_fp32", "eager_bf16", "compile", "onnxruntime", "openvino_fp32", "openvino_bf16", "openvino_int8",
         "tensorrt", "triton")
OPENVINO = {"openvino_fp32": "fp32", "openvino_bf16": "bf16", "openvino_int8": "int8"}  # mode: precision
CONCURRENCY = (1, 2, 4, 8)
DEFAULT_MODES = ("eager_fp32", "eager_bf16", "compile", "onnxruntime", "openvino_fp32", "openvino_bf16")
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


def _lacks(manifest: dict, modes) -> str | None:
    """What an export lacks that `modes` need (None: nothing), worded for an error message."""
    if "tensorrt" in modes and "tensorrt" not in manifest:
        return "no TensorRT engines, which the tensorrt mode needs: export it with --tensorrt on this GPU machine"
    if "openvino_int8" in modes and "int8" not in manifest.get("openvino", {}):
        return "no OpenVINO int8 plan, which the openvino_int8 mode needs: export it with `fssam export --openvino int8`"
    return None


def check_artifacts(args) -> None:
    """--artifacts has what the modes need (before any model is built)."""
    from fssam.export import load_manifest

    lack = _lacks(load_manifest(args.artifacts), args.mode_list) if args.artifacts else None
    if lack:
        raise InputError(f"--artifacts {args.artifacts!r} has {lack}, or leave --artifacts out")


def _export_options(args) -> dict:
    """TensorRT engines and the OpenVINO int8 plan, when a mode needs them."""
    options = {"tensorrt": "tensorrt" in args.mode_list}
    if "openvino_int8" in args.mode_list:
        options.update(openvino=("int8",), calibration=args.calibration, threads=args.threads)
    return options


def _artifacts_for(args, shots: int, progress: bool) -> str:
    """The export folder for `shots`: --artifacts when its manifest matches, else a fresh export
    (with what the modes need: TensorRT engines, the OpenVINO int8 plan)."""
    from fssam.export import export, load_manifest

    if args.artifacts:
        manifest = load_manifest(args.artifacts)
        if manifest["shots"] == shots and manifest["config"]["name"] == args.config:
            return args.artifacts
        if len(args.shot_list) == 1:
            raise InputError(
                f"--artifacts {args.artifacts!r} holds {manifest['config']['name']} {manifest['shots']}-shot graphs, "
                f"but the bench asks for {args.config} {shots}-shot"
            )
    folder = os.path.join(args.out, f"artifacts-{shots}shot")
    manifest_path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(manifest_path) or _lacks(load_manifest(folder, verify=False), args.mode_list):
        print(f"exporting {args.config} {shots}-shot to {folder} ...", file=sys.stderr)
        export(args.config, out=folder, checkpoint=args.checkpoint, shots=shots, seed=args.seed, progress=progress,
               **_export_options(args))
    return folder


def _runtime_mode(args, name: str, runtime: str, precision: str | None, shots: int, progress: bool) -> StageMode:
    """The export on ONNX Runtime or OpenVINO (CPU, --threads), torch tensors in and out."""
    from fssam.runtime import as_torch, open_runner

    runner = open_runner(runtime, _artifacts_for(args, shots, progress), precision=precision, threads=args.threads)
    return StageMode(name, as_torch(runner), runtime=runner.describe())


def _mode(args, model, name: str, shots: int, progress: bool):
    """Eager, autocast and compile run on args.device (the model is already there); ONNX Runtime
    and OpenVINO on the CPU; TensorRT on the GPU with CUDA tensors between stages; triton is client-side."""
    device = args.device_resolved
    if name == "eager_fp32":
        return StageMode(name, model, device=device)
    if name == "eager_bf16":
        return StageMode(name, model, context=lambda: torch.autocast(device.type, dtype=torch.bfloat16), device=device)
    if name == "compile":
        return StageMode(name, CompiledStages(model), device=device)
    if name == "onnxruntime":
        return _runtime_mode(args, name, "onnxruntime", None, shots, progress)
    if name in OPENVINO:
        return _runtime_mode(args, name, "openvino", OPENVINO[name], shots, progress)
    if name == "tensorrt":
        from fssam.runtime import open_runner

        runner = open_runner("tensorrt", _artifacts_for(args, shots, progress))
        return StageMode(name, runner, device="cuda", runtime=runner.describe())
    return _triton_mode(args, shots, progress)


def _machine_checks() -> dict:
    """{mode: check}: the modes a machine may lack, each with its runtime's own check (raises, saying why)."""
    from fssam.runtime.runners.openvino import require_native_bf16
    from fssam.runtime.runners.tensorrt import require_tensorrt

    return {"openvino_bf16": require_native_bf16, "tensorrt": require_tensorrt}


def _unavailable(modes) -> dict:
    """{mode: reason} for those of `modes` this machine cannot run."""
    skipped = {}
    for name, check in _machine_checks().items():
        if name in modes:
            try:
                check()
            except FSSAMError as error:
                skipped[name] = str(error)
    return skipped


def plan_modes(args) -> None:
    """args.mode_list: the baselines (added when missing) and the asked modes this machine can run;
    args.skipped: {mode: reason} for the others. Fails when none of the asked modes can run."""
    asked = list(dict.fromkeys(args.mode_list))
    unknown = [m for m in asked if m not in MODES]
    if unknown:
        raise ConfigError(f"unknown bench mode(s) {', '.join(unknown)}: expected some of {', '.join(MODES)}")
    if args.calibration and "openvino_int8" not in asked:
        raise ConfigError("--calibration is for the export of the openvino_int8 mode: add openvino_int8 to --modes")
    args.skipped = _unavailable(asked)
    if len(args.skipped) == len(asked):
        raise ConfigError("no asked bench mode can run on this machine: "
                          + "; ".join(f"{name}: {reason}" for name, reason in args.skipped.items()))
    for name, reason in args.skipped.items():
        print(f"bench: skipping {name}: {reason}", file=sys.stderr)
    missing = [m for m in BASELINES.values() if m not in asked]
    if missing:
        print(f"bench: adding the baseline mode(s) {', '.join(missing)}: every mode is reported as a ratio to "
              "eager fp32 and to eager bf16 autocast", file=sys.stderr)
    args.mode_list = [*BASELINES.values(), *(m for m in asked if m not in BASELINES.values() and m not in args.skipped)]


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

    from fssam.device import resolve_device

    plan_modes(args)
    check_artifacts(args)

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
        "threads": args.threads,  # ONNX Runtime and OpenVINO (None: the runtime's default)
        "machine": machine(),
        "runs": {},
    }
    args.servers = []
    try:
        for shots in args.shot_list:
            modes = [_mode(args, model, name, shots, progress) for name in args.mode_list]
            inputs = sample_episode(model.config, shots, batch=1, seed=args.seed + 100)
            bar = tqdm(total=(args.warmup + args.iterations) * len(modes), desc=f"bench {shots}-shot", disable=not progress)
            runs = {"modes": run_interleaved(modes, inputs, args.iterations, args.warmup, progress=bar)}
            bar.close()
            runs["speedups"] = speedups(runs["modes"])
            runs["skipped"] = dict(args.skipped)
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected an integer >= 1")
    return value


def register(sub) -> None:
    bench = sub.add_parser("bench", help="latency/throughput of eager, compiled and exported modes on the same inputs")
    bench.add_argument("--config", default=PARSER_DEFAULTS["config"])
    bench.add_argument("--checkpoint", action="append")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="where eager, eager_bf16 and compile run (auto: cuda when available)")
    bench.add_argument("--artifacts", help="an export folder to reuse (its config and shots must match)")
    bench.add_argument("--url", help="triton mode: a running fssam server (host:gRPC-port); default: start one")
    bench.add_argument("--modes", default=PARSER_DEFAULTS["modes"],
                       help=f"comma list of {', '.join(MODES)} (eager_fp32 and eager_bf16, the baselines, always run)")
    bench.add_argument("--calibration", metavar="DIR",
                       help="openvino_int8: calibration images for the int8 export the bench makes (default: the export's)")
    bench.add_argument("--threads", type=_positive_int, metavar="N",
                       help="threads of the ONNX Runtime and OpenVINO modes (default: the runtime's own)")
    bench.add_argument("--shots", default=PARSER_DEFAULTS["shots"], help="comma list, e.g. 1,5")
    bench.add_argument("--iterations", type=int, default=PARSER_DEFAULTS["iterations"], help="timed runs per mode")
    bench.add_argument("--warmup", type=int, default=PARSER_DEFAULTS["warmup"])
    bench.add_argument("--quick", action="store_true", help="tiny config, 3 runs: checks the pipeline, not the timings")
    bench.add_argument("--out", required=True, help="results folder (JSON, markdown, PNG plots)")
    bench.add_argument("--no-progress", action="store_true")
    bench.set_defaults(func=cmd_bench)
