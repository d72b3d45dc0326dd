"""Triton Python-backend model: one exported FSSAM stage run by ONNX Runtime (CPU).

Written by `fssam repository --stage-backend python-ort`; needs numpy, onnxruntime and torch (DLPack).
Requests gathered by the dynamic batcher are concatenated along the batch dimension, run as one
ONNX Runtime call, and split back into one response per request.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import torch  # DLPack conversions only
import triton_python_backend_utils as pb_utils


def _to_numpy(tensor):
    # Tensor.as_numpy() reads wrong data (zeros) under numpy 2 with the pybind11 bindings of the 2.51
    # stub in the nvidia-pytriton wheel; DLPack through torch is ABI-stable. Copy: the memory is the request's.
    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).numpy().copy()


def _to_tensor(name, array):
    return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(torch.from_numpy(np.ascontiguousarray(array))))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        threads = int(params.get("intra_op_threads", "0"))
        if threads > 0:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.name = config["name"]
        self.inputs = [entry["name"] for entry in config["input"]]
        self.outputs = [entry["name"] for entry in config["output"]]
        self.max_batch = int(config.get("max_batch_size", 0)) or None

    def execute(self, requests):
        responses = [None] * len(requests)
        feeds_per_request, sizes, live = [], [], []
        for index, request in enumerate(requests):
            try:
                arrays = []
                for name in self.inputs:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is None:
                        raise ValueError(f"model {self.name}: missing input {name!r}")
                    arrays.append(_to_numpy(tensor))
                batch = {a.shape[0] for a in arrays}
                if len(batch) != 1:
                    raise ValueError(f"model {self.name}: inputs have different batch sizes {sorted(batch)}")
                feeds_per_request.append(arrays)
                sizes.append(batch.pop())
                live.append(index)
            except Exception as error:  # one bad request must not fail the others
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
        if live:
            try:
                if len(live) == 1:
                    feeds = dict(zip(self.inputs, feeds_per_request[0]))
                else:
                    feeds = {
                        name: np.concatenate([arrays[i] for arrays in feeds_per_request], axis=0)
                        for i, name in enumerate(self.inputs)
                    }
                outputs = self.session.run(self.outputs, feeds)
                start = 0
                for index, size in zip(live, sizes):
                    tensors = [
                        _to_tensor(name, out[start : start + size])
                        for name, out in zip(self.outputs, outputs)
                    ]
                    responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
                    start += size
            except Exception as error:
                for index in live:
                    responses[index] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"model {self.name}: ONNX Runtime failed: {error}")
                    )
        return responses

    def finalize(self):
        self.session = None
