"""Triton Python-backend model: one deployable FSSAM graph (support_encoder or query_segmenter) on
ONNX Runtime or OpenVINO (CPU), or torch running AOTInductor packages (CPU or GPU).

Written by `fssam repository --backend python-ort|python-openvino|python-torch`, which keeps only the
section of the runtime the model runs (between its `# >>> runtime` and `# <<< runtime` lines).
Config parameters:
  runtime              "onnxruntime", "openvino" or "torch"
  model_file           the model in the version folder: model.onnx, model.xml (+ model.bin), or model.pt2
                       (model.b<N>.pt2 per batch bucket for CUDA packages)
  intra_op_threads     ONNX Runtime / torch threads (0: the runtime's default)
  openvino_properties  JSON of the compile_model properties, written by the generator from
                       fssam.runtime.runners.openvino.compile_properties (precision hint, threads)
  torch_version, torch_device, torch_gpu, torch_float, torch_buckets
                       torch: the torch that built the packages (the only one that loads them), cpu or
                       cuda, the GPU model that built CUDA ones (the only one they run on), the float dtype the packages take (float16 for fp16 ones), and the batch
                       buckets of static CUDA packages ("1,2,4,8"; empty: one package, dynamic batch)
  cache_key_inputs     inputs that are part of the request (and so of Triton's response-cache key)
                       but not of the graph: support_key, the validate step's HMAC of the support set
Imports numpy, its runtime and triton_python_backend_utils only (no fssam). Tensors cross the stub
through DLPack both ways: under numpy 2 the 2.51 stub of the nvidia-pytriton wheel reads zeros
through Tensor.as_numpy() and makes empty tensors from numpy arrays.
Requests gathered by the dynamic batcher are concatenated along the batch dimension, run as one
call, and split back into one response per request; a bad request gets its own error.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

KDL_CPU = 1


class _DLPack:
    """A CPU pb_utils.Tensor as a DLPack producer that numpy accepts."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, *args, **kwargs):
        return self.tensor.to_dlpack()

    def __dlpack_device__(self):
        return (KDL_CPU, 0)


class NumpyIO:
    """Request tensors as numpy arrays and back, through DLPack."""

    @staticmethod
    def array(tensor):
        return np.from_dlpack(_DLPack(tensor))

    @staticmethod
    def concat(arrays):
        return np.concatenate(arrays, axis=0)

    @staticmethod
    def tensor(name, array):
        return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(array))


RUNTIMES = {}


def _first_line(error):
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# >>> runtime onnxruntime
class OnnxRuntimeStage(NumpyIO):
    def __init__(self, path, params, inputs, outputs):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        threads = int(params.get("intra_op_threads", "0"))
        if threads > 0:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.outputs = outputs

    def run(self, feeds):
        return self.session.run(self.outputs, feeds)


RUNTIMES["onnxruntime"] = OnnxRuntimeStage
# <<< runtime onnxruntime


# >>> runtime openvino

class OpenVINOStage(NumpyIO):
    def __init__(self, path, params, inputs, outputs):
        import openvino as ov

        properties = json.loads(params.get("openvino_properties", "{}"))
        compiled = ov.Core().compile_model(path, "CPU", properties)
        self.request = compiled.create_infer_request()
        self.ports = [self._port(compiled, name) for name in outputs]

    @staticmethod
    def _port(compiled, name):
        for index, port in enumerate(compiled.outputs):
            if name in port.get_names():
                return index
        raise ValueError(f"the OpenVINO model has no output {name!r}")

    def run(self, feeds):
        self.request.infer({name: np.ascontiguousarray(array) for name, array in feeds.items()})
        return [self.request.get_output_tensor(index).data.copy() for index in self.ports]


RUNTIMES["openvino"] = OpenVINOStage
# <<< runtime openvino


# >>> runtime torch
class TorchStage:
    """AOTInductor packages (torch._inductor.aoti_load_package) on the CPU, or, built for CUDA, on
    this instance's GPU: inputs go there, outputs come back to the CPU for the DLPack hand-over.
    Static CUDA packages (torch_buckets): a call is padded to the smallest bucket that holds it (its
    last episode repeated), run, and cut back; larger calls run in chunks of the largest bucket. Each
    bucket's package is replayed from a CUDA graph captured on its first call (static input and output
    buffers on the GPU), as fssam's own torch runner does; where a capture fails the package is called
    directly from then on, and the server's log says why once."""

    def __init__(self, path, params, inputs, outputs):
        import torch

        built = params.get("torch_version", torch.__version__)
        if built != torch.__version__:
            raise ValueError(f"the AOTInductor packages were built with torch {built}, this server's Python has "
                             f"torch {torch.__version__}: a package loads only with the torch that built it")
        self.torch, self.device = torch, torch.device("cpu")
        if params.get("torch_device", "cpu") == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("the AOTInductor packages were built for CUDA and this server has no CUDA GPU")
            self.device = torch.device("cuda", int(params.get("device_id", "0")))
            built_on, here = params.get("torch_gpu", ""), torch.cuda.get_device_name(self.device)
            if built_on and built_on != here:
                raise ValueError(f"the AOTInductor packages were built on a {built_on}, this server's GPU "
                                 f"{self.device.index} is a {here}: export them again on this GPU")
            torch.cuda.set_device(self.device)
            # as gated at export: IEEE fp32, no TF32 (ATen convolutions and matmuls in a package read
            # these flags when they run; a CUDA graph keeps those of its capture)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        threads = int(params.get("intra_op_threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        self.dtype = getattr(torch, params.get("torch_float", "float32"))
        self.buckets = sorted(int(b) for b in params.get("torch_buckets", "").split(",") if b)
        folder, index = os.path.dirname(path), self.device.index if self.device.type == "cuda" else -1

        def load(file):
            # CUDA: single-threaded (one model instance, no polling of its last run's event inside a
            # CUDA graph capture); the stub runs one request at a time
            return torch._inductor.aoti_load_package(os.path.join(folder, file), run_single_threaded=index >= 0,
                                                     device_index=index)

        self.packages = ({b: load(f"model.b{b}.pt2") for b in self.buckets} if self.buckets
                         else {None: load(os.path.basename(path))})
        self.graphs = {}  # bucket -> (CUDA graph, its static inputs, its static outputs) or None

    def array(self, tensor):
        return self.torch.from_dlpack(_DLPack(tensor))

    def concat(self, tensors):
        return self.torch.cat(tensors)

    @staticmethod
    def tensor(name, value):
        return pb_utils.Tensor.from_dlpack(name, value.contiguous())

    def _capture(self, size, args):
        """A CUDA graph of the bucket's package on static copies of `args`, after two warm-up calls
        on a side stream (autotuned kernels, the allocator); None, logged once, when it fails. The
        twin of fssam.runtime.runners.torch._Replay and recover_failed_capture, written out here
        because a repository's model files import no fssam."""
        torch = self.torch
        caller = torch.cuda.current_stream()
        pool = None
        try:
            with torch.inference_mode(False):
                inputs = [a.clone() for a in args]
            stream = torch.cuda.Stream()
            stream.wait_stream(caller)
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.packages[size](*inputs)
            caller.wait_stream(stream)
            graph, pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=pool):
                out = self.packages[size](*inputs)
            return graph, inputs, list(out) if isinstance(out, (tuple, list)) else [out]
        except RuntimeError as error:
            # what a failed capture's exit skips: the caller's stream, and the allocator's capture into
            # the graph's pool (left open, it fails every later empty_cache and capture)
            torch.cuda.set_stream(caller)
            if pool is not None:  # a failed graph cannot name its pool: the capture's own handle
                try:
                    torch._C._cuda_endAllocateToPool(self.device.index, pool)
                except RuntimeError:
                    pass  # the capture got as far as ending it (the graph releases the pool)
                else:
                    torch._C._cuda_releasePool(self.device.index, pool)
            torch.cuda.synchronize()
            # CUDA: the capture's end fails "due to a previous error", the cause being its context
            cause = (f"{_first_line(error.__context__)} (then: {_first_line(error)})" if error.__context__
                     else _first_line(error))
            pb_utils.Logger.log_warn(f"bucket {size}: CUDA graph capture failed, the package runs without one: {cause}")
            return None

    def _call(self, size, args):
        if size is not None and self.device.type == "cuda":
            if size not in self.graphs:
                self.graphs[size] = self._capture(size, args)
            if self.graphs[size] is not None:
                graph, inputs, outputs = self.graphs[size]
                for target, source in zip(inputs, args):
                    target.copy_(source)
                graph.replay()
                return [o.clone() for o in outputs]
        out = self.packages[size](*args)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def run(self, feeds):
        torch = self.torch
        # contiguous: a package trusts its inputs to have the strides of its examples (contiguous ones)
        args = [a.to(self.device, self.dtype if a.is_floating_point() else a.dtype).contiguous()
                for a in feeds.values()]
        with torch.no_grad():
            if not self.buckets:
                outputs = self._call(None, args)
            else:
                parts, start, batch = [], 0, int(args[0].shape[0])
                while start < batch:
                    take = min(batch - start, self.buckets[-1])
                    size = next(b for b in self.buckets if b >= take)
                    chunk = [a[start : start + take] for a in args]
                    if take < size:
                        chunk = [torch.cat([c, c[-1:].expand(size - take, *c.shape[1:])]) for c in chunk]
                    parts.append([o[:take] for o in self._call(size, chunk)])
                    start += take
                outputs = [torch.cat(column) for column in zip(*parts)]
        return [o.to("cpu", torch.float32 if o.is_floating_point() else o.dtype) for o in outputs]


RUNTIMES["torch"] = TorchStage
# <<< runtime torch


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.name = config["name"]
        self.inputs = [entry["name"] for entry in config["input"]]
        keys = [name for name in params.get("cache_key_inputs", "").split(",") if name]
        self.graph_inputs = [name for name in self.inputs if name not in keys]
        self.outputs = [entry["name"] for entry in config["output"]]
        runtime = params.get("runtime", "onnxruntime")
        if args.get("model_instance_kind") == "GPU":
            params["device_id"] = args["model_instance_device_id"]
        if runtime not in RUNTIMES:
            raise ValueError(f"model {self.name}: parameter runtime {runtime!r}, expected one of {', '.join(RUNTIMES)}")
        self.runtime = runtime
        path = os.path.join(args["model_repository"], args["model_version"], params.get("model_file", "model.onnx"))
        self.stage = RUNTIMES[runtime](path, params, self.graph_inputs, self.outputs)

    def _arrays(self, request):
        arrays = []
        for name in self.graph_inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"model {self.name}: missing input {name!r}")
            arrays.append(self.stage.array(tensor))
        batch = {a.shape[0] for a in arrays}
        if len(batch) != 1:
            raise ValueError(f"model {self.name}: inputs have different batch sizes {sorted(batch)}")
        return arrays

    def execute(self, requests):
        responses = [None] * len(requests)
        per_request, live = [], []
        for index, request in enumerate(requests):
            try:
                per_request.append(self._arrays(request))
                live.append(index)
            except Exception as error:  # one bad request must not fail the others
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
        if not live:
            return responses
        try:
            if len(live) == 1:
                columns = per_request[0]
            else:
                columns = [self.stage.concat([arrays[i] for arrays in per_request])
                           for i in range(len(self.graph_inputs))]
            outputs = self.stage.run(dict(zip(self.graph_inputs, columns)))
            start = 0
            for index, arrays in zip(live, per_request):
                size = arrays[0].shape[0]
                tensors = [self.stage.tensor(name, out[start : start + size]) for name, out in zip(self.outputs, outputs)]
                responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += size
        except Exception as error:
            for index in live:
                responses[index] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"model {self.name}: {self.runtime} failed: {error}")
                )
        return responses

    def finalize(self):
        self.stage = None
