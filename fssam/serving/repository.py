"""`fssam repository`: a Triton model repository from an export folder (manifest.json + ONNX files).

Layout (REPO):
  <stage>/config.pbtxt, <stage>/1/model.*      one model per exported stage
  fssam_pipeline/config.pbtxt                   the episode (Python backend, BLS, support cache)
  fssam_pipeline/1/model.py, 1/manifest.json
  fssam_pipeline/warmup/*                       raw warm-up inputs (model_warmup)
  fssam_repository.json                         what was written, from which export

Stage backends:
  python-ort   Python backend running ONNX Runtime on CPU (the tritonserver of the nvidia-pytriton wheel)
  onnxruntime  Triton's native ONNX Runtime backend (NGC tritonserver containers; GPU instances)
  tensorrt     Triton's TensorRT backend with the engines of `fssam export --tensorrt` (GPU servers)
Names, shapes and dtypes all come from the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from fssam.errors import ConfigError, InputError
from fssam.runtime.manifest import load_manifest
from fssam.runtime.contract import STAGE_ORDER
from fssam.files import replace_folder
from fssam.serving import PIPELINE_MODEL

BACKENDS = ("python-ort", "onnxruntime", "tensorrt")
MARKER = "fssam_repository.json"
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}
ONNX_MAX_BATCH = 64  # the export's dynamic batch range (fssam.export.onnx_export.MAX_BATCH)
TENSORRT_MAX_BATCH = 8  # the engines' optimisation profile (fssam.export.tensorrt.MAX_BATCH)
PIPELINE_MAX_BATCH = 8
TEMPLATES = os.path.join(os.path.dirname(__file__), "templates")


def _dims(shape) -> str:
    return "[ " + ", ".join(str(int(d)) for d in shape) + " ]"


def _tensor_block(kind: str, entries: list) -> str:
    items = []
    for entry in entries:
        items.append(
            "  {\n"
            f'    name: "{entry["name"]}"\n'
            f"    data_type: {entry['data_type']}\n"
            f"    dims: {_dims(entry['dims'])}\n"
            "  }"
        )
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def _parameters(params: dict) -> str:
    return "".join(
        f'parameters {{\n  key: "{key}"\n  value: {{ string_value: {json.dumps(str(value))} }}\n}}\n'
        for key, value in params.items()
    )


def _warmup(inputs: list, files: dict | None = None) -> str:
    """model_warmup with one batch-1 sample: random data, or raw files under <model>/warmup/."""
    lines = ["model_warmup [\n  {\n    name: \"warmup\"\n    batch_size: 1\n"]
    for entry in inputs:
        source = f'input_data_file: "{files[entry["name"]]}"' if files else "random_data: true"
        lines.append(
            f'    inputs {{\n      key: "{entry["name"]}"\n      value: {{\n        data_type: {entry["data_type"]}\n'
            f"        dims: {_dims(entry['dims'])}\n        {source}\n      }}\n    }}\n"
        )
    lines.append("  }\n]\n")
    return "".join(lines)


def _config(name: str, header: str, max_batch: int, inputs: list, outputs: list, queue_delay_us: int,
            instances: int, kind: str, params: dict, warmup: str) -> str:
    return (
        f'name: "{name}"\n{header}max_batch_size: {max_batch}\n'
        + _tensor_block("input", inputs)
        + _tensor_block("output", outputs)
        + f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}\n"
        + f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n"
        + _parameters(params)
        + warmup
    )


def _stage_io(entries: list) -> list:
    out = []
    for entry in entries:
        if entry["shape"][0] != "batch":
            raise InputError(f"tensor {entry['name']}: dim 0 is {entry['shape'][0]!r}, expected 'batch'")
        out.append({"name": entry["name"], "data_type": TRITON_DTYPES[entry["dtype"]], "dims": entry["shape"][1:]})
    return out


def _prepare_out(out: str) -> str:
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise InputError(f"output parent folder {parent!r} does not exist")
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, MARKER)) and (
        not os.path.isdir(out) or os.listdir(out)
    ):
        raise InputError(f"{out!r} exists and is not an fssam model repository: refusing to overwrite it")
    return out


def write_repository(
    artifacts: str,
    out: str,
    stage_backend: str = "python-ort",
    support_cache_size: int = 64,
    stage_instances: int = 1,
    pipeline_instances: int = 1,
    threads: int = 0,
    queue_delay_us: int = 500,
) -> dict:
    """Write the repository to `out` (replaced atomically); returns the description in MARKER."""
    if stage_backend not in BACKENDS:
        raise ConfigError(f"stage backend {stage_backend!r}: expected one of {', '.join(BACKENDS)}")
    for label, value, low in (("support cache size", support_cache_size, 0), ("stage instances", stage_instances, 1),
                              ("pipeline instances", pipeline_instances, 1), ("threads", threads, 0)):
        if value < low:
            raise ConfigError(f"{label} must be >= {low}, got {value}")
    manifest = load_manifest(artifacts)
    missing = [name for name in STAGE_ORDER if name not in manifest["stages"]]
    if missing:
        raise InputError(f"{artifacts!r}: manifest has no stage(s) {', '.join(missing)}")
    if manifest["dtype"] == "bfloat16":
        raise ConfigError("bf16 exports cannot be served: the pipeline passes stage tensors as numpy, which has no "
                          "bfloat16; export fp32 or fp16 for serving")
    if stage_backend == "tensorrt" and "tensorrt" not in manifest:
        raise InputError(
            f"{artifacts!r} has no TensorRT engines: run `fssam export --tensorrt` on the GPU server "
            "(engines are specific to the GPU and TensorRT version), or use --stage-backend onnxruntime"
        )
    if stage_backend == "tensorrt" and manifest.get("scma_node") == "custom":
        raise ConfigError(
            f"{artifacts!r}: its head engine holds fssam::SCMA plugin nodes, which the server's TensorRT backend "
            "cannot load (the plugin is registered from Python); export with --scma-node decomposed for serving, "
            "or use --stage-backend onnxruntime"
        )
    out = _prepare_out(out)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
    try:
        stage_max = TENSORRT_MAX_BATCH if stage_backend == "tensorrt" else ONNX_MAX_BATCH
        kind = "KIND_CPU" if stage_backend == "python-ort" else "KIND_GPU"
        for name in STAGE_ORDER:
            spec = manifest["stages"][name]
            version = os.path.join(tmp, name, "1")
            os.makedirs(version)
            params = {}
            if stage_backend == "python-ort":
                header = 'backend: "python"\n'
                shutil.copy2(os.path.join(artifacts, spec["file"]), os.path.join(version, "model.onnx"))
                shutil.copy2(os.path.join(TEMPLATES, "stage_ort_model.py"), os.path.join(version, "model.py"))
                params["intra_op_threads"] = threads
            elif stage_backend == "onnxruntime":
                header = 'backend: "onnxruntime"\n'
                shutil.copy2(os.path.join(artifacts, spec["file"]), os.path.join(version, "model.onnx"))
            else:
                header = 'backend: "tensorrt"\nplatform: "tensorrt_plan"\n'
                engine = manifest["tensorrt"]["engines"][name]
                engine_file = engine["file"] if isinstance(engine, dict) else engine
                shutil.copy2(os.path.join(artifacts, engine_file), os.path.join(version, "model.plan"))
            inputs, outputs = _stage_io(spec["inputs"]), _stage_io(spec["outputs"])
            text = _config(name, header, stage_max, inputs, outputs, 100, stage_instances, kind, params, _warmup(inputs))
            with open(os.path.join(tmp, name, "config.pbtxt"), "w") as handle:
                handle.write(text)

        size, shots = int(manifest["config"]["image_size"]), int(manifest["shots"])
        pipeline_batch = max(1, min(PIPELINE_MAX_BATCH, stage_max // shots))
        inputs = [
            {"name": "query", "data_type": "TYPE_FP32", "dims": [3, size, size]},
            {"name": "support_images", "data_type": "TYPE_FP32", "dims": [shots, 3, size, size]},
            {"name": "support_masks", "data_type": "TYPE_FP32", "dims": [shots, size, size]},
        ]
        outputs = [
            {"name": "logits", "data_type": "TYPE_FP32", "dims": [1, size, size]},
            {"name": "support_cached", "data_type": "TYPE_BOOL", "dims": [1]},
        ]
        version = os.path.join(tmp, PIPELINE_MODEL, "1")
        os.makedirs(version)
        shutil.copy2(os.path.join(TEMPLATES, "pipeline_model.py"), os.path.join(version, "model.py"))
        with open(os.path.join(version, "manifest.json"), "w") as handle:
            json.dump(manifest, handle, indent=2)
        files = _write_warmup(os.path.join(tmp, PIPELINE_MODEL, "warmup"), size, shots)
        params = {
            "support_cache_size": support_cache_size,
            "stage_models": json.dumps({name: name for name in STAGE_ORDER}),
            "stage_max_batch": json.dumps({name: stage_max for name in STAGE_ORDER}),
        }
        text = _config(PIPELINE_MODEL, 'backend: "python"\n', pipeline_batch, inputs, outputs, queue_delay_us,
                       pipeline_instances, "KIND_CPU", params, _warmup(inputs, files))
        with open(os.path.join(tmp, PIPELINE_MODEL, "config.pbtxt"), "w") as handle:
            handle.write(text)
        description = {
            "format": "fssam-triton-repository/1",
            "artifacts": os.path.abspath(artifacts),
            "stage_backend": stage_backend,
            "config": manifest["config"]["name"],
            "image_size": size,
            "shots": shots,
            "precision": manifest["precision"],
            "weights": manifest["weights"]["source"],
            "models": [*STAGE_ORDER, PIPELINE_MODEL],
            "pipeline": {"model": PIPELINE_MODEL, "inputs": inputs, "outputs": outputs, "max_batch_size": pipeline_batch,
                         "support_cache_size": support_cache_size},
        }
        with open(os.path.join(tmp, MARKER), "w") as handle:
            json.dump(description, handle, indent=2)
        replace_folder(tmp, out)
        return description
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _write_warmup(folder: str, size: int, shots: int) -> dict:
    """A valid episode (noise images, a square foreground) as raw little-endian float32 files."""
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    masks = np.zeros((shots, size, size), np.float32)
    masks[:, size // 4 : size // 2, size // 4 : size // 2] = 1
    arrays = {
        "query": (rng.random((3, size, size)) * 255).astype("<f4"),
        "support_images": (rng.random((shots, 3, size, size)) * 255).astype("<f4"),
        "support_masks": masks.astype("<f4"),
    }
    for name, array in arrays.items():
        array.tofile(os.path.join(folder, name))
    return {name: name for name in arrays}


def read_repository(repo: str) -> dict:
    path = os.path.join(repo, MARKER)
    if not os.path.isfile(path):
        raise InputError(f"{repo!r} is not an fssam model repository (no {MARKER}; run `fssam repository` first)")
    with open(path) as handle:
        return json.load(handle)
