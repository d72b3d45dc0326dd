"""Triton Python-backend model: one deployable FSSAM graph (support_encoder or query_segmenter) on
ONNX Runtime or OpenVINO (CPU).

Written by `fssam repository --backend python-ort|python-openvino`. Config parameters:
  runtime              "onnxruntime" or "openvino"
  model_file           the model in the version folder: model.onnx, or model.xml (+ model.bin)
  intra_op_threads     ONNX Runtime threads (0: ONNX Runtime's default)
  openvino_properties  JSON of the compile_model properties, written by the generator from
                       fssam.runtime.runners.openvino.compile_properties (precision hint, threads)
  cache_key_inputs     inputs that are part of the request (and so of Triton's response-cache key)
                       but not of the graph: support_key, the validate step's HMAC of the support set
Imports numpy, the runtime and triton_python_backend_utils only (no torch, no fssam). Tensors
cross the stub through DLPack both ways: under numpy 2 the 2.51 stub of the nvidia-pytriton wheel
reads zeros through Tensor.as_numpy() and makes empty tensors from numpy arrays.
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


def to_numpy(tensor):
    return np.from_dlpack(_DLPack(tensor))


def to_tensor(name, array):
    return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(array))


class OnnxRuntimeStage:
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


class OpenVINOStage:
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


RUNTIMES = {"onnxruntime": OnnxRuntimeStage, "openvino": OpenVINOStage}


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
            arrays.append(to_numpy(tensor))
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
                columns = [np.concatenate([arrays[i] for arrays in per_request], axis=0)
                           for i in range(len(self.graph_inputs))]
            outputs = self.stage.run(dict(zip(self.graph_inputs, columns)))
            start = 0
            for index, arrays in zip(live, per_request):
                size = arrays[0].shape[0]
                tensors = [to_tensor(name, out[start : start + size]) for name, out in zip(self.outputs, outputs)]
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
