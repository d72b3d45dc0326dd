"""TensorRT engines from the exported ONNX stages (GPU only); the runner is fssam.runtime.runners.tensorrt.

Engines get one optimisation profile over batch 1..8 (optimum 1). Networks are strongly typed: the
ONNX of an fp16/bf16 export is already in that dtype (with the fp32 islands eager keeps), and TensorRT
keeps every tensor in the type the graph gives it (TensorRT 10's FP16/BF16 builder flags are
deprecated and gone in 11). fp32 builds turn TF32 off (it is on by default) to stay within the
fp32 parity tolerances. On a machine without CUDA every entry point raises a clear error.
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
)

WORKSPACE_BYTES = 8 << 30


def serialize_network(onnx_model: bytes, precision: str = "fp32") -> bytes:
    """A serialized TensorRT engine from ONNX bytes; a batch profile 1..8 for a dynamic dim 0."""
    if precision not in ("fp32", "fp16", "bf16"):
        raise FSSAMError(f"precision {precision!r}: expected fp32, fp16 or bf16")
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_model):
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
        for tensor in dynamic:
            rest = list(tensor.shape)[1:]
            profile.set_shape(tensor.name, [MIN_BATCH, *rest], [OPT_BATCH, *rest], [MAX_BATCH, *rest])
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FSSAMError("TensorRT failed to build an engine (see the TensorRT log above)")
    return bytes(serialized)


def build_engine(onnx_path: str, engine_path: str, precision: str) -> dict:
    start = time.perf_counter()
    with open(onnx_path, "rb") as handle:
        try:
            serialized = serialize_network(handle.read(), precision)
        except TensorRTUnavailable:
            raise
        except FSSAMError as error:
            raise FSSAMError(f"{onnx_path}: {error}") from None
    with open(engine_path, "wb") as handle:
        handle.write(serialized)
    return {"seconds": round(time.perf_counter() - start, 2), "bytes": os.path.getsize(engine_path)}


def build_engines(folder: str, manifest: dict, model, progress=None) -> dict:
    """Build one engine per stage next to the ONNX files and gate them against eager PyTorch."""
    from fssam.runtime.parity import parity_report, sample_episode
    from fssam.runtime.runner import as_torch

    _register_plugin_if_needed(manifest)
    engines = {}
    for name, entry in manifest["stages"].items():
        if progress is not None:
            progress.set_postfix_str(f"{name} -> TensorRT")
        engine_file = f"{name}.engine"
        source = entry.get("tensorrt_onnx", entry)["file"]  # the fssam::SCMA head with --scma-node custom
        info = build_engine(os.path.join(folder, source), os.path.join(folder, engine_file), manifest["precision"])
        engines[name] = {"file": engine_file, **info}
        if progress is not None:
            progress.update()
    trt = require_tensorrt()
    manifest["tensorrt"] = {
        "engines": engines,
        "tensorrt_version": trt.__version__,
        "device": torch.cuda.get_device_name(0),
        "profile": {"min": MIN_BATCH, "opt": OPT_BATCH, "max": MAX_BATCH},
    }
    write_manifest(folder, manifest)
    runner = as_torch(TensorRTRunner(folder, verify=False))
    episode = sample_episode(model.config, manifest["shots"], batch=1, seed=11)
    manifest["tensorrt"]["parity"] = parity_report(model, runner, manifest["precision"], episode)
    return manifest["tensorrt"]
