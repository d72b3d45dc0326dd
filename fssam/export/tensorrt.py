"""TensorRT engines from the exported ONNX stages (GPU only), and a runner with the six stage methods.

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
from fssam.export.manifest import load_manifest, write_manifest
from fssam.export.stages import StageRunner

MIN_BATCH, OPT_BATCH, MAX_BATCH = 1, 1, 8
WORKSPACE_BYTES = 8 << 30


class TensorRTUnavailable(FSSAMError):
    """No CUDA device, or the tensorrt package is missing."""


def require_tensorrt():
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            "no CUDA device: TensorRT engines can only be built and run on a machine with an NVIDIA GPU "
            "(this machine has none); export without --tensorrt and build the engines on the GPU server"
        )
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailable("the tensorrt Python package is not installed: pip install 'fssam-deploy[gpu]'") from None
    return tensorrt


def _torch_dtype(trt, dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64,
             trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


def _register_plugin_if_needed(manifest: dict) -> None:
    if manifest.get("scma_node") == "custom":
        from fssam.kernels.tensorrt_plugin import register

        register()  # the fssam::SCMA node runs the fused Triton kernel as a TensorRT plugin


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


def deserialize(runtime, data: bytes, what: str):
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise FSSAMError(f"TensorRT cannot load {what}: built by another TensorRT version or GPU, or its plugin "
                         "(fssam::SCMA) is not registered (see the TensorRT log above)")
    return engine


def execute(trt, engine, context, inputs: dict, stream: torch.cuda.Stream) -> dict:
    """Run one engine on `stream`: inputs {name: tensor} (moved to CUDA, cast to the engine's input
    dtypes), returns {output name: CUDA tensor}. Waits for the stream before returning."""
    keep, outputs = [], {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
            continue
        if name not in inputs:
            raise FSSAMError(f"TensorRT engine input {name!r} was not given (got {sorted(inputs)})")
        tensor = inputs[name].to(device="cuda", dtype=_torch_dtype(trt, engine.get_tensor_dtype(name))).contiguous()
        if not context.set_input_shape(name, tuple(tensor.shape)):
            raise FSSAMError(f"TensorRT engine input {name!r}: shape {tuple(tensor.shape)} is outside the engine's "
                             f"optimisation profile (batch {MIN_BATCH}..{MAX_BATCH}, other dims as exported)")
        context.set_tensor_address(name, tensor.data_ptr())
        keep.append(tensor)
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            out = torch.empty(tuple(context.get_tensor_shape(name)), device="cuda",
                              dtype=_torch_dtype(trt, engine.get_tensor_dtype(name)))
            context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
    stream.wait_stream(torch.cuda.current_stream())  # inputs were made on the current stream
    if not context.execute_async_v3(stream.cuda_stream):
        raise FSSAMError("TensorRT execution failed (see the TensorRT log above)")
    stream.synchronize()
    return outputs


class TensorRTStages(StageRunner):
    """The six stages as TensorRT engines; torch CUDA tensors in and out."""

    def __init__(self, artifacts: str, verify: bool = True):
        trt = require_tensorrt()
        self.trt = trt
        self.manifest = load_manifest(artifacts, verify=verify)
        if "tensorrt" not in self.manifest:
            raise FSSAMError(f"{artifacts!r} has no TensorRT engines: export with --tensorrt on a GPU machine")
        _register_plugin_if_needed(self.manifest)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = {}, {}
        for name, entry in self.manifest["tensorrt"]["engines"].items():
            with open(os.path.join(artifacts, entry["file"]), "rb") as handle:
                engine = deserialize(self.runtime, handle.read(), entry["file"])
            self.engines[name] = engine
            self.contexts[name] = engine.create_execution_context()
        self.stream = torch.cuda.Stream()  # TensorRT syncs extra on the legacy default stream

    def run_stage(self, name: str, *args: torch.Tensor):
        spec = self.manifest["stages"][name]
        inputs = {entry["name"]: tensor for tensor, entry in zip(args, spec["inputs"])}
        try:
            results = execute(self.trt, self.engines[name], self.contexts[name], inputs, self.stream)
        except FSSAMError as error:
            raise FSSAMError(f"stage {name}: {error}") from None
        outputs = [results[entry["name"]] for entry in spec["outputs"]]
        return tuple(outputs) if len(outputs) > 1 else outputs[0]


class _CpuView:
    """Feeds CPU tensors to the TensorRT runner and returns CPU tensors, for the parity gate."""

    def __init__(self, stages: TensorRTStages):
        self.stages = stages

    def __getattr__(self, name):
        method = getattr(self.stages, name)

        def call(*args):
            out = method(*args)
            return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()

        return call

    def __call__(self, *args):
        return self.stages(*args).cpu()


def build_engines(folder: str, manifest: dict, model, progress=None) -> dict:
    """Build one engine per stage next to the ONNX files and gate them against eager PyTorch."""
    from fssam.export.parity import parity_report, sample_episode

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
    runner = _CpuView(TensorRTStages(folder, verify=False))
    episode = sample_episode(model.config, manifest["shots"], batch=1, seed=11)
    manifest["tensorrt"]["parity"] = parity_report(model, runner, manifest["precision"], episode)
    return manifest["tensorrt"]
