"""`fssam export`: one ONNX file per stage, a manifest, the parity gate; TensorRT engines on a GPU.

Everything is written into a temporary folder beside DIR and renamed to DIR at the end, so an
interrupted or failed export leaves nothing half-written.
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
from fssam.files import check_replaceable, partial_folder, replace_folder
from fssam.runtime.manifest import FORMAT, MANIFEST, listed_files, load_manifest, write_manifest
from fssam.runtime.parity import DTYPES, ParityError, format_report, parity_report, sample_episode, stage_samples
from fssam.export.stages import STAGE_MODULES
from fssam.runtime.contract import BATCH, STAGE_ORDER, stage_specs
from fssam.kernels import onnx_custom_node
from fssam.model import build, describe_weights
from fssam.model.checkpoint import file_sha256

log = logging.getLogger("fssam")
OPSET = 18
EXPORT_BATCH = 2  # example batch for tracing: 1 would be specialised as a constant
MAX_BATCH = 64
CUSTOM_HEAD_FILE = "head.scma.onnx"  # --scma-node custom: the head with fssam::SCMA nodes, for TensorRT


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


def export_stage(model, name: str, example_args: tuple, spec, path: str) -> None:
    """Export one stage (the model's own method, wrapped) with a dynamic batch dimension."""
    module = STAGE_MODULES[name](model).eval()
    batch = torch.export.Dim(BATCH, min=1, max=MAX_BATCH)
    dynamic_shapes = {t.name: {0: batch} for t in spec.inputs}
    with _quiet() as sink, torch.no_grad():
        try:
            program = torch.onnx.export(
                module,
                example_args,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                opset_version=OPSET,
                optimize=True,
                verbose=False,
                report=False,
            )
        except Exception as error:  # the exporter raises many types; name the stage
            raise ExportError(f"stage {name}: ONNX export failed: {str(error).splitlines()[0]}\n{sink.getvalue()[-2000:]}") from error
        program.save(path)  # weights go to external data only past the 2 GB protobuf limit
    strip_machine_paths(path)


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


def _check_onnx(path: str, runnable: bool = True) -> None:
    """A valid ONNX model that ONNX Runtime loads (`runnable`; custom fssam nodes only check)."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(path)
    if runnable:
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def _examples(model, shots: int, dtype) -> dict[str, tuple]:
    """Real stage inputs from an eager episode at the export batch, cast to the export dtype."""
    episode = [t.to(dtype) for t in sample_episode(model.config, shots, batch=EXPORT_BATCH, seed=99)]
    records = stage_samples(model, *episode)
    examples = {}
    for name in STAGE_ORDER:
        args = records[name][-1][0]  # memory_encoder: a query call (batch = episodes); any call has the layout
        examples[name] = tuple(a.to(dtype) for a in args)
    return examples


def _weights_entry(model) -> dict:
    if model.random_init_seed is not None:
        return {
            "source": f"random-init seed {model.random_init_seed}",
            "checkpoints": model.checkpoints,
            "note": describe_weights(model),
        }
    return {"source": "checkpoint", "checkpoints": model.checkpoints}


def _export_owned(out: str) -> tuple[set, set]:
    """(files, folders) of the complete export at `out`: manifest.json, every file its manifest lists
    (all present with their sha256), and the calibration/ and openvino/ folders an OpenVINO export writes."""
    try:
        manifest = load_manifest(out)
    except InputError as error:
        raise ValueError(str(error)) from None
    files = {MANIFEST} | {entry["file"] for where, entry in listed_files(manifest) if not where.startswith("weights")}
    folders = set()
    if "openvino" in manifest:
        from fssam.export.openvino import IR_FOLDER

        folders = {"calibration", IR_FOLDER}
    return files, folders


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
    **overrides,
) -> dict:
    """Export every stage to ONNX under `out`; returns the manifest. Raises ParityError (with the
    report) when the gate fails, and leaves no `out` behind in that case."""
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
    if openvino:
        from fssam.export.openvino import parse_precisions

        openvino = parse_precisions(openvino)
        if precision != "fp32":
            raise InputError(f"--openvino plans are made from an fp32 export (OpenVINO's precision is a compile "
                             f"hint), not {precision}: leave --precision at fp32")
    if calibration is not None and "int8" not in openvino:
        raise InputError("--calibration is for int8 quantization: add --openvino int8")
    if calibration is not None and not os.path.isdir(calibration):
        raise InputError(f"calibration folder {calibration!r} does not exist")
    if tensorrt:
        from fssam.export.tensorrt import require_tensorrt

        require_tensorrt()  # fail before the long work, not after it
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise InputError(f"output parent folder {parent!r} does not exist")
    _check_destination(out)
    model = build(config, checkpoint=checkpoint, seed=seed, **overrides)
    dtype = DTYPES[precision]
    export_model = model if dtype == torch.float32 else copy.deepcopy(model).to_dtype(dtype)
    specs = stage_specs(model.config, shots, dtype=str(dtype).replace("torch.", ""))
    with partial_folder(out, markers=(MANIFEST,)) as tmp:
        bar = tqdm(total=len(STAGE_ORDER) + 1 + (len(STAGE_ORDER) if tensorrt else 0) + len(openvino), disable=not progress,
                   desc="export", unit="step")
        examples = _examples(export_model, shots, dtype)
        stages = {}
        for name in STAGE_ORDER:
            bar.set_postfix_str(f"{name} -> ONNX")
            path = os.path.join(tmp, f"{name}.onnx")
            export_stage(export_model, name, examples[name], specs[name], path)
            _check_onnx(path)
            stages[name] = {"file": f"{name}.onnx", "sha256": file_sha256(path), **specs[name].to_dict()}
            if scma_node == "custom" and name == "head":
                # TensorRT's head: one fssam::SCMA node per layer (the plugin); head.onnx stays the
                # decomposed graph that ONNX Runtime, the gate and the python-ort server run
                custom = os.path.join(tmp, CUSTOM_HEAD_FILE)
                with onnx_custom_node(True):
                    export_stage(export_model, name, examples[name], specs[name], custom)
                _check_onnx(custom, runnable=False)
                stages[name]["tensorrt_onnx"] = {"file": CUSTOM_HEAD_FILE, "sha256": file_sha256(custom)}
            bar.update()
        manifest = {
            "format": FORMAT,
            "fssam_version": fssam.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": model.config.to_dict(),
            "shots": shots,
            "precision": precision,
            "dtype": str(dtype).replace("torch.", ""),
            "weights": _weights_entry(model),
            "opset": OPSET,
            "torch": torch.__version__,
            "pipeline": list(STAGE_ORDER),
            "scma_node": scma_node,
            "stages": stages,
        }
        write_manifest(tmp, manifest)
        bar.set_postfix_str("parity gate")
        from fssam.runtime import as_torch, open_runner

        report = parity_report(model, as_torch(open_runner("onnxruntime", tmp)), precision, sample_episode(model.config, shots, batch=1, seed=seed + 7))
        manifest["parity"] = {"onnxruntime": report}
        bar.update()
        if gate and not report["passed"]:
            raise ParityError(format_report(report, stages), report)
        if openvino:
            from fssam.export.openvino import gate_openvino

            write_manifest(tmp, manifest)
            manifest["openvino"] = gate_openvino(tmp, manifest, model, openvino, calibration=calibration,
                                                 threads=threads, seed=seed, progress=bar)
        if tensorrt:
            from fssam.export.tensorrt import build_engines

            manifest["tensorrt"] = build_engines(tmp, manifest, model, progress=bar)
            if gate and not manifest["tensorrt"]["parity"]["passed"]:
                raise ParityError(format_report(manifest["tensorrt"]["parity"], stages), manifest["tensorrt"]["parity"])
        write_manifest(tmp, manifest)
        bar.close()
        _check_destination(out)
        replace_folder(tmp, out)
        return manifest
