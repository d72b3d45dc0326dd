"""AOTInductor packages of the two deployable graphs (`fssam export --aoti fp32[,bf16,fp16] --device`).

The same eager modules as the ONNX graphs (fssam.export.stages), through `torch.export` and
`torch._inductor.aoti_compile_and_package`, one `.pt2` per graph and precision under
aoti/<precision>/<device>/. Precisions: fp32 (IEEE: no TF32); bf16, the fp32 model under bf16
autocast as the official test runs it (CPU: only where the CPU has native bf16); fp16, the model
in fp16 (CUDA only). CPU packages take a dynamic batch (1 .. the export's limit); CUDA packages are
static per batch bucket (1, 2, 4, 8 episodes, up to the export's limit) and compiled with
max-autotune, so the runner can replay each from a CUDA graph. Each precision is gated like every
export (fssam.runtime.parity against eager fp32; bf16 within 2x eager bf16 autocast's error, fp16
within 2x eager fp16's) and recorded in manifest["aoti"][precision] with the torch version, the
device (and GPU) that built it: a package loads only there (fssam.runtime.runners.torch).
"""

from __future__ import annotations

import copy
import os
import shutil
import time

import torch

from fssam.errors import ConfigError, first_line
from fssam.export.stages import STAGE_MODULES, BF16Autocast, batch_dynamic_shapes
from fssam.runtime.contract import BATCH, GRAPH_ORDER
from fssam.runtime.manifest import file_sha256, write_manifest

PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda")
FOLDER = "aoti"
CUDA_BUCKETS = (1, 2, 4, 8)  # episodes per call of the static CUDA packages
EXAMPLE_BATCH = 2  # CPU: tracing at batch 1 would specialise the dynamic batch


def parse_precisions(text, flag: str = "--aoti") -> tuple:
    items = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    bad = [p for p in items if p not in PRECISIONS]
    if bad or not items:
        shown = ",".join(items) or repr(text)
        raise ConfigError(f"{flag} {shown}: expected a comma list of {', '.join(PRECISIONS)}")
    return tuple(dict.fromkeys(items))


def check_target(precisions, device: str, flag: str = "--aoti") -> None:
    """ConfigError (one line) for a device this machine lacks or a precision it cannot build there."""
    from fssam.runtime import cpu

    if device not in DEVICES:
        raise ConfigError(f"--device {device!r}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this machine has no CUDA GPU that torch can use; build CPU packages with "
                          "--device cpu, or export on the GPU machine that will serve them")
    if device == "cpu" and "fp16" in precisions:
        raise ConfigError(f"{flag} fp16 is for --device cuda (CPUs have no fast fp16 matrix kernels); use fp32 or bf16")
    if device == "cpu" and "bf16" in precisions and not cpu.native_bf16():
        raise ConfigError(f"{flag} bf16 on the CPU needs native bf16 ({' or '.join(cpu.NATIVE_BF16_FLAGS)}); this "
                          f"one has neither: {cpu.describe()}")


def buckets(limit: int) -> tuple:
    """The CUDA batch buckets up to `limit`; $FSSAM_AOTI_BUCKETS (e.g. "1,8") picks fewer for a short
    run. Batch 1 is always one (latency, and the only batch of a torch-aoti repository)."""
    chosen = CUDA_BUCKETS
    text = os.environ.get("FSSAM_AOTI_BUCKETS", "").strip()
    if text:
        items = [b.strip() for b in text.split(",") if b.strip()]
        if not items or not all(b.isascii() and b.isdigit() and int(b) >= 1 for b in items):
            raise ConfigError(f"FSSAM_AOTI_BUCKETS={text!r}: expected a comma list of batch sizes >= 1, e.g. 1,8")
        chosen = tuple(sorted({1, *(int(b) for b in items)}))
    return tuple(b for b in chosen if b <= limit) or (1,)


def graph_module(model, name: str, precision: str, device: str) -> torch.nn.Module:
    """The eager graph module a package is compiled from (the ONNX export's own); `model` on `device`
    (build_packages' copy: a module is never moved here, which would move the caller's model)."""
    if precision == "fp16":
        model = copy.deepcopy(model).to_dtype(torch.float16)
    module = STAGE_MODULES[name](model).eval()
    return BF16Autocast(module, device).eval() if precision == "bf16" else module


def _batched(examples: tuple, batch: int, device: str, dtype) -> tuple:
    """The examples at `batch` (the first episode repeated), on `device`, floats in `dtype`."""
    out = []
    for array in examples:
        array = torch.cat([array[:1]] * batch) if array.shape[0] != batch else array
        # contiguous: a package is compiled for its examples' strides and trusts every call to match
        out.append(array.to(device=device, dtype=dtype if array.is_floating_point() else array.dtype).contiguous())
    return tuple(out)


def compile_package(module, examples: tuple, names: list, path: str, device: str,
                    dynamic_limit: int | None) -> None:
    """torch.export the module on `examples` (inputs `names`) and package it with AOTInductor at `path`."""
    from fssam.runtime.parity import ieee_fp32

    dynamic = None
    if dynamic_limit is not None:
        batch = torch.export.Dim(BATCH, min=1, max=max(dynamic_limit, int(examples[0].shape[0])))
        dynamic = batch_dynamic_shapes(names, batch, isinstance(module, BF16Autocast))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with ieee_fp32(), torch.no_grad():
        program = torch.export.export(module, examples, dynamic_shapes=dynamic)
        # $FSSAM_AOTI_AUTOTUNE=0: no max-autotune (minutes less per package, slower kernels)
        options = {"max_autotune": os.environ.get("FSSAM_AOTI_AUTOTUNE", "1") != "0"} if device == "cuda" else {}
        torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=options)


def _compile_graphs(folder: str, manifest: dict, model, precision: str, device: str, examples: dict, dtype,
                    progress) -> dict:
    """Every graph's package(s) of one precision: {graph: {"files", "max_batch"}}."""
    graphs = {}
    for name in GRAPH_ORDER:
        if progress is not None:
            progress.set_postfix_str(f"{name} -> AOTInductor {precision} {device}")
        module = graph_module(model, name, precision, device)
        limit = int(manifest["graphs"][name]["max_batch"])
        files = {}
        sizes = (None,) if device == "cpu" else buckets(int(manifest.get("max_batch", limit)))
        for size in sizes:
            stem = f"{name}.pt2" if size is None else f"{name}.b{size}.pt2"
            relative = os.path.join(FOLDER, precision, device, stem)
            batch = EXAMPLE_BATCH if size is None else size  # the graphs see one item per episode
            start = time.perf_counter()
            compile_package(module, _batched(examples[name], batch, device, dtype),
                            [entry["name"] for entry in manifest["graphs"][name]["inputs"]],
                            os.path.join(folder, relative), device, limit if size is None else None)
            files["dynamic" if size is None else str(size)] = {
                "file": relative, "sha256": file_sha256(os.path.join(folder, relative)),
                "compile_s": round(time.perf_counter() - start, 1)}  # torch.export and AOTInductor
        graphs[name] = {"files": files, "max_batch": limit}
    return graphs


def _build(folder: str, manifest: dict, model, precision: str, device: str, examples: dict, dtype, episode,
           progress) -> dict:
    """One precision's packages compiled, written and gated (`model` on `device`): {"graphs",
    "parity", "passed"}; a failed gate leaves no files (graphs {})."""
    from fssam.runtime import as_torch
    from fssam.runtime.parity import parity_report
    from fssam.runtime.runners.torch import TorchRunner

    graphs = _compile_graphs(folder, manifest, model, precision, device, examples, dtype, progress)
    manifest["aoti"][precision]["graphs"] = graphs
    write_manifest(folder, manifest)
    if progress is not None:
        progress.set_postfix_str(f"AOTInductor {precision} gate")
    runner = as_torch(TorchRunner(folder, precision=precision, verify=False), device=device)
    report = parity_report(model, runner, precision, episode, stages=GRAPH_ORDER)
    report["runtime"] = runner.describe()
    compile_s = sum(item["compile_s"] for entry in graphs.values() for item in entry["files"].values())
    if not report["passed"]:
        _remove(folder, precision, device)
        graphs = {}
    return {"graphs": graphs, "parity": report, "passed": bool(report["passed"]), "compile_s": round(compile_s, 1)}


def _attempt(folder: str, manifest: dict, model, precision: str, device: str, examples: dict, dtype, episode,
             progress, record: dict) -> Exception | None:
    """_build into `record`; the exception it raised (its files removed, graphs {}), else None."""
    try:
        record.update(_build(folder, manifest, model, precision, device, examples, dtype, episode, progress))
        return None
    except Exception as error:  # noqa: BLE001 (the caller raises it, or records it and goes on)
        _remove(folder, precision, device)
        record["graphs"] = {}
        return error


def _remove(folder: str, precision: str, device: str) -> None:
    """This precision's package folder (build_packages' own files)."""
    shutil.rmtree(os.path.join(folder, FOLDER, precision, device), ignore_errors=True)


def build_packages(folder: str, manifest: dict, model, precisions, device: str = "cpu", progress=None,
                   seed: int = 0, tolerant: bool = False) -> dict:
    """Compile, write and gate the packages; returns manifest["aoti"] ({precision: entry}). A
    precision whose gate fails keeps its entry with passed False and its files removed. The gate
    runs on the packages' device (eager fp32, IEEE, and eager bf16 autocast there) on a copy of
    `model`, which stays where it is. Each entry's "scma" says what the packages run for SCMA: "op"
    (torch.ops.fssam.scma: on CUDA the Triton kernels compiled in) or "reference". `tolerant`
    (`fssam deploy --device cuda`): a precision whose packages raise (compiled, loaded, run or
    captured in the gate) is built again with the reference SCMA (standard torch ops; the entry
    keeps the kernel's error in "scma_error"), and one that still raises is recorded (passed False,
    "error") instead of ending the export."""
    from fssam.export.onnx_export import _examples
    from fssam.ops.scma import reference_scma
    from fssam.runtime.parity import sample_episode
    from fssam.runtime.runners.torch import build_record

    shots = int(manifest["shots"])
    manifest["aoti"] = result = dict(manifest.get("aoti", {}))
    eager = model if device == "cpu" else copy.deepcopy(model).to(device)
    episode = tuple(t.to(device) for t in sample_episode(model.config, shots, batch=1, seed=seed + 7))
    for precision in precisions:
        dtype = torch.float16 if precision == "fp16" else torch.float32
        base = model if precision != "fp16" else copy.deepcopy(model).to_dtype(torch.float16)
        examples = _examples(base, shots, dtype, (GRAPH_ORDER,))
        result[precision] = record = {**build_record(device), "scma": "op", "graphs": {}}
        failed = _attempt(folder, manifest, eager, precision, device, examples, dtype, episode, progress, record)
        if failed is not None and not tolerant:
            write_manifest(folder, manifest)  # no files of this precision, none listed
            raise failed
        if failed is not None:  # its traceback dropped: the failed attempt's frames (packages, graphs) are freed
            failed.__traceback__ = None
            record.update(scma="reference", scma_error=f"{type(failed).__name__}: {first_line(failed)}"[:300])
            del failed
            with reference_scma():
                again = _attempt(folder, manifest, eager, precision, device, examples, dtype, episode, progress,
                                 record)
            if again is not None:
                record.update(passed=False, error=f"{type(again).__name__}: {first_line(again)}"[:300])
        write_manifest(folder, manifest)
        if progress is not None:
            progress.update()
    return result


def choose_packages(folder: str, manifest: dict, config, seed: int = 0, budget_s: float = 6.0) -> dict:
    """The fastest gated precision of manifest["aoti"] on this machine (`fssam deploy --device cuda`):
    each precision whose packages passed their gate is timed here (adaptive median of an episode
    through both graphs, the gate's episode, on the packages' device); returns manifest["aoti_plan"]
    ({"candidates": {precision: {"passed", "ms", "runs"} or the reason it was not timed},
    "chosen": precision}); `config`: the model's (the episode's size). ParityError when no
    precision passed its gate."""
    from fssam.bench.harness import adaptive_median
    from fssam.device import synchronize
    from fssam.runtime import as_torch
    from fssam.runtime.contract import run_graphs
    from fssam.runtime.parity import ParityError, sample_episode
    from fssam.runtime.runners.torch import TorchRunner

    packages = manifest.get("aoti", {})
    episode = sample_episode(config, int(manifest["shots"]), batch=1, seed=seed + 7)
    candidates = {}
    for precision, entry in packages.items():
        if not entry.get("passed"):
            why = f"failed to compile ({entry['error']})" if "error" in entry else "failed its gate at export"
            candidates[precision] = {"passed": False, "note": f"{why}: not timed"}
            continue
        runner = TorchRunner(folder, precision=precision, verify=False)
        pair = as_torch(runner, device=runner.device)  # graph to graph on the device, as served in process
        device = torch.device(runner.device)

        def call():
            run_graphs(pair, *episode)
            synchronize(device)

        with torch.inference_mode():
            seconds, runs = adaptive_median(call, budget_s)
        candidates[precision] = {"passed": True, "ms": round(1000 * seconds, 3), "runs": runs,
                                 "device": runner.device}
    timed = [(c["ms"], p) for p, c in candidates.items() if c["passed"]]
    if not timed:
        raise ParityError("AOTInductor: no precision passed its gate ("
                          + ", ".join(sorted(candidates)) + "): nothing to serve", {"passed": False})
    return {"candidates": candidates, "chosen": min(timed)[1]}
