"""ONNX Runtime: the exported ONNX files as they are (the export's precision), numpy in and out."""

from __future__ import annotations

import os

import numpy as np

from fssam.errors import ConfigError
from fssam.runtime.runner import StageRunner

PRECISIONS = ("fp32", "fp16", "bf16")  # the export's own dtype: ONNX Runtime runs the graph as written


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


class OnnxRuntimeRunner(StageRunner):
    name = "onnxruntime"

    def __init__(self, artifacts: str, precision: str | None = None, threads: int | None = None, verify: bool = True,
                 providers=None):
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
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.sessions = {
            name: ort.InferenceSession(os.path.join(artifacts, entry["file"]), sess_options=options,
                                       providers=self.providers)
            for name, entry in self.specs.items()
        }

    def describe(self) -> str:
        return f"ONNX Runtime {self.precision} ({', '.join(self.providers)})"

    def run_stage(self, name: str, *arrays):
        self.check_inputs(name, arrays)
        feeds = {entry["name"]: np.asarray(array).astype(_numpy_dtype(entry["dtype"]), copy=False)
                 for array, entry in zip(arrays, self.specs[name]["inputs"])}
        outputs = self.sessions[name].run(None, feeds)
        return tuple(outputs) if len(outputs) > 1 else outputs[0]


RUNNER = OnnxRuntimeRunner
