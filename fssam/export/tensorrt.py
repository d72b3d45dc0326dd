"""TensorRT engines from the exported ONNX stages (GPU only), and a runner with the six stage methods.

Engines get one optimisation profile over batch 1..8 (optimum 1); fp16/bf16 exports build with the
matching builder flag. On a machine without CUDA every entry point raises a clear error.
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
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


def _register_plugin_if_needed(manifest: dict) -> None:
    if manifest.get("scma_node") == "custom":
        from fssam.kernels.tensorrt_plugin import register

        register()  # the fssam::SCMA node runs the fused Triton kernel as a TensorRT plugin


def serialize_network(onnx_model: bytes, precision: str = "fp32") -> bytes:
    """A serialized TensorRT engine from ONNX bytes; a batch profile 1..8 for a dynamic dim 0."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_model):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FSSAMError(f"TensorRT cannot parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    dynamic = [network.get_input(i) for i in range(network.num_inputs) if list(network.get_input(i).shape)[0] == -1]
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
                engine = self.runtime.deserialize_cuda_engine(handle.read())
            self.engines[name] = engine
            self.contexts[name] = engine.create_execution_context()
        self.dtype = getattr(torch, self.manifest["dtype"])

    def run_stage(self, name: str, *args: torch.Tensor):
        spec = self.manifest["stages"][name]
        engine, context = self.engines[name], self.contexts[name]
        keep = []
        for tensor, entry in zip(args, spec["inputs"]):
            tensor = tensor.to(device="cuda", dtype=self.dtype).contiguous()
            keep.append(tensor)
            context.set_input_shape(entry["name"], tuple(tensor.shape))
            context.set_tensor_address(entry["name"], tensor.data_ptr())
        outputs = []
        for entry in spec["outputs"]:
            shape = tuple(context.get_tensor_shape(entry["name"]))
            out = torch.empty(shape, device="cuda", dtype=_torch_dtype(self.trt, engine.get_tensor_dtype(entry["name"])))
            context.set_tensor_address(entry["name"], out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise FSSAMError(f"TensorRT execution of stage {name} failed")
        stream.synchronize()
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
        info = build_engine(os.path.join(folder, entry["file"]), os.path.join(folder, engine_file), manifest["precision"])
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
