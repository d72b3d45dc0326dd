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


def check_target(precisions, device: str) -> None:
    """ConfigError (one line) for a device this machine lacks or a precision it cannot build there."""
    from fssam.runtime import cpu

    if device not in DEVICES:
        raise ConfigError(f"--device {device!r}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this machine has no CUDA GPU that torch can use; build CPU packages with "
                          "--device cpu, or export on the GPU machine that will serve them")
    if device == "cpu" and "fp16" in precisions:
        raise ConfigError("--aoti fp16 is for --device cuda (CPUs have no fast fp16 matrix kernels); use fp32 or bf16")
    if device == "cpu" and "bf16" in precisions and not cpu.native_bf16():
        raise ConfigError(f"--aoti bf16 on the CPU needs native bf16 ({' or '.join(cpu.NATIVE_BF16_FLAGS)}); this "
                          f"one has neither: {cpu.describe()}")


def buckets(limit: int) -> tuple:
    """The CUDA batch buckets up to `limit`; $FSSAM_AOTI_BUCKETS (e.g. "1,8") picks fewer for a short run."""
    chosen = CUDA_BUCKETS
    if os.environ.get("FSSAM_AOTI_BUCKETS"):
        chosen = tuple(sorted({int(b) for b in os.environ["FSSAM_AOTI_BUCKETS"].split(",") if b.strip()}))
    return tuple(b for b in chosen if b <= limit) or (1,)


def graph_module(model, name: str, precision: str, device: str) -> torch.nn.Module:
    """The eager graph module a package is compiled from (the ONNX export's own)."""
    if precision == "fp16":
        model = copy.deepcopy(model).to_dtype(torch.float16)
    module = STAGE_MODULES[name](model.to(device)).eval()
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
            compile_package(module, _batched(examples[name], batch, device, dtype),
                            [entry["name"] for entry in manifest["graphs"][name]["inputs"]],
                            os.path.join(folder, relative), device, limit if size is None else None)
            files["dynamic" if size is None else str(size)] = {"file": relative,
                                                              "sha256": file_sha256(os.path.join(folder, relative))}
        graphs[name] = {"files": files, "max_batch": limit}
    return graphs


def _compile_tolerantly(folder: str, manifest: dict, model, precision: str, device: str, examples: dict, dtype,
                        progress, record: dict) -> dict | None:
    """_compile_graphs; where it raises, again with the reference SCMA. `record` gets what happened
    ("scma", "scma_error", and "passed"/"error" when neither compiled: then None, with none of this
    precision's files left)."""
    from fssam.ops.scma import reference_scma

    try:
        return _compile_graphs(folder, manifest, model, precision, device, examples, dtype, progress)
    except Exception as error:  # noqa: BLE001 (recorded: the other precisions go on)
        record.update(scma="reference", scma_error=f"{type(error).__name__}: {first_line(error)}"[:300])
    partial = os.path.join(folder, FOLDER, precision, device)  # this call's own files
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with reference_scma():
            return _compile_graphs(folder, manifest, model, precision, device, examples, dtype, progress)
    except Exception as again:  # noqa: BLE001
        shutil.rmtree(partial, ignore_errors=True)
        record.update(passed=False, error=f"{type(again).__name__}: {first_line(again)}"[:300])
        return None


def build_packages(folder: str, manifest: dict, model, precisions, device: str = "cpu", progress=None,
                   seed: int = 0, tolerant: bool = False) -> dict:
    """Compile, write and gate the packages; returns manifest["aoti"] ({precision: entry}). A
    precision whose gate fails keeps its entry with passed False and its files removed. Each entry's
    "scma" says what the packages run for SCMA: "op" (torch.ops.fssam.scma: on CUDA the Triton
    kernels compiled in) or "reference". `tolerant` (`fssam deploy --device cuda`): a precision
    whose compilation raises is compiled again with the reference SCMA (standard torch ops; the
    entry keeps the kernel's error in "scma_error"), and one that still fails is recorded (passed
    False, "error") instead of ending the export."""
    from fssam.export.onnx_export import _examples
    from fssam.runtime import as_torch
    from fssam.runtime.parity import parity_report, sample_episode
    from fssam.runtime.runners.torch import TorchRunner, build_record

    shots = int(manifest["shots"])
    result = dict(manifest.get("aoti", {}))
    for precision in precisions:
        dtype = torch.float16 if precision == "fp16" else torch.float32
        base = model if precision != "fp16" else copy.deepcopy(model).to_dtype(torch.float16)
        examples = _examples(base, shots, dtype, (GRAPH_ORDER,))
        record = {**build_record(device), "scma": "op"}
        if tolerant:
            graphs = _compile_tolerantly(folder, manifest, model, precision, device, examples, dtype, progress, record)
        else:
            graphs = _compile_graphs(folder, manifest, model, precision, device, examples, dtype, progress)
        result[precision] = {**record, "graphs": graphs or {}}
        manifest["aoti"] = result
        write_manifest(folder, manifest)
        if graphs is not None:
            if progress is not None:
                progress.set_postfix_str(f"AOTInductor {precision} gate")
            runner = as_torch(TorchRunner(folder, precision=precision, verify=False))
            episode = sample_episode(model.config, shots, batch=1, seed=seed + 7)
            report = parity_report(model, runner, precision, episode, stages=GRAPH_ORDER)
            report["runtime"] = runner.describe()
            result[precision]["parity"] = report
            result[precision]["passed"] = bool(report["passed"])
            if not report["passed"]:
                for entry in graphs.values():
                    for item in entry["files"].values():
                        os.unlink(os.path.join(folder, item["file"]))
                result[precision]["graphs"] = {}
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
        pair = as_torch(runner)
        device = torch.device(runner.device)

        def call():
            run_graphs(pair, *episode)
            synchronize(device)

        with torch.inference_mode():
            seconds, runs = adaptive_median(call, budget_s)
        candidates[precision] = {"passed": True, "ms": round(1000 * seconds, 3), "runs": runs,
                                 "device": runner.device}
        del runner, pair
    timed = [(c["ms"], p) for p, c in candidates.items() if c["passed"]]
    if not timed:
        raise ParityError("AOTInductor: no precision passed its gate ("
                          + ", ".join(sorted(candidates)) + "): nothing to serve", {"passed": False})
    return {"candidates": candidates, "chosen": min(timed)[1]}
