"""Eval backends: eager PyTorch, an export folder on a fssam.runtime runner, or a Triton server,
each a callable (query, supports, masks) -> logits (1, 1, S, S) on the CPU."""

from __future__ import annotations

import os

import numpy as np

from fssam.errors import ConfigError, InputError
from fssam.eval.precision import check_eager_precision, eager_forward

BACKENDS = ("eager", "onnx", "openvino", "tensorrt", "triton")
RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}  # backend -> fssam.runtime


class Backend:
    """A callable (query, supports, masks) -> logits (1, 1, S, S) on the CPU, plus what it is."""

    def __init__(self, name, run, image_size, config, weights, random_init, extra=None):
        self.name = name
        self.run = run
        self.image_size = image_size
        self.config = config  # the config dict (or {"name": ...} when only the name is known)
        self.weights = weights  # one line, as describe_weights
        self.random_init = random_init  # True, False, or None (unknown: remote server)
        self.extra = extra or {}

    def __call__(self, query, supports, masks):
        return self.run(query, supports, masks)


def make_backend(backend: str, *, config: str | None = None, shots: int = 1, artifacts: str | None = None,
                 url: str | None = None, protocol: str = "http", precision: str | None = None, device: str = "auto",
                 checkpoint=None, seed: int = 0, num_refine: int | None = None, refine_version: str | None = None,
                 scma_mode: str | None = None) -> Backend:
    """The backend named `backend` (one of BACKENDS).

    eager: `fssam.model.build(config or "small", checkpoint, seed, num_refine, refine_version, scma_mode)`
    on `device` at `precision` (fp32 | bf16). onnx / openvino / tensorrt: the export folder `artifacts`,
    whose config, shots and checkpoints must match the request. triton: the server at `url`."""
    if backend == "eager":
        return _eager(config, device, precision, checkpoint=checkpoint, seed=seed, num_refine=num_refine,
                      refine_version=refine_version, scma_mode=scma_mode)
    if backend == "triton":
        return _triton(config, url, protocol)
    if backend in RUNTIMES:
        return _runtime(backend, artifacts, config, shots, checkpoint, precision, device)
    raise ConfigError(f"unknown eval backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def _resolve(device: str) -> str:
    from fssam.device import resolve_device

    return resolve_device(device).type


def _eager(config, device, precision, **model_options) -> Backend:
    from fssam.model import build, describe_weights

    precision = check_eager_precision(precision)
    device = _resolve(device)
    model = build(config or "small", **model_options).to(device)

    def run(query, supports, masks):
        return eager_forward(model, query, supports, masks, device, precision)

    return Backend("eager", run, model.config.image_size, model.config.to_dict(), describe_weights(model),
                   model.random_init_seed is not None, {"device": device, "precision": precision})


def _check_manifest(backend, manifest: dict, folder: str, config, shots, checkpoint) -> tuple[str, bool]:
    """Config, shots and checkpoints of an export folder against the request; (weights line, random?)."""
    from fssam.model.checkpoint import file_sha256
    from fssam.runtime.manifest import weights_line

    name = manifest["config"].get("name")
    if config and config != name:
        raise ConfigError(f"the artifacts in {folder} are config {name!r} but --config {config} was asked for: "
                          f"export {config} or drop --config")
    if manifest["shots"] != shots:
        raise ConfigError(f"the artifacts in {folder} are exported for {manifest['shots']}-shot episodes but "
                          f"--shots {shots} was asked for: export with --shots {shots}")
    weights = manifest["weights"]
    recorded = {entry["sha256"] for entry in weights.get("checkpoints", [])}
    for path in checkpoint or []:
        if not os.path.isfile(path):
            raise ConfigError(f"checkpoint not found: {path}")
        if file_sha256(path) not in recorded:
            raise ConfigError(f"--checkpoint {path} is not among the weights of the artifacts in {folder} "
                              f"({weights['source']}); export again with it")
    return (f"{weights_line(manifest)} [{backend} artifacts {folder}, {manifest['precision']}]",
            weights["source"].startswith("random"))


def _runtime(backend, artifacts, config, shots, checkpoint, precision, device) -> Backend:
    """An export folder on one of fssam.runtime's runners (ONNX Runtime, OpenVINO, TensorRT)."""
    from fssam.runtime import as_torch, load_manifest, open_runner

    runtime = RUNTIMES[backend]
    options = {}
    if runtime == "onnxruntime" and _resolve(device) == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            if device == "cuda":
                raise ConfigError(
                    "--device cuda: this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
                )
        else:
            options["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    manifest = load_manifest(artifacts)
    weights, random_init = _check_manifest(backend, manifest, artifacts, config, shots, checkpoint)
    stages = as_torch(open_runner(runtime, artifacts, precision=precision, verify=False, **options))

    def run(query, supports, masks):
        return stages(query, supports, masks).float()

    return Backend(backend, run, manifest["config"]["image_size"], manifest["config"], weights, random_init,
                   {"artifacts": os.path.abspath(artifacts), "precision": stages.precision,
                    "runtime": stages.describe(), **options})


def _triton(config, url, protocol) -> Backend:
    import torch

    from fssam.model import get_config

    try:
        from fssam.serving.client import RemoteFSSAM, predict_remote
    except ImportError as error:
        raise ConfigError(f"--backend triton needs fssam.serving.client.predict_remote, which cannot be imported "
                          f"here ({error}); it needs the fssam serving client and its extra: "
                          f"pip install 'fssam-deploy[serving]'") from None
    cfg = get_config(config or "small")
    size = cfg.image_size

    def run(query, supports, masks):
        logits = torch.as_tensor(np.asarray(predict_remote(url, query, supports, masks, protocol)))
        if tuple(logits.shape) != (1, 1, size, size):
            raise InputError(f"the Triton server at {url} returned logits of shape {tuple(logits.shape)}, "
                             f"expected (1, 1, {size}, {size}) for config {cfg.name}: is it serving {cfg.name}?")
        return logits.float()

    with RemoteFSSAM(url, protocol=protocol) as remote:
        served = remote.served_weights()  # the ensemble's own line (fssam repository writes it)
    if served:
        weights, random_init = f"{served} (as the server at {url} reports)", served.startswith("RANDOM-INIT")
    else:
        weights, random_init = (f"remote Triton model at {url} ({protocol}): its weights are not reported by the "
                                "server (not an fssam repository's ensemble?): they may be untrained"), None
    return Backend("triton", run, size, {"name": cfg.name, "image_size": size}, weights, random_init,
                   {"url": url, "protocol": protocol})
