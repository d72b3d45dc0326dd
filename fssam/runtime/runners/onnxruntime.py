"""ONNX Runtime: the exported ONNX files as they are (the export's precision).

Where it runs (`select_providers`):
* device "cpu": CPUExecutionProvider; numpy arrays in and out. A bf16 export runs as the copy
  fssam.runtime.bf16.fp32_arithmetic makes (this provider has no bf16 kernels), and says so.
* device "cuda": TensorrtExecutionProvider (when this onnxruntime has it), CUDAExecutionProvider,
  then CPUExecutionProvider for what neither takes; torch CUDA tensors in and out through IO
  binding, so inputs and outputs stay on the GPU (outputs handed over by DLPack, no copy). A
  machine or onnxruntime build without the CUDA provider runs on the CPU provider, and says why.
`providers_used()` names the providers the open sessions really got.
"""

from __future__ import annotations

import os

import numpy as np

from fssam.errors import ConfigError
from fssam.runtime.runner import StageRunner

PRECISIONS = ("fp32", "fp16", "bf16")  # the export's own dtype: ONNX Runtime runs the graph as written
CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
TENSORRT_CACHE_ENV = "FSSAM_ORT_TENSORRT_CACHE"  # engine cache of the TensorRT provider (default ~/.cache/fssam/ort-trt)


def select_providers(device: str, available=None) -> tuple[list[str], str | None]:
    """(providers in priority order, a note or None) for `device` ("cpu" or "cuda") from the
    providers this onnxruntime offers (`available`, default onnxruntime.get_available_providers())."""
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"ONNX Runtime device {device!r}: expected cpu or cuda")
    if device == "cpu":
        return [CPU], None
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    available = list(available)
    if CUDA not in available:
        return [CPU], (f"this onnxruntime has no {CUDA} (it offers {', '.join(available) or 'none'}): ran on {CPU}; "
                       "pip install onnxruntime-gpu for the GPU")
    return [p for p in (TENSORRT, CUDA) if p in available] + [CPU], None


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _onnx_type(name: str) -> int:
    import onnx

    return {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
            "bfloat16": onnx.TensorProto.BFLOAT16, "uint8": onnx.TensorProto.UINT8}[name]


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "uint8": torch.uint8}[name]


class OnnxRuntimeRunner(StageRunner):
    name = "onnxruntime"

    def __init__(self, artifacts: str, precision: str | None = None, threads: int | None = None, verify: bool = True,
                 providers=None, device: str = "cpu"):
        import onnxruntime as ort

        super().__init__(artifacts, precision, verify)
        if self.precision != self.manifest["precision"]:
            raise ConfigError(f"ONNX Runtime runs an export in its own precision ({self.manifest['precision']}), "
                              f"not {self.precision}: export with --precision {self.precision}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.note = None
        if providers is None:
            providers, self.note = select_providers(device)
        self.providers = list(providers)
        self.io_binding = CUDA in self.providers  # torch CUDA tensors bound in place
        if self.io_binding:
            self.tensors = "torch"
        self.bf16_emulated = self.manifest["dtype"] == "bfloat16" and not self.io_binding
        self.options = options
        self.sessions = {}  # opened on first use: the stages or the graphs, whichever is run

    def _provider_options(self) -> list[dict]:
        cache = os.environ.get(TENSORRT_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fssam", "ort-trt")
        options = {TENSORRT: {"trt_engine_cache_enable": "True", "trt_engine_cache_path": cache,
                              "trt_fp16_enable": str(self.precision == "fp16")}}
        return [options.get(provider, {}) for provider in self.providers]

    def session(self, name: str):
        if name not in self.sessions:
            import onnxruntime as ort

            path = os.path.join(self.artifacts, self.specs[name]["file"])
            model = path
            if self.bf16_emulated:
                import onnx

                from fssam.runtime.bf16 import fp32_arithmetic

                model = fp32_arithmetic(onnx.load(path)).SerializeToString()
            if TENSORRT in self.providers:
                os.makedirs(self._provider_options()[self.providers.index(TENSORRT)]["trt_engine_cache_path"],
                            exist_ok=True)
            self.sessions[name] = ort.InferenceSession(model, sess_options=self.options, providers=self.providers,
                                                       provider_options=self._provider_options())
        return self.sessions[name]

    def providers_used(self) -> list[str]:
        """The providers the open sessions got (ONNX Runtime drops those it cannot start)."""
        used = []
        for session in self.sessions.values():
            used += [p for p in session.get_providers() if p not in used]
        return used or list(self.providers)

    def describe(self) -> str:
        detail = ", ".join(self.providers_used())
        if self.io_binding:
            detail += "; IO binding on the GPU"
        if self.bf16_emulated:
            from fssam.runtime.bf16 import EMULATION

            detail += "; " + EMULATION
        if self.note:
            detail += "; " + self.note
        return f"ONNX Runtime {self.precision} ({detail})"

    def run_stage(self, name: str, *arrays):
        self.check_inputs(name, arrays)
        if self.io_binding:
            return self._run_bound(name, arrays)
        specs = self.specs[name]
        feeds = {}
        for array, entry in zip(arrays, specs["inputs"]):
            dtype = "float32" if self.bf16_emulated and entry["dtype"] == "bfloat16" else entry["dtype"]
            feeds[entry["name"]] = np.asarray(array).astype(_numpy_dtype(dtype), copy=False)
        outputs = self.session(name).run(None, feeds)
        if self.bf16_emulated:  # float32 holding bf16 values: back to the export's dtype (exact)
            outputs = [out.astype(_numpy_dtype(entry["dtype"])) for out, entry in zip(outputs, specs["outputs"])]
        return tuple(outputs) if len(outputs) > 1 else outputs[0]

    def _run_bound(self, name: str, tensors):
        """torch tensors on the GPU in and out: inputs bound where they are, outputs allocated by ONNX
        Runtime on the device and handed over by DLPack."""
        import torch

        spec = self.specs[name]
        session = self.session(name)
        binding = session.io_binding()
        keep = []
        for tensor, entry in zip(tensors, spec["inputs"]):
            tensor = tensor.to(device="cuda", dtype=_torch_dtype(entry["dtype"])).contiguous()
            keep.append(tensor)
            binding.bind_input(entry["name"], "cuda", tensor.device.index or 0, _onnx_type(entry["dtype"]),
                               tuple(tensor.shape), tensor.data_ptr())
        device = (keep[0].device.index or 0) if keep else torch.cuda.current_device()
        for entry in spec["outputs"]:
            binding.bind_output(entry["name"], "cuda", device)
        torch.cuda.current_stream().synchronize()  # ONNX Runtime reads the inputs on its own stream
        session.run_with_iobinding(binding)
        outputs = [torch.from_dlpack(value) for value in binding.get_outputs()]
        return tuple(outputs) if len(outputs) > 1 else outputs[0]


RUNNER = OnnxRuntimeRunner
