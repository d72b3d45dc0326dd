"""The runtime layer: the stage contract and one runner per runtime, shared by every consumer.

`open_runner(name, artifacts, precision=..., threads=...)` opens an export folder on a runtime
(`runtimes()` lists them: onnxruntime, openvino, tensorrt, torch); `as_torch(runner)` gives it torch
tensors in and out. `fssam.runtime.contract` (stage names, tensor specs, the episode composition)
imports neither torch, sam2, timm nor triton.
"""

from fssam.runtime.manifest import load_manifest
from fssam.runtime.runner import StageRunner, as_torch, open_runner, runtimes

__all__ = ["open_runner", "as_torch", "runtimes", "load_manifest", "StageRunner"]
