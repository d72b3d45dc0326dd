"""Run exported artifacts: the six stages through ONNX Runtime, composed as the eager model."""

from __future__ import annotations

import os

import numpy as np
import torch

from fssam.errors import InputError
from fssam.export.manifest import load_manifest
from fssam.export.stages import StageRunner

_NUMPY = {"float32": np.float32, "float16": np.float16}


def _to_numpy(x: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return x.detach().float().cpu().numpy().astype(ml_dtypes.bfloat16)
    return x.detach().cpu().numpy().astype(_NUMPY[dtype], copy=False)


def _to_torch(x: np.ndarray) -> torch.Tensor:
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x))


class OnnxStages(StageRunner):
    """The six stages of an export folder as ONNX Runtime sessions; torch tensors in and out.

    Inputs are cast to the artifacts' dtype; outputs come back in that dtype.
    """

    def __init__(self, artifacts: str, providers=None, threads: int | None = None, verify: bool = True):
        import onnxruntime as ort

        self.manifest = load_manifest(artifacts, verify=verify)
        self.dtype = self.manifest["dtype"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]
        self.sessions = {}
        self.specs = self.manifest["stages"]
        for name, entry in self.specs.items():
            path = os.path.join(artifacts, entry["file"])
            self.sessions[name] = ort.InferenceSession(path, sess_options=options, providers=providers)

    def run_stage(self, name: str, *args: torch.Tensor):
        spec = self.specs[name]
        if len(args) != len(spec["inputs"]):
            raise InputError(f"stage {name} takes {len(spec['inputs'])} inputs, got {len(args)}")
        feeds = {}
        for tensor, entry in zip(args, spec["inputs"]):
            expected = tuple(entry["shape"][1:])
            if tuple(tensor.shape[1:]) != expected:
                raise InputError(
                    f"stage {name} input {entry['name']}: shape {tuple(tensor.shape)}, expected (batch, {', '.join(map(str, expected))})"
                )
            feeds[entry["name"]] = _to_numpy(tensor, self.dtype)
        outputs = self.sessions[name].run(None, feeds)
        outputs = tuple(_to_torch(o) for o in outputs)
        return outputs if len(outputs) > 1 else outputs[0]
