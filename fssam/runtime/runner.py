"""One small interface for every runtime, and the registry that opens them by name.

A runtime is one module in `fssam.runtime.runners` that defines `RUNNER`, a `StageRunner`
subclass taking `(artifacts, precision=..., threads=..., verify=..., **options)`, and
`PRECISIONS`. Adding a runtime is adding that one file: `open_runner("<module name>", ...)`
finds it. Runners exchange numpy arrays (`tensors = "numpy"`) or torch tensors on their own
device (`tensors = "torch"`); `as_torch` gives any runner torch tensors in and out.
"""

from __future__ import annotations

import importlib
import pkgutil

from fssam.errors import ConfigError, InputError
from fssam.runtime import contract
from fssam.runtime.manifest import load_manifest

PACKAGE = "fssam.runtime.runners"


def default_baseline(precision: str) -> str:
    """The parity gate's reference for a precision: eager fp32 for fp32, eager fp16 for fp16, eager
    bf16 autocast (the official test's precision) for bf16 and int8."""
    return {"fp32": "fp32", "fp16": "same_dtype"}.get(precision, "bf16_autocast")


class StageRunner:
    """The six stage methods and the episode composition over `run_stage(name, *arrays)`."""

    name = "?"
    tensors = "numpy"

    def __init__(self, artifacts: str, precision: str | None = None, verify: bool = True):
        self.artifacts = artifacts
        self.manifest = load_manifest(artifacts, verify=verify)
        self.specs = {**self.manifest["stages"], **self.manifest.get("graphs", {})}
        self.precision = precision or self.manifest["precision"]

    def run_stage(self, name: str, *args):
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} {self.precision}"

    @property
    def baseline(self) -> str:
        """The parity gate's reference for this runner (fssam.runtime.parity)."""
        return default_baseline(self.precision)

    def check_inputs(self, name: str, args) -> None:
        """Arity and shapes (all but the batch dimension) against the manifest's stage spec."""
        if name not in self.specs:
            raise InputError(f"{self.artifacts!r} has no {name!r}: export it again with this fssam version "
                             "(the deployable graphs are new)")
        spec = self.specs[name]
        if len(args) != len(spec["inputs"]):
            raise InputError(f"stage {name} takes {len(spec['inputs'])} inputs, got {len(args)}")
        for array, entry in zip(args, spec["inputs"]):
            expected = tuple(entry["shape"][1:])
            if tuple(array.shape[1:]) != expected:
                raise InputError(f"stage {name} input {entry['name']}: shape {tuple(array.shape)}, "
                                 f"expected (batch, {', '.join(map(str, expected))})")
        limit = spec.get("max_batch")  # exports made before --max-batch carry none
        if limit is not None and args and int(args[0].shape[0]) > limit:
            episodes = self.manifest.get("max_batch", limit)
            raise InputError(f"stage {name}: batch {int(args[0].shape[0])} is over this export's limit of {limit} "
                             f"(--max-batch {episodes} episodes, {self.manifest['shots']}-shot): send at most "
                             f"{episodes} episodes per call, or export again with a larger --max-batch")

    def prior_backbone(self, images):
        return self.run_stage("prior_backbone", images)

    def image_encoder(self, images):
        return self.run_stage("image_encoder", images)

    def prior(self, query_features, support_features, support_masks):
        return self.run_stage("prior", query_features, support_features, support_masks)

    def memory_encoder(self, feat_s0, feat_s1, feat_s2, mask):
        return self.run_stage("memory_encoder", feat_s0, feat_s1, feat_s2, mask)

    def refine(self, support_memory, support_masks, query_fg_memory, query_ae_memory, prior_fg, prior_ae):
        return self.run_stage("refine", support_memory, support_masks, query_fg_memory, query_ae_memory, prior_fg, prior_ae)

    def head(self, feat_s0, feat_s1, feat_s2, support_memory, support_pointers, query_memory, query_pointer, support_masks):
        return self.run_stage(
            "head", feat_s0, feat_s1, feat_s2, support_memory, support_pointers, query_memory, query_pointer, support_masks
        )

    def support_encoder(self, support_images, support_masks):
        return self.run_stage("support_encoder", support_images, support_masks)

    def query_segmenter(self, query, support_features, support_memory, support_pointers, support_masks):
        return self.run_stage("query_segmenter", query, support_features, support_memory, support_pointers,
                              support_masks)

    def run_graphs(self, query_images, support_images, support_masks):
        """An episode through the two deployable graphs (what the server runs)."""
        return contract.run_graphs(self, query_images, support_images, support_masks)

    def encode_support(self, support_images, support_masks) -> dict:
        return contract.encode_support(self, support_images, support_masks)

    def segment(self, query_images, support: dict):
        return contract.segment(self, query_images, support)

    def __call__(self, query_images, support_images, support_masks):
        return contract.run_episode(self, query_images, support_images, support_masks)


def runtimes() -> list[str]:
    """The runtime names: the modules of fssam.runtime.runners."""
    package = importlib.import_module(PACKAGE)
    return sorted(info.name for info in pkgutil.iter_modules(package.__path__) if not info.name.startswith("_"))


def runner_class(name: str) -> type:
    if name not in runtimes():
        raise ConfigError(f"runtime {name!r}: expected one of {', '.join(runtimes())}")
    return importlib.import_module(f"{PACKAGE}.{name}").RUNNER


def open_runner(name: str, artifacts: str, precision: str | None = None, threads: int | None = None,
                verify: bool = True, **options) -> StageRunner:
    """The stages of an export folder on runtime `name` (see `runtimes()`)."""
    module = importlib.import_module(f"{PACKAGE}.{name}") if name in runtimes() else None
    if module is None:
        raise ConfigError(f"runtime {name!r}: expected one of {', '.join(runtimes())}")
    if precision is not None and precision not in module.PRECISIONS:
        raise ConfigError(f"runtime {name}: precision {precision!r}, expected one of {', '.join(module.PRECISIONS)}")
    return module.RUNNER(artifacts, precision=precision, threads=threads, verify=verify, **options)


# ---------------------------------------------------------------- torch view

def to_numpy(tensor):
    """A torch tensor as a numpy array of the same dtype (bfloat16 through ml_dtypes)."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.float().numpy().astype(ml_dtypes.bfloat16)
    return tensor.numpy()


def to_torch(array, device="cpu"):
    import numpy as np
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.astype(np.float32)).to(device=device, dtype=torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


class TorchStages(StageRunner):
    """Any runner with torch tensors in and out, outputs on `device` (the parity gate, eval, bench)."""

    def __init__(self, runner: StageRunner, device="cpu"):
        self.runner, self.device = runner, device
        self.manifest, self.specs, self.precision = runner.manifest, runner.specs, runner.precision
        self.name = runner.name

    def describe(self) -> str:
        return self.runner.describe()

    @property
    def baseline(self) -> str:
        return self.runner.baseline

    def run_stage(self, name: str, *tensors):
        if self.runner.tensors == "torch":
            out = self.runner.run_stage(name, *tensors)
            return tuple(o.to(self.device) for o in out) if isinstance(out, tuple) else out.to(self.device)
        out = self.runner.run_stage(name, *(to_numpy(t) for t in tensors))
        return tuple(to_torch(o, self.device) for o in out) if isinstance(out, tuple) else to_torch(out, self.device)


def as_torch(runner: StageRunner, device="cpu") -> StageRunner:
    return runner if isinstance(runner, TorchStages) else TorchStages(runner, device)
