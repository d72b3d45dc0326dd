"""Run exported artifacts: the six stages through ONNX Runtime, composed as the eager model."""

from __future__ import annotations

import os

import numpy as np
import torch

from fssam.errors import InputError
from fssam.export.manifest import load_manifest
from fssam.model.episode import encode_support, run_episode, segment

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


class OnnxStages:
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

    def prior_backbone(self, images):
        return self.run_stage("prior_backbone", images)

    def image_encoder(self, images):
        return self.run_stage("image_encoder", images)

    def prior(self, query_features, support_features, support_masks):
        return self.run_stage("prior", query_features, support_features, support_masks)

    def memory_encoder(self, feat_s0, feat_s1, feat_s2, mask):
        return self.run_stage("memory_encoder", feat_s0, feat_s1, feat_s2, mask)

    def refine(self, support_memory, support_masks, query_fg_memory, query_ae_memory, prior_fg, prior_ae):
        return self.run_stage(
            "refine", support_memory, support_masks, query_fg_memory, query_ae_memory, prior_fg, prior_ae
        )

    def head(self, feat_s0, feat_s1, feat_s2, support_memory, support_pointers, query_memory, query_pointer, support_masks):
        return self.run_stage(
            "head", feat_s0, feat_s1, feat_s2, support_memory, support_pointers, query_memory, query_pointer, support_masks
        )

    # the same composition as the eager model
    def encode_support(self, support_images, support_masks) -> dict:
        return encode_support(self, support_images, support_masks)

    def segment(self, query_images, support: dict):
        return segment(self, query_images, support)

    def __call__(self, query_images, support_images, support_masks):
        return run_episode(self, query_images, support_images, support_masks)
