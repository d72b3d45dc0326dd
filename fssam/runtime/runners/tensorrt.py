"""TensorRT: the engines of `fssam export --tensorrt` (GPU only); torch CUDA tensors in and out.

Each engine carries one optimisation profile over the batch its unit receives under the export's
limit (`profile_shapes`: `fssam export --max-batch` episodes, times max(K, 2) images for the
per-image stages). On a machine without CUDA every entry point raises a clear error
(TensorRTUnavailable); `profile_shapes` needs neither CUDA nor TensorRT.
"""

from __future__ import annotations

import os

import torch

from fssam.errors import FSSAMError
from fssam.runtime.contract import MAX_BATCH, MIN_BATCH, OPT_BATCH, batch_profile, profile_shapes  # noqa: F401
from fssam.runtime.runner import StageRunner

PRECISIONS = ("fp32", "fp16", "bf16")  # the export's own dtype


_LOGGERS: dict = {}
ALIGNMENT = 256  # bytes: TensorRT's requirement on every tensor address (IExecutionContext.setTensorAddress)


def trt_logger(trt):
    """The one TensorRT logger of this process (TensorRT warns when runtimes and builders get different ones)."""
    if "logger" not in _LOGGERS:
        _LOGGERS["logger"] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS["logger"]


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


def torch_dtypes(trt) -> dict:
    """{TensorRT DataType: torch dtype} of the engine I/O this runner can hand over."""
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64,
             trt.bool: torch.bool, trt.uint8: torch.uint8, trt.int8: torch.int8}  # uint8: the graphs' pixels
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table


def torch_dtype(table: dict, dtype, tensor: str) -> torch.dtype:
    """The torch dtype of engine tensor `tensor` (TensorRT `dtype`, `table` from torch_dtypes);
    FSSAMError naming both when torch has none here (e.g. FP8, INT4, FP4 I/O)."""
    if dtype not in table:
        known = ", ".join(sorted(str(d).removeprefix("torch.") for d in set(table.values())))
        raise FSSAMError(f"TensorRT engine tensor {tensor!r} has data type {dtype}, which this runner cannot hand "
                         f"over as a torch tensor (engine inputs and outputs must be one of {known}): rebuild the "
                         "engines with `fssam export --tensorrt`")
    return table[dtype]


def _register_plugin_if_needed(manifest: dict) -> None:
    if manifest.get("scma_node") == "custom":
        from fssam.ops.scma.tensorrt_plugin import PluginUnavailable, register

        try:
            register()  # the fssam::SCMA node runs the fused Triton kernel as a TensorRT plugin
        except PluginUnavailable as error:  # no GPU / tensorrt, or TensorRT < 10.9: one line
            raise TensorRTUnavailable(str(error)) from None


def deserialize(runtime, data: bytes, what: str):
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise FSSAMError(f"TensorRT cannot load {what}: built by another TensorRT version or GPU, or its plugin "
                         "(fssam::SCMA) is not registered (see the TensorRT log above)")
    return engine


def execute(trt, engine, context, inputs: dict, stream: torch.cuda.Stream) -> dict:
    """Run one engine on `stream`: inputs {name: tensor} (moved to CUDA, cast to the engine's input
    dtypes), returns {output name: CUDA tensor}. Waits for the stream before returning."""
    keep, outputs, dtypes = [], {}, torch_dtypes(trt)
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
            continue
        if name not in inputs:
            raise FSSAMError(f"TensorRT engine input {name!r} was not given (got {sorted(inputs)})")
        dtype = torch_dtype(dtypes, engine.get_tensor_dtype(name), name)
        tensor = inputs[name].to(device="cuda", dtype=dtype).contiguous()
        if tensor.data_ptr() % ALIGNMENT:  # a view into a larger tensor (e.g. memory[b:]): copy to a fresh block
            tensor = tensor.clone()
        if not context.set_input_shape(name, tuple(tensor.shape)):
            low, _, high = (tuple(s) for s in engine.get_tensor_profile_shape(name, 0))
            raise FSSAMError(f"TensorRT engine input {name!r}: shape {tuple(tensor.shape)} is outside the engine's "
                             f"optimisation profile ({low} .. {high}; batch {low[0]}..{high[0]}, other dims as "
                             "exported)")
        context.set_tensor_address(name, tensor.data_ptr())
        keep.append(tensor)
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            out = torch.empty(tuple(context.get_tensor_shape(name)), device="cuda",
                              dtype=torch_dtype(dtypes, engine.get_tensor_dtype(name), name))
            context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
    stream.wait_stream(torch.cuda.current_stream())  # inputs were made on the current stream
    if not context.execute_async_v3(stream.cuda_stream):
        raise FSSAMError("TensorRT execution failed (see the TensorRT log above)")
    stream.synchronize()
    return outputs


class TensorRTRunner(StageRunner):
    """The six stages and the two deployable graphs as TensorRT engines; torch CUDA tensors in and out."""

    name = "tensorrt"
    tensors = "torch"

    def __init__(self, artifacts: str, precision: str | None = None, threads: int | None = None, verify: bool = True):
        trt = require_tensorrt()
        self.trt = trt
        super().__init__(artifacts, precision, verify)
        if self.precision != self.manifest["precision"]:
            raise FSSAMError(f"TensorRT engines run in the export's precision ({self.manifest['precision']}), not {self.precision}")
        if "tensorrt" not in self.manifest:
            raise FSSAMError(f"{artifacts!r} has no TensorRT engines: export with --tensorrt on a GPU machine")
        _register_plugin_if_needed(self.manifest)
        self.runtime = trt.Runtime(trt_logger(trt))
        self.engines, self.contexts = {}, {}
        for name, entry in self.manifest["tensorrt"]["engines"].items():
            with open(os.path.join(artifacts, entry["file"]), "rb") as handle:
                engine = deserialize(self.runtime, handle.read(), entry["file"])
            self.engines[name] = engine
            self.contexts[name] = engine.create_execution_context()
        self.stream = torch.cuda.Stream()  # TensorRT syncs extra on the legacy default stream

    def run_stage(self, name: str, *args: torch.Tensor):
        self.check_inputs(name, args)
        if name not in self.engines:
            raise FSSAMError(f"{self.artifacts!r} has no TensorRT engine for {name}: export with --tensorrt again")
        spec = self.specs[name]
        inputs = {entry["name"]: tensor for tensor, entry in zip(args, spec["inputs"])}
        try:
            results = execute(self.trt, self.engines[name], self.contexts[name], inputs, self.stream)
        except FSSAMError as error:
            raise FSSAMError(f"stage {name}: {error}") from None
        outputs = [results[entry["name"]] for entry in spec["outputs"]]
        return tuple(outputs) if len(outputs) > 1 else outputs[0]


RUNNER = TensorRTRunner
