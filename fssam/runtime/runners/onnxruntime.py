"""ONNX Runtime: the exported ONNX files as they are (the export's precision).

Where it runs (`select_providers`):
* device "cpu": CPUExecutionProvider; numpy arrays in and out. A bf16 export runs as the copy
  fssam.runtime.bf16.fp32_arithmetic makes (this provider has no bf16 kernels), and says so.
* device "cuda" or "cuda:N": TensorrtExecutionProvider (when this onnxruntime has it),
  CUDAExecutionProvider, then CPUExecutionProvider for what neither takes, all on GPU N; torch CUDA
  tensors in and out through IO binding, so inputs and outputs stay on the GPU (outputs handed over
  by DLPack, no copy). An onnxruntime build without the CUDA provider runs on the CPU provider, and
  says why; one whose CUDA provider cannot start (CUDA / cuDNN libraries missing: ONNX Runtime
  then drops it silently) is refused when the first session opens, naming the providers it got.
  The TensorRT provider gets the export's batch profile (`contract.profile_shapes`: no engine
  rebuilds inside a run) and an engine cache of its own per export and precision (its engine ids
  do not see the weights, so a cache shared by two exports would hand one the other's engines).
  A bf16 export without the TensorRT provider runs as its fp32-arithmetic copy (the CUDA provider
  lacks bf16 kernels for several operators), and says so. ONNX Runtime's own fallback is off: when
  a provider fails to start it would retry on CUDA + CPU without any provider options (GPU 0, TF32
  on); here a TensorRT provider that cannot start (onnxruntime-gpu lists it even without TensorRT
  installed) is dropped with a note, and the session is opened again with the same options. Before
  1.23 ONNX Runtime ignores that switch and falls back by itself: a session that came back without
  the TensorRT provider is treated the same way.
`providers_used()` names the providers the open sessions really got.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from fssam.errors import ConfigError, first_line
from fssam.runtime.runner import StageRunner

PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # the export's own dtype; int8: the graph plan's int8 graphs
CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
TENSORRT_CACHE_ENV = "FSSAM_ORT_TENSORRT_CACHE"  # engine caches of the TensorRT provider (default ~/.cache/fssam/ort-trt)
MIN_GPU_VERSION = (1, 20)  # IO binding with ONNX element types (bf16, uint8) as integers


def parse_device(device: str) -> tuple[str, int]:
    """("cpu", 0) or ("cuda", N) from "cpu", "cuda" or "cuda:N"."""
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (index and (not index.isdigit() or kind == "cpu")):
        raise ConfigError(f"ONNX Runtime device {device!r}: expected cpu, cuda or cuda:N")
    return kind, int(index or 0)


def select_providers(device: str, available=None) -> tuple[list[str], str | None]:
    """(providers in priority order, a note or None) for `device` ("cpu", "cuda", "cuda:N") from the
    providers this onnxruntime offers (`available`, default onnxruntime.get_available_providers())."""
    if parse_device(device)[0] == "cpu":
        return [CPU], None
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    available = list(available)
    if CUDA not in available:
        return [CPU], (f"this onnxruntime has no {CUDA} (it offers {', '.join(available) or 'none'}): ran on {CPU}; "
                       "pip install onnxruntime-gpu for the GPU")
    return [p for p in (TENSORRT, CUDA) if p in available] + [CPU], None


def tensorrt_profile_options(name: str, entry: dict, max_batch: int, shots: int) -> dict:
    """The TensorRT provider's explicit shape range of unit `name` (its manifest `entry`):
    {"trt_profile_min_shapes" | "..._opt_shapes" | "..._max_shapes": "input:1x3x512x512,..."}, the
    export's batch profile (`contract.profile_shapes`), so a larger batch never rebuilds an engine."""
    from fssam.runtime.contract import profile_shapes

    shapes = profile_shapes({name: entry}, max_batch, shots)[name]
    return {f"trt_profile_{kind}_shapes": ",".join(f"{tensor}:{'x'.join(map(str, ranges[i]))}"
                                                     for tensor, ranges in shapes.items())
            for i, kind in enumerate(("min", "opt", "max"))}


def require_int8_graphs(manifest: dict, runtime: str) -> dict:
    """manifest.int8_graph_files of `runtime`; ConfigError when there are none."""
    from fssam.runtime.manifest import int8_graph_files

    files = int8_graph_files(manifest, runtime)
    if not files:
        raise ConfigError(f"this export has no {runtime} int8 graphs that passed the gate: export them with "
                          "`fssam export --plan` (or `fssam deploy`), which gates every candidate of this machine")
    return files


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
                 providers=None, device: str = "cpu", files: dict | None = None):
        """`files` ({unit: relative file}) overrides the manifest's files, as the graph plan's gate does."""
        import onnxruntime as ort

        super().__init__(artifacts, precision, verify)
        self.files = dict(files or {})
        if self.precision == "int8":
            self.files = {**require_int8_graphs(self.manifest, "onnxruntime"), **self.files}
        elif self.precision != self.manifest["precision"]:
            raise ConfigError(f"ONNX Runtime runs an export in its own precision ({self.manifest['precision']}), "
                              f"not {self.precision}: export with --precision {self.precision}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.note = None
        _, self.device_id = parse_device(device)
        if providers is None:
            providers, self.note = select_providers(device)
        self.providers = list(providers)
        self.io_binding = CUDA in self.providers  # torch CUDA tensors bound in place
        if self.io_binding:
            self.tensors = "torch"
            version = tuple(int(part) for part in ort.__version__.split(".")[:2] if part.isdigit())
            if version < MIN_GPU_VERSION:
                raise ConfigError(f"onnxruntime {ort.__version__} is too old for the GPU path (IO binding of bf16 / "
                                  f"uint8 tensors needs {'.'.join(map(str, MIN_GPU_VERSION))} or newer): "
                                  "pip install -U onnxruntime-gpu")
        self.options = options
        self.sessions = {}  # opened on first use: the stages or the graphs, whichever is run

    @property
    def bf16_emulated(self) -> bool:
        """The CPU provider has no bf16 kernels, nor has the CUDA provider for several operators: without
        TensorRT a bf16 export runs as its fp32-arithmetic copy (bf16 rounding after every operator)."""
        return self.manifest["precision"] == "bf16" and TENSORRT not in self.providers

    def tensorrt_cache(self) -> str:
        """This export's engine cache of the TensorRT provider: <base>/<manifest digest>-<precision>.
        ONNX Runtime names engines after the model's file and tensor names, not its weights, so every
        export (same file names) gets a folder of its own."""
        base = os.environ.get(TENSORRT_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fssam", "ort-trt")
        digest = hashlib.sha256(json.dumps(self.manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return os.path.join(base, f"{digest}-{self.precision}")

    def tensorrt_profile(self, name: str) -> dict:
        """`tensorrt_profile_options` of unit `name` under this export's batch limit."""
        from fssam.runtime.contract import DEFAULT_MAX_BATCH

        return tensorrt_profile_options(name, self.specs[name], int(self.manifest.get("max_batch", DEFAULT_MAX_BATCH)),
                                        int(self.manifest["shots"]))

    def _provider_options(self, name: str) -> list[dict]:
        def options(provider: str) -> dict:
            if provider == CUDA:  # TF32 off: an fp32 export computes in fp32, as the gate checks it
                return {"device_id": str(self.device_id), "use_tf32": "0"}
            if provider == TENSORRT:
                return {"device_id": str(self.device_id), "trt_engine_cache_enable": "True",
                        "trt_engine_cache_path": self.tensorrt_cache(),
                        "trt_fp16_enable": str(self.precision == "fp16"), **self.tensorrt_profile(name)}
            return {}

        return [options(provider) for provider in self.providers]

    def _open(self, name: str):
        import onnxruntime as ort

        if self.precision == "int8" and name not in self.files:
            raise ConfigError(f"ONNX Runtime int8 runs the deployable graphs of the graph plan, not {name}")
        path = os.path.join(self.artifacts, self.files.get(name, self.specs[name]["file"]))
        model = path
        if self.bf16_emulated:
            import onnx

            from fssam.runtime.bf16 import fp32_arithmetic

            model = fp32_arithmetic(onnx.load(path)).SerializeToString()
        if TENSORRT in self.providers:
            os.makedirs(self.tensorrt_cache(), exist_ok=True)
        return ort.InferenceSession(model, sess_options=self.options, providers=self.providers,
                                    provider_options=self._provider_options(name), enable_fallback=0)

    def session(self, name: str):
        if name not in self.sessions:
            why = None
            try:
                session = self._open(name)
            except (RuntimeError, ValueError) as error:
                if TENSORRT not in self.providers or self.sessions:
                    raise
                why = first_line(error)[:200]
            else:
                if TENSORRT in self.providers and TENSORRT not in session.get_providers():
                    # onnxruntime < 1.23 ignores enable_fallback: it reopened on CUDA + CPU itself, with
                    # default options (GPU 0, TF32 on); or it skipped the provider with a warning
                    why = "ONNX Runtime dropped it"
            if why is not None:
                # the TensorRT provider could not start: the rest, with their own options (a bf16
                # export then runs as its fp32-arithmetic copy); stages opened later follow suit
                self.providers = [p for p in self.providers if p != TENSORRT]
                self.note = f"{TENSORRT} could not start ({why}): ran without it"
                session = self._open(name)
            if self.io_binding and CUDA not in session.get_providers():
                raise ConfigError(f"ONNX Runtime could not start its {CUDA} (got {', '.join(session.get_providers())}; "
                                  "are the CUDA and cuDNN libraries onnxruntime-gpu needs installed?): run with "
                                  "--device cpu, or fix the CUDA install")
            self.sessions[name] = session
        return self.sessions[name]

    def providers_used(self) -> list[str]:
        """The providers the open sessions got (ONNX Runtime drops those it cannot start)."""
        used = []
        for session in self.sessions.values():
            used += [p for p in session.get_providers() if p not in used]
        return used or list(self.providers)

    def describe(self) -> str:
        # before any session opens only the CPU provider is certain: GPU ones may still be dropped
        uncertain = not self.sessions and self.providers != [CPU]
        detail = ("requested " if uncertain else "") + ", ".join(self.providers_used())
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
        session = self.session(name)  # first: opening it decides bf16_emulated (a TensorRT provider may drop out)
        feeds = {}
        for array, entry in zip(arrays, specs["inputs"]):
            dtype = "float32" if self.bf16_emulated and entry["dtype"] == "bfloat16" else entry["dtype"]
            feeds[entry["name"]] = np.asarray(array).astype(_numpy_dtype(dtype), copy=False)
        outputs = session.run(None, feeds)
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
        device = torch.device("cuda", self.device_id)
        for tensor, entry in zip(tensors, spec["inputs"]):
            dtype = self._bound_dtype(entry)
            tensor = tensor.to(device=device, dtype=_torch_dtype(dtype)).contiguous()
            keep.append(tensor)
            binding.bind_input(entry["name"], "cuda", self.device_id, _onnx_type(dtype), tuple(tensor.shape),
                               tensor.data_ptr())
        for entry in spec["outputs"]:
            binding.bind_output(entry["name"], "cuda", self.device_id)
        torch.cuda.current_stream(device).synchronize()  # ONNX Runtime reads the inputs on its own stream
        session.run_with_iobinding(binding)  # returns when its stream is done: the outputs are ready
        outputs = [_to_torch(value) for value in binding.get_outputs()]
        if self.bf16_emulated:  # float32 holding bf16 values: back to the export's dtype (exact)
            outputs = [out.to(_torch_dtype(entry["dtype"])) for out, entry in zip(outputs, spec["outputs"])]
        return tuple(outputs) if len(outputs) > 1 else outputs[0]

    def _bound_dtype(self, entry: dict) -> str:
        return "float32" if self.bf16_emulated and entry["dtype"] == "bfloat16" else entry["dtype"]


def _to_torch(value):
    """An ONNX Runtime OrtValue on the GPU as a torch tensor, no copy (DLPack): through the Python
    wrapper's __dlpack__ where this onnxruntime has it, else its C object's to_dlpack()."""
    import torch

    if hasattr(value, "__dlpack__"):
        return torch.from_dlpack(value)
    inner = getattr(value, "_ortvalue", None)
    if inner is not None and hasattr(inner, "to_dlpack"):
        return torch.from_dlpack(inner.to_dlpack())
    raise ConfigError("this onnxruntime cannot hand GPU outputs over by DLPack: pip install -U onnxruntime-gpu")


RUNNER = OnnxRuntimeRunner
