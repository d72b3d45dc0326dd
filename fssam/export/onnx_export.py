"""`fssam export`: one ONNX file per stage, a manifest, the parity gate; TensorRT engines on a GPU.

Everything is written into a temporary folder beside DIR and renamed to DIR at the end, so an
interrupted or failed export leaves nothing half-written.

Batch limit: `max_batch` episodes per call (`--max-batch`, default 8), recorded in the manifest
(manifest["max_batch"], and each stage's and graph's "max_batch": contract.batch_limit, B*max(K, 2)
images for the per-image stages). The same limit bounds torch.export's dynamic dimension, the
TensorRT profiles (runners.tensorrt.profile_shapes), what the runners accept, and the
`--max-batch` of `fssam repository`.

bf16: the official precision as a graph. The fp32 model is traced under bf16 autocast
(stages.BF16Autocast): bf16 weights, convolutions and matrix products inside, fp32 wherever
autocast keeps fp32, and fp32 tensors between stages (a bf16 result widens exactly), so the gate
holds it to 2x eager bf16 autocast's error. Written at opset BF16_OPSET, with casts around the
operators ONNX does not allow in bf16 (fssam.runtime.bf16: Einsum, and LayerNorm of a bf16
activation with fp32 weights). ONNX Runtime's CPU provider has no bf16 kernels, so the gate runs
each bf16 graph with fp32 arithmetic and bf16 rounding after every operator and the manifest says
so (manifest["bf16"]); TensorRT's gate runs the files as they are.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import io
import logging
import os
import site
import sys
import warnings

import torch
from tqdm import tqdm

import fssam
from fssam.errors import FSSAMError, InputError
from fssam.files import check_replaceable, make_parents, partial_folder, relative_paths, replace_folder, written_files
from fssam.runtime.manifest import FORMAT, MANIFEST, listed_files, load_manifest, write_manifest
from fssam.runtime.parity import DTYPES, ParityError, format_report, parity_report, sample_episode, stage_samples
from fssam.export.constants import folded_position_embeddings
from fssam.export.stages import STAGE_MODULES, BF16Autocast, batch_dynamic_shapes
from fssam.runtime.contract import (BATCH, DEFAULT_MAX_BATCH, GRAPH_ORDER, MAX_BATCH_LIMIT, STAGE_ORDER, batch_limit,
                                    graph_specs, stage_specs)
from fssam.runtime.bf16 import BF16_OPSET, EMULATION
from fssam.ops.scma import onnx_custom_node
from fssam.model import build, describe_weights
from fssam.model.checkpoint import file_sha256

log = logging.getLogger("fssam")
OPSET = 18
EXPORT_BATCH = 2  # example batch for tracing: 1 would be specialised as a constant
MAX_BATCH = MAX_BATCH_LIMIT  # the largest --max-batch
# --scma-node custom: the units holding SCMA (the head stage and the query_segmenter graph that serves
# it) get a second file, <name>.scma.onnx, with one fssam::SCMA node per layer, for TensorRT
SCMA_UNITS = ("head", "query_segmenter")


def custom_file(name: str) -> str:
    return f"{name}.scma.onnx"


class ExportError(FSSAMError):
    """The export could not be completed."""


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress and warnings of its own: keep them out of the user's terminal."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield sink
        finally:
            logging.disable(previous)


def export_stage(model, name: str, example_args: tuple, spec, path: str, limit: int | None = None,
                 bf16: bool = False) -> dict:
    """Export one stage or deployable graph (the model's own method, wrapped) with a dynamic batch
    dimension of at most `limit` (default: contract.batch_limit at the default --max-batch; never
    below the example's batch, which tracing needs). `bf16`: the fp32 model under bf16 autocast
    (stages.BF16Autocast), fp32 tensors in and out, written at opset BF16_OPSET with casts around
    the operators ONNX does not allow in bf16 there; returns {op type: count} of those (empty
    otherwise)."""
    module = STAGE_MODULES[name](model).eval()
    if bf16:
        module = BF16Autocast(module).eval()
    limit = limit or batch_limit(name, DEFAULT_MAX_BATCH, 1)
    batch = torch.export.Dim(BATCH, min=1, max=max(limit, *(int(a.shape[0]) for a in example_args)))
    dynamic_shapes = batch_dynamic_shapes([t.name for t in spec.inputs], batch, bf16)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    with _quiet() as sink, torch.no_grad(), folded_position_embeddings(model, model.config.image_size, autocast):
        try:
            program = torch.onnx.export(
                module,
                example_args,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                opset_version=BF16_OPSET if bf16 else OPSET,
                optimize=False,  # tidy() instead: see there
                verbose=False,
                report=False,
            )
            tidy(program.model)
        except Exception as error:  # the exporter raises many types; name the stage
            raise ExportError(f"{name}: ONNX export failed: {str(error).splitlines()[0]}\n{sink.getvalue()[-2000:]}") from error
        program.save(path)  # weights go to external data only past the 2 GB protobuf limit
    strip_machine_paths(path)
    return _cast_ops_without_bf16(path) if bf16 else {}


def tidy(model) -> None:
    """The exported graph (an onnx_ir model, changed in place) made small: functions inlined,
    constants folded (within onnxscript's size limits: the large constants are folded in torch,
    fssam.export.constants), unused nodes and duplicate initializers removed, common
    subexpressions merged, constants lifted to initializers. This is the exporter's own
    `optimize=True` less its pattern-rewrite rules (peephole fusions such as Cast-Cast and
    Transpose-Transpose that ONNX Runtime and OpenVINO apply themselves when they load a file):
    those rules took 54 of the 71 s of the small query_segmenter's export on two cores, and the
    graphs without them run as fast in both runtimes (measured: within 3% in ONNX Runtime fp32
    and OpenVINO bf16, outputs within 1e-6)."""
    import onnx_ir.passes.common as passes
    import onnxscript

    passes.InlinePass()(model)
    onnxscript.optimizer.fold_constants(model)
    for step in (passes.RemoveUnusedNodesPass(), passes.RemoveUnusedFunctionsPass(), passes.RemoveUnusedOpsetsPass(),
                 passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                 passes.LiftSubgraphInitializersToMainGraphPass(), passes.DeduplicateInitializersPass(),
                 passes.CommonSubexpressionEliminationPass(), passes.OutputFixPass(), passes.NameFixPass()):
        step(model)


def _cast_ops_without_bf16(path: str) -> dict:
    """fssam.runtime.bf16.cast_ops_without_bf16 on the file at `path` (rewritten when it changes)."""
    import onnx

    from fssam.runtime.bf16 import cast_ops_without_bf16

    model = onnx.load(path, load_external_data=False)
    changed = cast_ops_without_bf16(model)
    if changed:
        onnx.save(model, path)
    return changed


STACK_TRACE = "pkg.torch.onnx.stack_trace"  # the exporter's per-node Python stack: source paths of this machine


def machine_paths() -> list[str]:
    """Folders of this machine that must not appear in a shipped file: the repository, Python's
    prefixes and site-packages, the home and working folders."""
    roots = {os.path.dirname(os.path.dirname(os.path.abspath(fssam.__file__))), sys.prefix, sys.base_prefix,
             sys.exec_prefix, os.path.expanduser("~"), os.getcwd(), *site.getsitepackages()}
    with contextlib.suppress(Exception):
        roots.add(site.getusersitepackages())
    return sorted(r for r in roots if r and r != os.sep)


def strip_machine_paths(path: str) -> None:
    """Drop the exporter's stack traces, and any doc string or metadata value naming a folder of
    this machine, from the ONNX file at `path` (external weights, if any, are left as they are)."""
    import onnx

    roots = machine_paths()
    model = onnx.load(path, load_external_data=False)

    def clean(owner):
        if any(root in owner.doc_string for root in roots):
            owner.doc_string = ""
        if hasattr(owner, "metadata_props"):
            keep = [(p.key, p.value) for p in owner.metadata_props
                    if p.key != STACK_TRACE and not any(root in p.value for root in roots)]
            if len(keep) != len(owner.metadata_props):
                del owner.metadata_props[:]
                for key, value in keep:
                    owner.metadata_props.add(key=key, value=value)

    def graph(g):
        clean(g)
        for group in (g.input, g.output, g.value_info, g.initializer):
            for item in group:
                clean(item)
        for node in g.node:
            clean(node)
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    graph(attribute.g)
                for sub in attribute.graphs:
                    graph(sub)

    clean(model)
    graph(model.graph)
    for function in model.functions:
        clean(function)
        for node in function.node:
            clean(node)
    onnx.save(model, path)


def _check_onnx(path: str, runnable: bool = True) -> str | None:
    """A valid ONNX model that ONNX Runtime's CPU provider loads (`runnable`; custom fssam nodes
    only check). A bf16 file also passes ONNX's full check (every operator's input types against
    its schema); that provider has no bf16 kernels, so the copy the gate runs
    (fssam.runtime.bf16.fp32_arithmetic) must load, and what the provider said of the file itself
    is returned ("loads" for a file without bf16 tensors; None when not `runnable`)."""
    import onnx
    import onnxruntime as ort

    from fssam.runtime.bf16 import fp32_arithmetic, is_bf16

    onnx.checker.check_model(path)
    if not runnable:
        return None
    model = onnx.load(path)
    if not is_bf16(model):
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return "loads"
    onnx.checker.check_model(model, full_check=True)
    quiet = ort.SessionOptions()
    quiet.log_severity_level = 4  # the refusal is the expected answer: keep ONNX Runtime's log out of the terminal
    try:
        ort.InferenceSession(path, sess_options=quiet, providers=["CPUExecutionProvider"])
        status = "loads"
    except Exception as error:  # onnxruntime raises its own exception types
        status = "does not load: " + str(error).splitlines()[0][:300]
    ort.InferenceSession(fp32_arithmetic(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return status


def _examples(model, shots: int, dtype, groups=(STAGE_ORDER, GRAPH_ORDER)) -> dict[str, tuple]:
    """Real stage and graph inputs from an eager episode at the export batch, cast to the export dtype
    (the graphs' uint8 pixels and masks stay uint8)."""
    episode = [t.to(dtype) for t in sample_episode(model.config, shots, batch=EXPORT_BATCH, seed=99)]
    examples = {}
    for units in groups:
        records = stage_samples(model, *episode, units=units)
        for name in units:
            args = records[name][-1][0]  # memory_encoder: a query call (batch = episodes); any call has the layout
            examples[name] = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    return examples


def _bf16_entry(dtype, path: str, fp32_ops: dict, onnxruntime_cpu: str | None) -> dict:
    """A stage's or graph's bf16 facts for the manifest (nothing for fp32 / fp16): whether the file
    computes in bf16 at all ("computes": "bf16", or "fp32" where autocast leaves every operator of it
    in fp32, as eager autocast does), the operators that run in fp32 inside a bf16 graph, and whether
    ONNX Runtime's CPU provider loads the file."""
    if dtype != torch.bfloat16:
        return {}
    import onnx

    from fssam.runtime.bf16 import is_bf16

    computes = "bf16" if is_bf16(onnx.load(path, load_external_data=False)) else "fp32"
    return {"precision": "bf16", "computes": computes, "fp32_ops": fp32_ops, "onnxruntime_cpu": onnxruntime_cpu}


def _bf16_summary(stages: dict, graphs: dict) -> dict:
    """manifest["bf16"]: what a bf16 export is, and what its ONNX Runtime gate does and does not check."""
    units = {**stages, **graphs}
    fp32_ops = {name: entry["fp32_ops"] for name, entry in units.items() if entry["fp32_ops"]}
    unloadable = sorted(name for name, entry in units.items() if entry["onnxruntime_cpu"] != "loads")
    return {
        "opset": BF16_OPSET,
        "interface": "float32",  # tensors between stages; inside, autocast's bf16 weights and products
        "bf16_units": sorted(name for name, entry in units.items() if entry["computes"] == "bf16"),
        # no bf16 tensor at all: autocast keeps every operator of these in fp32 (eager does the same)
        "fp32_units": sorted(name for name, entry in units.items() if entry["computes"] == "fp32"),
        "fp32_ops": fp32_ops,  # no bf16 in their ONNX schema, or bf16 beside fp32 weights: cast to fp32 and back
        "onnxruntime_cpu": ("loads every file" if not unloadable else
                            f"cannot load {', '.join(unloadable)} (no bf16 kernels)"),
        "gate": {"onnxruntime": EMULATION,
                 "tensorrt": "the files as they are, bf16 kernels on the GPU (fssam export --tensorrt)"},
    }


def _weights_entry(model) -> dict:
    if model.random_init_seed is not None:
        return {
            "source": f"random-init seed {model.random_init_seed}",
            "checkpoints": model.checkpoints,
            "note": describe_weights(model),
        }
    return {"source": "checkpoint", "checkpoints": model.checkpoints}


def _export_owned(out: str) -> tuple[set, set]:
    """(files, no folders) of the complete export at `out`: manifest.json, every file its manifest lists
    (all present with their sha256) and every other file it wrote ("written_files": the calibration set
    and OpenVINO IR of an OpenVINO export). A file someone added, in those folders too, is not its own."""
    try:
        manifest = load_manifest(out)
    except InputError as error:
        raise ValueError(str(error)) from None
    files = {MANIFEST} | {entry["file"] for where, entry in listed_files(manifest) if not where.startswith("weights")}
    written = manifest.get("written_files", [])
    if not relative_paths(written):
        raise ValueError(f"{MANIFEST}: written_files is not a list of relative paths")
    return files | set(written), set()


def _check_destination(out: str) -> None:
    """An earlier complete export at `out` may be replaced; anything else may not."""
    check_replaceable(out, "an fssam export folder", _export_owned, error=ExportError)


def export(
    config: str = "small",
    out: str = "artifacts",
    checkpoint=None,
    shots: int = 1,
    precision: str = "fp32",
    tensorrt: bool = False,
    seed: int = 0,
    progress: bool = True,
    gate: bool = True,
    scma_node: str = "decomposed",
    openvino=(),
    calibration: str | None = None,
    threads: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    stages: bool = True,
    plan: bool = False,
    plan_options: dict | None = None,
    aoti=(),
    aoti_device: str = "cpu",
    aoti_plan: bool = False,
    **overrides,
) -> dict:
    """Export every stage to ONNX under `out`; returns the manifest. Raises ParityError (with the
    report) when the gate fails, and leaves no `out` behind in that case. `max_batch`: episodes
    per call the files, engines and a served repository admit (see the module docstring).
    `stages=False`: only the two deployable graphs (what a server runs; `fssam deploy`). `plan`:
    the graph plan of this machine (fssam.export.graph_plan: every runtime and precision gated and
    timed, int8 graphs written), manifest["graph_plan"]; `plan_options`: more keywords of
    graph_plan.plan_graphs (only, margin, prune). `aoti`: AOTInductor packages at these precisions
    on `aoti_device` (fssam.export.aoti); `aoti_plan`: a precision that fails its gate is recorded,
    not fatal, and the fastest that passed is chosen here, manifest["aoti_plan"] (`fssam deploy
    --device cuda`)."""
    if precision not in DTYPES:
        raise InputError(f"precision {precision!r}: expected one of {', '.join(DTYPES)}")
    if scma_node not in ("decomposed", "custom"):
        raise InputError(f"scma_node {scma_node!r}: expected 'decomposed' (standard ONNX ops) or 'custom' (fssam::SCMA)")
    if scma_node == "custom" and not tensorrt:
        raise InputError(
            "the fssam::SCMA custom node runs only in TensorRT with the fssam plugin: "
            "use --scma-node custom together with --tensorrt (ONNX Runtime needs the decomposed graph)"
        )
    if shots < 1:
        raise InputError(f"shots must be >= 1, got {shots}")
    if not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise InputError(f"max_batch must be in 1..{MAX_BATCH_LIMIT} episodes, got {max_batch}")
    if openvino:
        from fssam.export.openvino import parse_precisions

        openvino = parse_precisions(openvino)
        if precision != "fp32":
            raise InputError(f"--openvino plans are made from an fp32 export (OpenVINO's precision is a compile "
                             f"hint), not {precision}: leave --precision at fp32")
    if calibration is not None and "int8" not in openvino and not plan:
        raise InputError("--calibration is for int8 quantization: add --plan or --openvino int8")
    if not stages and (openvino or tensorrt):
        raise InputError("--openvino and --tensorrt plans are per stage: export the stage files too")
    if plan and precision != "fp32":
        raise InputError(f"--plan starts from an fp32 export (it quantizes and gates from there), not {precision}")
    if calibration is not None and not os.path.isdir(calibration):
        raise InputError(f"calibration folder {calibration!r} does not exist")
    if tensorrt:
        from fssam.export.tensorrt import require_tensorrt

        require_tensorrt()  # fail before the long work, not after it
    if aoti:
        from fssam.export.aoti import check_target, parse_precisions

        aoti = parse_precisions(aoti)
        if precision != "fp32":
            raise InputError(f"--aoti packages are compiled from the fp32 model (bf16: under autocast, fp16: cast), "
                             f"not a {precision} export: leave --precision at fp32")
        check_target(aoti, aoti_device)
    given, out = out, os.path.abspath(out)
    make_parents(out, "--out", given)  # mkdir -p, before the long work
    _check_destination(out)
    model = build(config, checkpoint=checkpoint, seed=seed, **overrides)
    dtype = DTYPES[precision]
    # fp16: the model in fp16, fp16 tensors between stages (gate: eager fp16); bf16: the fp32 model
    # under bf16 autocast, the official precision, fp32 tensors between stages (gate: eager autocast)
    bf16 = dtype == torch.bfloat16
    export_model = copy.deepcopy(model).to_dtype(dtype) if dtype == torch.float16 else model
    interface = torch.float16 if dtype == torch.float16 else torch.float32
    specs = stage_specs(model.config, shots, dtype=str(interface).replace("torch.", ""))
    specs.update(graph_specs(model.config, shots, dtype=str(interface).replace("torch.", "")))
    with partial_folder(out, markers=(MANIFEST,)) as tmp:
        stage_order = STAGE_ORDER if stages else ()
        units = len(stage_order) + len(GRAPH_ORDER)
        if plan:
            from fssam.export.graph_plan import plan_candidates

            options = plan_options or {}
            plan_steps = len(plan_candidates(options.get("only"), options.get("leave_out"))[0])
        else:
            plan_steps = 0
        bar = tqdm(total=units + 1 + bool(stages) + (units if tensorrt else 0) + len(openvino) + plan_steps + len(aoti),
                   disable=not progress, desc="export", unit="step")
        examples = _examples(export_model, shots, interface, (stage_order, GRAPH_ORDER) if stages else (GRAPH_ORDER,))
        def export_unit(name: str) -> dict:
            """One stage or graph to ONNX: its manifest entry."""
            bar.set_postfix_str(f"{name} -> ONNX")
            path = os.path.join(tmp, f"{name}.onnx")
            limit = batch_limit(name, max_batch, shots)
            fp32_ops = export_stage(export_model, name, examples[name], specs[name], path, limit, bf16)
            entry = {"file": f"{name}.onnx", "sha256": file_sha256(path), **specs[name].to_dict(),
                     "max_batch": limit, **_bf16_entry(dtype, path, fp32_ops, _check_onnx(path))}
            if scma_node == "custom" and name in SCMA_UNITS:
                # TensorRT's head and served query graph: one fssam::SCMA node per layer (the plugin);
                # <name>.onnx stays the decomposed graph that ONNX Runtime, the gate and the python-ort
                # server run
                custom = os.path.join(tmp, custom_file(name))
                with onnx_custom_node(True):
                    export_stage(export_model, name, examples[name], specs[name], custom, limit, bf16)
                _check_onnx(custom, runnable=False)
                entry["tensorrt_onnx"] = {"file": custom_file(name), "sha256": file_sha256(custom)}
            bar.update()
            return entry

        stages = {name: export_unit(name) for name in stage_order}
        graphs = {name: export_unit(name) for name in GRAPH_ORDER}
        manifest = {
            "format": FORMAT,
            "fssam_version": fssam.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": model.config.to_dict(),
            "shots": shots,
            "precision": precision,
            "dtype": str(interface).replace("torch.", ""),  # the tensors between stages (bf16: fp32, see above)
            "weights": _weights_entry(model),
            "opset": BF16_OPSET if bf16 else OPSET,
            "max_batch": max_batch,  # episodes per call; each stage's and graph's own limit beside its tensors
            "torch": torch.__version__,
            "pipeline": list(STAGE_ORDER),
            "scma_node": scma_node,
            "stages": stages,
            "graphs": graphs,
        }
        if bf16:
            manifest["bf16"] = _bf16_summary(stages, graphs)
        write_manifest(tmp, manifest)
        bar.set_postfix_str("parity gate")
        from fssam.runtime import as_torch, open_runner

        runner = as_torch(open_runner("onnxruntime", tmp))
        gate_episode = sample_episode(model.config, shots, batch=1, seed=seed + 7)
        if stages:
            report = parity_report(model, runner, precision, gate_episode)
            report["runtime"] = runner.describe()
            manifest["parity"] = {"onnxruntime": report}
            bar.update()
            if gate and not report["passed"]:
                raise ParityError(format_report(report, stages), report)
        bar.set_postfix_str("parity gate (graphs)")
        report = parity_report(model, runner, precision, gate_episode, stages=GRAPH_ORDER)
        report["runtime"] = runner.describe()
        manifest["graph_parity"] = {"onnxruntime": report}
        bar.update()
        if gate and not report["passed"]:
            raise ParityError(format_report(report, graphs), report)
        if plan:
            from fssam.export.graph_plan import plan_graphs

            write_manifest(tmp, manifest)
            manifest["graph_plan"] = plan_graphs(tmp, manifest, model, seed=seed, threads=threads,
                                                 calibration=calibration, progress=bar, **(plan_options or {}))
        if aoti:
            from fssam.export.aoti import build_packages

            write_manifest(tmp, manifest)
            manifest["aoti"] = build_packages(tmp, manifest, model, aoti, aoti_device, progress=bar, seed=seed,
                                              tolerant=aoti_plan)
            if aoti_plan:
                from fssam.export.aoti import choose_packages

                bar.set_postfix_str("AOTInductor: timing the gated precisions")
                manifest["aoti_plan"] = choose_packages(tmp, manifest, model.config, seed=seed)
            for name, entry in manifest["aoti"].items():
                if gate and not entry["passed"] and not aoti_plan:
                    raise ParityError(f"AOTInductor {name}: " + format_report(entry["parity"], graphs), entry["parity"])
        if openvino:
            from fssam.export.openvino import gate_openvino

            write_manifest(tmp, manifest)
            manifest["openvino"] = gate_openvino(tmp, manifest, model, openvino, calibration=calibration,
                                                 threads=threads, seed=seed, progress=bar)
        if tensorrt:
            from fssam.export.tensorrt import build_engines

            manifest["tensorrt"] = build_engines(tmp, manifest, model, progress=bar)
            for key, specs_ in (("parity", stages), ("graph_parity", graphs)):
                if gate and not manifest["tensorrt"][key]["passed"]:
                    raise ParityError(format_report(manifest["tensorrt"][key], specs_), manifest["tensorrt"][key])
        manifest["written_files"] = written_files(tmp, exclude=(MANIFEST,))
        write_manifest(tmp, manifest)
        bar.close()
        _check_destination(out)
        replace_folder(tmp, out)
        return manifest
