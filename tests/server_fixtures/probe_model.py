"""Triton Python-backend model for tests/test_server.py: reports what the stub can import.

initialize() writes JSON to the file named by the config parameter `report`: whether fssam is
importable (importlib.util.find_spec, and the path-based finder alone), the working directory,
sys.path and PYTHONPATH. execute() echoes INPUT0.
"""

import importlib.machinery
import importlib.util
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class _DLPack:
    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, *args, **kwargs):
        return self.tensor.to_dlpack()

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU


def _origin(spec):
    return None if spec is None else (spec.origin or str(list(spec.submodule_search_locations or [])))


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        report = {
            "find_spec": _origin(importlib.util.find_spec("fssam")),
            "path_finder": _origin(importlib.machinery.PathFinder.find_spec("fssam", sys.path)),
            "cwd": os.getcwd(),
            "sys_path": list(sys.path),
            "pythonpath": os.environ.get("PYTHONPATH"),
            "executable": sys.executable, "prefix": sys.prefix, "argv": list(getattr(sys, "argv", [])),
        }
        with open(params["report"]["string_value"], "w") as handle:
            json.dump(report, handle)

    def execute(self, requests):
        responses = []
        for request in requests:
            x = np.from_dlpack(_DLPack(pb_utils.get_input_tensor_by_name(request, "INPUT0"))).copy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor.from_dlpack("OUTPUT0", x)]))
        return responses
