"""Triton Python-backend model for tests/test_server.py: OUTPUT0 = 2 * INPUT0 (FP32), after the
optional config parameter `delay_s` seconds (a slow request, for graceful shutdown).

Self-contained (numpy and triton_python_backend_utils only). Tensors cross the stub through
DLPack: under numpy 2 the 2.51 stub's as_numpy() reads zeros and Tensor(name, ndarray) is empty.
"""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

KDL_CPU = 1


class _DLPack:
    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, *args, **kwargs):
        return self.tensor.to_dlpack()

    def __dlpack_device__(self):
        return (KDL_CPU, 0)


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.delay = float(params.get("delay_s", {}).get("string_value", "0"))

    def execute(self, requests):
        time.sleep(self.delay)
        responses = []
        for request in requests:
            x = np.from_dlpack(_DLPack(pb_utils.get_input_tensor_by_name(request, "INPUT0")))
            y = np.ascontiguousarray(2 * x, dtype=np.float32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor.from_dlpack("OUTPUT0", y)]))
        return responses
