"""The bench behind `fssam bench`: every mode on the same inputs in one run, reported as ratios to
the two eager baselines (fp32, and bf16 autocast), which always run. A mode this machine cannot run
(OpenVINO bf16 without native bf16, TensorRT without a GPU) is recorded as skipped, with the reason.

Most modes run the six stages; the graph modes (GRAPH_MODES) run the two deployable graphs of the
export's graph plan (`fssam export --plan`, fssam.export.graph_plan), as a server does: `plan` the
graphs it chose (each on its runtime and precision), `onnxruntime_int8` / `openvino_int8_graphs`
its ONNX Runtime / OpenVINO int8 graphs, `onnxruntime_int8_static` its ONNX Runtime static QDQ int8
graphs (a candidate of `fssam export --plan`, not of deploy's bounded plan). An int8 graph the plan did not keep (it failed its gate,
or was not gated, slower than a candidate that passed) skips its mode, with the reason (known once
the export is made or read).

`run_bench(args)` takes the parsed `fssam bench` options (fssam.commands.bench)."""

from __future__ import annotations

import os
import sys

import torch
from tqdm import tqdm

from fssam.bench import checks
from fssam.bench.harness import GraphMode, StageMode, run_interleaved
from fssam.bench.report import BASELINES, RESULTS_FORMAT, check_results_folder, machine, speedups, write
from fssam.errors import ConfigError, FSSAMError, InputError
from fssam.runtime.runner import default_baseline

MODES = ("eager_fp32", "eager_bf16", "compile", "onnxruntime", "openvino_fp32", "openvino_bf16", "openvino_int8",
         "tensorrt", "triton", "plan", "onnxruntime_int8", "onnxruntime_int8_static", "openvino_int8_graphs")
OPENVINO = {"openvino_fp32": "fp32", "openvino_bf16": "bf16", "openvino_int8": "int8"}  # mode: precision
# the modes over the two deployable graphs of the export's graph plan: mode -> the plan's int8 candidate
# (runtime, precision) whose graphs it runs (None: the plan's choice)
GRAPH_MODES = {"plan": None, "onnxruntime_int8": ("onnxruntime", "int8"),
               "onnxruntime_int8_static": ("onnxruntime", "int8-static"), "openvino_int8_graphs": ("openvino", "int8")}
STAGE_MODES = ("onnxruntime", *OPENVINO, "tensorrt")  # the modes that run the export's stage files
INT8_MODES = ("openvino_int8", *GRAPH_MODES)  # the modes whose export quantizes to int8 (--calibration)
DEFAULT_MODES = ("eager_fp32", "eager_bf16", "compile", "onnxruntime", "openvino_fp32", "openvino_bf16")
OVERRIDES = ("num_refine", "refine_version", "scma_mode")  # config overrides of fssam.model.build / export


class Unavailable(FSSAMError):
    """A mode the export made or given cannot run (e.g. an int8 graph that failed the plan's gate): skipped."""


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


def _model_options(args) -> dict:
    """The model options of the bench (but the config) as keywords of `fssam.model.build` / `export`."""
    return {"checkpoint": args.checkpoint, "seed": args.seed, **{key: getattr(args, key, None) for key in OVERRIDES}}


def _overrides(args) -> dict:
    """The config overrides asked for (--num-refine, ...): an export reused must carry the same."""
    return {key: getattr(args, key, None) for key in OVERRIDES if getattr(args, key, None) is not None}


def _carries(manifest: dict, args) -> bool:
    return all(manifest["config"].get(key) == value for key, value in _overrides(args).items())


def _settings(config: dict, keys) -> str:
    return "".join(f", {key} {config.get(key)}" for key in keys)


def _lacks(manifest: dict, modes) -> str | None:
    """What an export lacks that `modes` need (None: nothing), worded for an error message."""
    if "tensorrt" in modes and "tensorrt" not in manifest:
        return "no TensorRT engines, which the tensorrt mode needs: export it with --tensorrt on this GPU machine"
    staged = [mode for mode in STAGE_MODES if mode in modes]
    if staged and not manifest.get("stages"):
        return (f"no stage files (only the deployable graphs, as `fssam deploy` exports them), which the {staged[0]} "
                f"mode needs: export it with `fssam export`")
    planned = [mode for mode in GRAPH_MODES if mode in modes]
    if planned and "graph_plan" not in manifest:
        return (f"no graph plan, which the {planned[0]} mode needs: export it with `fssam export --plan` "
                f"(or `fssam deploy`)")
    for mode, precision in (("openvino_bf16", "bf16"), ("openvino_int8", "int8")):
        if mode in modes and precision not in manifest.get("openvino", {}):
            return (f"no OpenVINO {precision} plan, which the {mode} mode needs: export it with "
                    f"`fssam export --openvino {precision}`")
    return None


def check_artifacts(args) -> None:
    """--artifacts has what the modes need, and fits the one shot count asked (before any model is
    built or --out made)."""
    from fssam.export import load_manifest

    if not args.artifacts:
        return
    manifest = load_manifest(args.artifacts)
    lack = _lacks(manifest, args.mode_list)
    if lack:
        raise InputError(f"--artifacts {args.artifacts!r} has {lack}, or leave --artifacts out")
    if len(args.shot_list) == 1 and not _fits(manifest, args, args.shot_list[0]):
        raise _misfit(args, manifest, args.shot_list[0])


def _fits(manifest: dict, args, shots: int) -> bool:
    """Whether an export is the one the bench asks for at `shots` (config, shots, overrides)."""
    return manifest["shots"] == shots and manifest["config"]["name"] == args.config and _carries(manifest, args)


def _misfit(args, manifest: dict, shots: int) -> InputError:
    asked = _overrides(args)
    return InputError(
        f"--artifacts {args.artifacts!r} holds {manifest['config']['name']} {manifest['shots']}-shot graphs"
        f"{_settings(manifest['config'], asked)}, but the bench asks for {args.config} {shots}-shot"
        f"{_settings(asked, asked)}"
    )


def _export_options(args) -> dict:
    """TensorRT engines, the OpenVINO bf16 / int8 plans and the graph plan, when a mode needs them;
    the stage files only when a mode runs them (the graph modes and triton run the two graphs)."""
    options = {"tensorrt": "tensorrt" in args.mode_list}
    plans = tuple(precision for mode, precision in OPENVINO.items() if precision != "fp32" and mode in args.mode_list)
    if plans:
        options.update(openvino=plans, threads=args.threads)
    if any(mode in args.mode_list for mode in GRAPH_MODES):
        options.update(plan=True, threads=args.threads)
    if any(mode in args.mode_list for mode in INT8_MODES):
        options.update(calibration=args.calibration)
    if not any(mode in args.mode_list for mode in STAGE_MODES):
        options.update(stages=False)
    return options


def _artifacts_for(args, shots: int, progress: bool) -> str:
    """The export folder for `shots`: --artifacts when its manifest matches, else a fresh export
    (with what the modes need: TensorRT engines, the OpenVINO bf16 and int8 plans, the graph plan)."""
    from fssam.export import export, load_manifest

    if args.artifacts:
        manifest = load_manifest(args.artifacts)
        if _fits(manifest, args, shots):
            return args.artifacts
        if len(args.shot_list) == 1:
            raise _misfit(args, manifest, shots)
    folder = os.path.join(args.out, f"artifacts-{shots}shot")
    manifest_path = os.path.join(folder, "manifest.json")
    cached = load_manifest(folder, verify=False) if os.path.isfile(manifest_path) else None
    if cached is None or _lacks(cached, args.mode_list) or not _carries(cached, args):
        print(f"exporting {args.config} {shots}-shot to {folder} ...", file=sys.stderr)
        export(args.config, out=folder, shots=shots, progress=progress, **_model_options(args),
               **_export_options(args))
    return folder


def _runtime_mode(args, name: str, runtime: str, precision: str | None, shots: int, progress: bool) -> StageMode:
    """The export on OpenVINO (CPU, --threads) or ONNX Runtime, torch tensors in and out. ONNX
    Runtime runs where --device does: on a GPU its CUDA provider (and TensorRT provider, where this
    onnxruntime has it) with IO binding, tensors staying on the device; on the CPU its CPU provider.
    The providers that ran are reported with the mode (`report`)."""
    from fssam.runtime import as_torch, open_runner

    options = {"device": str(args.device_resolved)} if runtime == "onnxruntime" else {}
    runner = open_runner(runtime, _artifacts_for(args, shots, progress), precision=precision, threads=args.threads,
                         **options)
    device = "cuda" if getattr(runner, "io_binding", False) else "cpu"
    if getattr(runner, "note", None):
        print(f"bench: {name}: {runner.note}", file=sys.stderr)
    mode = _checked(StageMode(name, as_torch(runner, device), device=device, runtime=runner.describe()), runner)
    if runtime == "onnxruntime":
        mode.report = lambda: {"runtime": runner.describe(), "providers": runner.providers_used(),
                               "io_binding": runner.io_binding}
    return mode


def _plan_description(chosen: dict) -> str:
    return "graph plan: " + "; ".join(f"{name} {entry['runtime']} {entry['precision']}" for name, entry in chosen.items())


def _not_passed(plan: dict, runtime: str, graph: str, precision: str = "int8") -> str:
    """Why the graph plan has no `runtime` `precision` `graph` (its record in the plan, worded)."""
    from fssam.export.graph_plan import label

    entry = plan.get("candidates", {}).get(graph, {}).get(label(runtime, precision))
    if entry is None:
        why = plan.get("skipped", {}).get(label(runtime, precision))
        return f"{graph}: " + (f"skipped by the plan: {why}" if why else "not a candidate of this export's graph plan")
    if not entry.get("gated", True) or entry.get("within_limits") is None:  # slower than one that passed
        why = entry.get("note") or "not gated"
    elif entry["within_limits"]:
        why = f"within its limits but outside the selection margin (worst {entry['worst']:.2f} of the limit)"
    else:
        why = "over its limits: " + "; ".join(entry.get("failures", [])[:1])
    tried = ", ".join(attempt["fallback"] for attempt in entry.get("attempts", []))
    return f"{graph}: {why}" + (f" (tried: {tried})" if tried else "")


def _graph_mode(args, name: str, shots: int, progress: bool) -> GraphMode:
    """A mode over the two deployable graphs of the export's graph plan, on the CPU: the plan's
    choice, or one runtime's int8 graphs (Unavailable where a graph's int8 did not pass the plan's
    gate). The output check's rule: eager bf16 autocast's limits as soon as a graph runs below fp32."""
    from fssam.export import load_manifest
    from fssam.export.graph_plan import RANK, GraphPair, baseline, label, open_candidate, open_plan
    from fssam.runtime import as_torch, open_runner
    from fssam.runtime.contract import GRAPH_ORDER
    from fssam.runtime.manifest import int8_graph_files

    artifacts = _artifacts_for(args, shots, progress)
    manifest = load_manifest(artifacts)
    plan = manifest["graph_plan"]
    candidate = GRAPH_MODES[name]
    runtime, precision = candidate or (None, None)
    if candidate is None:
        precisions = [entry["precision"] for entry in plan["chosen"].values()]
        mode = GraphMode(name, open_plan(artifacts, manifest, args.threads), runtime=_plan_description(plan["chosen"]))
    elif precision != "int8":  # a candidate of its own files (ONNX Runtime static QDQ), run as the plan runs it
        entries = {graph: plan.get("candidates", {}).get(graph, {}).get(label(*candidate)) for graph in GRAPH_ORDER}
        missing = [graph for graph, entry in entries.items() if not (entry and entry.get("passed"))]
        if missing:
            raise Unavailable(f"the graph plan of {artifacts} kept no {label(*candidate)} {' or '.join(missing)} "
                              "(it keeps the int8 graphs that passed their gate): "
                              + "; ".join(_not_passed(plan, runtime, graph, precision) for graph in missing))
        pair = GraphPair({graph: open_candidate(artifacts, runtime, precision, {graph: entry["file"]}, args.threads)
                          for graph, entry in entries.items()})
        precisions = [precision] * len(GRAPH_ORDER)
        mode = GraphMode(name, pair, runtime=f"{label(*candidate)} (the graph plan's: "
                         + "; ".join(f"{graph} {entry['fallback']}" for graph, entry in entries.items()) + ")")
    else:
        kept = int8_graph_files(manifest, runtime)
        missing = [graph for graph in GRAPH_ORDER if graph not in kept]
        if missing:
            raise Unavailable(f"the graph plan of {artifacts} kept no {runtime} int8 {' or '.join(missing)} "
                              "(it keeps the int8 graphs that passed their gate): "
                              + "; ".join(_not_passed(plan, runtime, graph) for graph in missing))
        runner = as_torch(open_runner(runtime, artifacts, precision="int8", threads=args.threads))
        candidates = {graph: plan["candidates"][graph][f"{runtime} int8"] for graph in GRAPH_ORDER}
        precisions = ["int8"] * len(GRAPH_ORDER)
        mode = GraphMode(name, runner, runtime=f"{runner.describe()}, the graph plan's int8 graphs: "
                         + "; ".join(f"{graph} {entry['fallback']}" for graph, entry in candidates.items()))
    mode.baseline = baseline(precisions)
    mode.export_precision = max(precisions, key=RANK.get)
    return mode


def _checked(mode: StageMode, runner) -> StageMode:
    """The output check's rule of a runtime mode: its runner's own gate reference (fssam.bench.checks)."""
    mode.baseline, mode.export_precision = runner.baseline, runner.precision
    return mode


def _mode(args, model, name: str, shots: int, progress: bool):
    """Eager, autocast and compile run on args.device (the model is already there); ONNX Runtime
    and OpenVINO on the CPU; the graph modes on the CPU, as the plan gated them; TensorRT on the GPU
    with CUDA tensors between stages; triton is client-side."""
    from fssam.runtime.parity import ieee_fp32

    device = args.device_resolved
    if name == "eager_fp32":  # IEEE fp32: no TF32 on a GPU, as the exports' fp32 gate
        return StageMode(name, model, context=ieee_fp32, device=device)
    if name == "eager_bf16":
        return StageMode(name, model, context=lambda: torch.autocast(device.type, dtype=torch.bfloat16), device=device)
    if name == "compile":
        mode = StageMode(name, CompiledStages(model), context=ieee_fp32, device=device)
        mode.baseline, mode.export_precision = "fp32", "fp32"  # the eager fp32 modules, compiled
        return mode
    if name == "onnxruntime":
        return _runtime_mode(args, name, "onnxruntime", None, shots, progress)
    if name in OPENVINO:
        return _runtime_mode(args, name, "openvino", OPENVINO[name], shots, progress)
    if name in GRAPH_MODES:
        return _graph_mode(args, name, shots, progress)
    if name == "tensorrt":
        from fssam.runtime import open_runner

        runner = open_runner("tensorrt", _artifacts_for(args, shots, progress))
        return _checked(StageMode(name, runner, device="cuda", runtime=runner.describe()), runner)
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
    if not asked:
        raise ConfigError(f"--modes {getattr(args, 'modes', '')!r} names no mode: expected a comma list of some of "
                          f"{', '.join(MODES)}")
    unknown = [m for m in asked if m not in MODES]
    if unknown:
        raise ConfigError(f"unknown bench mode(s) {', '.join(unknown)}: expected some of {', '.join(MODES)}")
    if args.calibration and not any(mode in asked for mode in INT8_MODES):
        raise ConfigError(f"--calibration is for the int8 export of the {', '.join(INT8_MODES)} modes: "
                          "add one of them to --modes")
    args.asked = asked
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


def _triton_mode(args, shots: int, progress: bool):
    from fssam.bench.harness import EpisodeMode

    from fssam.bench.served import Served
    from fssam.serving import DEFAULT_CACHE_MB

    precision = None
    if args.url:
        served = Served(args.url, protocol=getattr(args, "protocol", "http"))
    else:
        from fssam.serving.repository import write_repository
        from fssam.serving.server import TritonServer

        repository = os.path.join(args.out, f"repository-{shots}shot")
        precision = write_repository(_artifacts_for(args, shots, progress), repository,
                                     backend="python-ort")["export_precision"]
        server = TritonServer(repository, http_port=0, grpc_port=0, cache_mb=DEFAULT_CACHE_MB,
                              log_path=os.path.join(args.out, f"tritonserver-{shots}shot.log"))
        server.start(timeout=600)
        args.servers.append(server)
        served = Served(server.grpc_url)
    mode = EpisodeMode("triton", served)
    mode.url, mode.protocol = served.url, served.protocol
    if precision is None:
        mode.unchecked = "a server given by --url runs what it was set up with, which the bench does not know"
    else:
        mode.baseline, mode.export_precision = default_baseline(precision), precision
    return mode


def run_bench(args) -> dict:
    """Check every option (modes, artifacts, config, device, --out) before --out is made, then run the
    bench; a failed run removes the --out folder it made while that is still empty."""
    from fssam.device import resolve_device
    from fssam.model import get_config

    plan_modes(args)
    check_artifacts(args)
    get_config(args.config, **{key: getattr(args, key, None) for key in OVERRIDES})  # before --out is made
    args.device_resolved = resolve_device(args.device)
    made = _missing_folders(args.out)
    check_results_folder(args.out)
    os.makedirs(args.out, exist_ok=True)
    try:
        return _bench(args)
    except BaseException:
        _remove_empty(made)  # a failed run leaves no empty --out (nor the parents it made) behind
        raise


def _missing_folders(folder: str) -> list[str]:
    """`folder` and those of its parents that do not exist yet, deepest first: what this run makes."""
    missing, path = [], os.path.abspath(folder)
    while not os.path.lexists(path) and path != os.path.dirname(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _remove_empty(folders: list[str]) -> None:
    """Remove the folders this run made, deepest first, as long as they are empty (rmdir: never their content)."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


def _modes(args, model, shots: int, progress: bool) -> tuple[list, dict]:
    """(the modes of a `shots`-shot run, {mode: why skipped}): the machine's skips, and the modes
    the export cannot run (Unavailable). Fails when none of the asked modes is left."""
    modes, skipped = [], dict(args.skipped)
    for name in args.mode_list:
        try:
            modes.append(_mode(args, model, name, shots, progress))
        except Unavailable as why:
            skipped[name] = str(why)
            print(f"bench: {shots}-shot: skipping {name}: {why}", file=sys.stderr)
    if not any(mode.name in getattr(args, "asked", args.mode_list) for mode in modes):
        raise ConfigError(f"no asked bench mode can run {shots}-shot: "
                          + "; ".join(f"{name}: {reason}" for name, reason in skipped.items()))
    return modes, skipped


def _bench(args) -> dict:
    """Every shot count on every mode, into the checked --out folder; the results written there."""
    from fssam.runtime.parity import sample_episode
    from fssam.model import build, describe_weights

    progress = not args.no_progress
    model = build(args.config, **_model_options(args)).to(args.device_resolved)
    result = {
        "format": RESULTS_FORMAT,
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
            modes, skipped = _modes(args, model, shots, progress)
            inputs = sample_episode(model.config, shots, batch=1, seed=args.seed + 100)
            bar = tqdm(total=(args.warmup + args.iterations) * len(modes), desc=f"bench {shots}-shot", disable=not progress)
            runs = {"modes": run_interleaved(modes, inputs, args.iterations, args.warmup, progress=bar)}
            bar.close()
            for mode in modes:  # what ran, known once the sessions are open (e.g. ONNX Runtime's providers)
                if getattr(mode, "report", None) is not None:
                    runs["modes"][mode.name].update(mode.report())
            checked = checks.check_modes(modes, model, inputs)
            for name, check in checked.items():
                runs["modes"][name]["check"] = check
            failed = {name: check for name, check in checked.items() if check["passed"] is False}
            if failed:
                print(f"bench: {shots}-shot: " + checks.describe(failed), file=sys.stderr)
                result.setdefault("failed_checks", []).extend(f"{name} ({shots}-shot)" for name in failed)
            runs["speedups"] = speedups(runs["modes"])
            runs["skipped"] = skipped
            served = [m for m in modes if m.name == "triton"]
            if served:
                from fssam.bench.served import concurrency_sweep

                url, protocol = served[0].url, served[0].protocol
                runs["concurrency"] = (concurrency_sweep(url, inputs, cached=True, protocol=protocol)
                                       + concurrency_sweep(url, inputs, cached=False, protocol=protocol))
            result["runs"][str(shots)] = runs
    finally:
        for server in args.servers:
            server.stop()
    files = write(result, args.out)
    result["files"] = files
    return result
