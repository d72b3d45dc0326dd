"""TensorRT engines from the exported ONNX stages (GPU only); the runner is fssam.runtime.runners.tensorrt.

Each engine gets one optimisation profile from the export's own limit (manifest["max_batch"]
episodes; the per-image stages max_batch * max(K, 2) images: runners.tensorrt.profile_shapes).
Networks are strongly typed: the ONNX of an fp16 export is already in fp16 (with the fp32 islands
eager keeps), a bf16 export holds autocast's casts (bf16 weights and products, fp32 between stages
and wherever autocast keeps fp32, see fssam.export.stages.BF16Autocast and fssam.runtime.bf16), and
TensorRT keeps every tensor in the type the graph gives it
(TensorRT 10's FP16/BF16 builder flags are deprecated and gone in 11). fp32 builds turn TF32 off
(it is on by default) to stay within the fp32 parity tolerances. On a machine without CUDA every
entry point raises a clear error.

Engines holding fssam::SCMA plugin nodes record the plugin's kind (`plugin_kind`): "aot" (the
Triton kernel compiled to PTX inside the engine: any TensorRT runtime runs it, no Python) or "jit"
(a Python callback: the engine runs only in a Python process that registered the plugin). A node
without the `aot` attribute takes the AOT implementation (`network_flags`: PREFER_AOT_PYTHON_PLUGINS).
"""

from __future__ import annotations

import os
import time

import torch

from fssam.errors import FSSAMError
from fssam.runtime.manifest import write_manifest
from fssam.runtime.runners.tensorrt import (  # noqa: F401  (TensorRTUnavailable: part of this module's API)
    MAX_BATCH,
    MIN_BATCH,
    OPT_BATCH,
    TensorRTRunner,
    TensorRTUnavailable,
    _register_plugin_if_needed,
    require_tensorrt,
    trt_logger,
)

WORKSPACE_BYTES = 8 << 30


def network_flags(flags) -> int:
    """create_network flags from TensorRT's NetworkDefinitionCreationFlag enum `flags`:
    STRONGLY_TYPED, and PREFER_AOT_PYTHON_PLUGINS (TensorRT >= 10.9) so that an fssam::SCMA node
    without the `aot` attribute takes the plugin's AOT implementation. TensorRT's ONNX parser lets
    the node's own `aot` attribute win (1: strictly AOT, 0: strictly JIT); without it the parser
    asks the network-level preference, and with neither flag a plugin defining both an AOT and a
    JIT implementation (fssam::SCMA does) is refused ("has both AOT and JIT implementations.
    PREFER_AOT_PYTHON_PLUGINS or PREFER_JIT_PYTHON_PLUGINS should be specified"). It is a network
    creation flag, not an environment variable; a TensorRT without it gets STRONGLY_TYPED alone."""
    value = 0
    for name in ("STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS"):
        flag = getattr(flags, name, None)
        if flag is not None:
            value |= 1 << int(flag)
    return value


def serialize_network(onnx_model: bytes, precision: str = "fp32",
                      batch: tuple[int, int, int] = (MIN_BATCH, OPT_BATCH, MAX_BATCH), path: str | None = None) -> bytes:
    """A serialized TensorRT engine from ONNX bytes; one profile with dimension 0 over `batch`
    (min, opt, max) for the inputs whose dimension 0 is dynamic (runners.tensorrt.batch_profile).
    path: the ONNX file the bytes came from (the parser finds external weight files beside it)."""
    if precision not in ("fp32", "fp16", "bf16"):
        raise FSSAMError(f"precision {precision!r}: expected fp32, fp16 or bf16")
    trt = require_tensorrt()
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt.NetworkDefinitionCreationFlag))
    parser = trt.OnnxParser(network, logger)
    if not (parser.parse(onnx_model) if path is None else parser.parse(onnx_model, path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FSSAMError(f"TensorRT cannot parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [tensor for tensor in inputs if len(tensor.shape) and list(tensor.shape)[0] == -1]
    if dynamic:
        profile = builder.create_optimization_profile()
        low, opt, high = batch
        for tensor in dynamic:
            rest = list(tensor.shape)[1:]
            profile.set_shape(tensor.name, [low, *rest], [opt, *rest], [high, *rest])
        if config.add_optimization_profile(profile) < 0:
            raise FSSAMError(f"TensorRT rejected the optimisation profile (batch {low}..{high}, opt {opt})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FSSAMError("TensorRT failed to build an engine (see the TensorRT log above)")
    return bytes(serialized)


def plugin_kind(onnx_path: str) -> str | None:
    """"aot" or "jit": the fssam::SCMA plugin implementation the ONNX file's custom nodes ask
    TensorRT for (node attribute aot = 1 / 0); None when it has no fssam node."""
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == "fssam"]
    nodes += [n for function in model.functions for n in function.node if n.domain == "fssam"]
    if not nodes:
        return None
    kinds = set()
    for node in nodes:
        aot = [a for a in node.attribute if a.name == "aot"]
        kinds.add("aot" if aot and onnx.helper.get_attribute_value(aot[0]) else "jit")
    return "jit" if "jit" in kinds else "aot"  # one JIT node is enough to need Python at run time


def build_engine(onnx_path: str, engine_path: str, precision: str,
                 batch: tuple[int, int, int] = (MIN_BATCH, OPT_BATCH, MAX_BATCH)) -> dict:
    start = time.perf_counter()
    with open(onnx_path, "rb") as handle:
        try:
            serialized = serialize_network(handle.read(), precision, batch, path=onnx_path)
        except TensorRTUnavailable:
            raise
        except FSSAMError as error:
            raise FSSAMError(f"{onnx_path}: {error}") from None
    partial = engine_path + ".part"  # an interrupted write leaves no engine behind
    try:
        with open(partial, "wb") as handle:
            handle.write(serialized)
        os.replace(partial, engine_path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return {"seconds": round(time.perf_counter() - start, 2), "bytes": os.path.getsize(engine_path)}


def build_engines(folder: str, manifest: dict, model, progress=None) -> dict:
    """Build one engine per stage and deployable graph next to the ONNX files and gate them against eager PyTorch."""
    from fssam.runtime.parity import parity_report, sample_episode
    from fssam.runtime.runner import as_torch

    from fssam.runtime.contract import DEFAULT_MAX_BATCH
    from fssam.runtime.runners.tensorrt import batch_profile

    _register_plugin_if_needed(manifest)
    max_batch = int(manifest.get("max_batch", DEFAULT_MAX_BATCH))
    engines = {}
    for name, entry in {**manifest["stages"], **manifest.get("graphs", {})}.items():
        if progress is not None:
            progress.set_postfix_str(f"{name} -> TensorRT")
        engine_file = f"{name}.engine"
        source = entry.get("tensorrt_onnx", entry)["file"]  # --scma-node custom: <name>.scma.onnx (fssam::SCMA)
        batch = batch_profile(name, max_batch, manifest["shots"])
        info = build_engine(os.path.join(folder, source), os.path.join(folder, engine_file), manifest["precision"],
                            batch)
        engines[name] = {"file": engine_file, **info, "profile": dict(zip(("min", "opt", "max"), batch)),
                         "plugin": plugin_kind(os.path.join(folder, source))}
        if progress is not None:
            progress.update()
    trt = require_tensorrt()
    manifest["tensorrt"] = {
        "engines": engines,
        "tensorrt_version": trt.__version__,
        "device": torch.cuda.get_device_name(0),
        "max_batch": max_batch,  # episodes; each engine's "profile" is its dimension 0 range
    }
    write_manifest(folder, manifest)
    runner = as_torch(TensorRTRunner(folder, verify=False))
    episode = sample_episode(model.config, manifest["shots"], batch=1, seed=11)
    manifest["tensorrt"]["parity"] = parity_report(model, runner, manifest["precision"], episode)
    if "graphs" in manifest:
        manifest["tensorrt"]["graph_parity"] = parity_report(model, runner, manifest["precision"], episode,
                                                             stages=tuple(manifest["graphs"]))
    return manifest["tensorrt"]
