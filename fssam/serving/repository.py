"""`fssam repository`: a Triton model repository from an export folder (manifest.json + ONNX files).

Layout (REPO):
  <stage>/config.pbtxt, <stage>/1/model.*      one model per exported stage
  fssam_pipeline/config.pbtxt                   the episode (Python backend, BLS, support cache)
  fssam_pipeline/1/model.py, 1/manifest.json
  fssam_pipeline/warmup/*                       raw warm-up inputs (model_warmup)
  fssam_repository.json                         what was written, from which export, each stage's backend and precision

Stage backends:
  python-ort       Python backend running ONNX Runtime on CPU (the tritonserver of the nvidia-pytriton wheel)
  python-openvino  Python backend running OpenVINO on CPU, at --precision fp32 | bf16 | int8 (the export's
                   gated per-stage plan); same server
  onnxruntime      Triton's native ONNX Runtime backend (NGC tritonserver containers; GPU instances)
  openvino         Triton's native OpenVINO backend (NGC tritonserver containers, CPU instances), the same
                   per-stage plan; not loadable by the nvidia-pytriton wheel's server, which has no OpenVINO backend
  tensorrt         Triton's TensorRT backend with the engines of `fssam export --tensorrt` (GPU servers)
Names, shapes and dtypes all come from the manifest.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from fssam.errors import ConfigError, InputError
from fssam.runtime.manifest import load_manifest
from fssam.runtime.contract import STAGE_ORDER
from fssam.runtime.runners import openvino as ov_runner
from fssam.files import check_replaceable, partial_folder, read_json, replace_folder
from fssam.serving import PIPELINE_MODEL

BACKENDS = ("python-ort", "python-openvino", "onnxruntime", "openvino", "tensorrt")
OPENVINO_BACKENDS = ("python-openvino", "openvino")
PYTHON_BACKENDS = ("python-ort", "python-openvino")  # templates/stage_model.py in the Python backend
MARKER = "fssam_repository.json"
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}
ONNX_MAX_BATCH = 64  # the export's dynamic batch range (fssam.export.onnx_export.MAX_BATCH)
TENSORRT_MAX_BATCH = 8  # the engines' optimisation profile (fssam.export.tensorrt.MAX_BATCH)
PIPELINE_MAX_BATCH = 8
STAGE_TEMPLATE = "stage_model.py"
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
            f"        dims: {_dims([1 if d == -1 else d for d in entry['dims']])}\n        {source}\n      }}\n    }}\n"
        )
    lines.append("  }\n]\n")
    return "".join(lines)


def _config(name: str, header: str, max_batch: int, inputs: list, outputs: list, queue_delay_us: int,
            instances: int, kind: str, params: dict, warmup: str) -> str:
    return (
        f'name: "{name}"\n{header}max_batch_size: {max_batch}\n'
        + _tensor_block("input", inputs)
        + _tensor_block("output", outputs)
        + (f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}\n" if max_batch else "")
        + f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n"
        + _parameters(params)
        + warmup
    )


def _stage_io(entries: list, batch_dim: bool = False) -> list:
    """Config tensors; `batch_dim`: the batch as a -1 dimension (max_batch_size 0 configs)."""
    out = []
    for entry in entries:
        if entry["shape"][0] != "batch":
            raise InputError(f"tensor {entry['name']}: dim 0 is {entry['shape'][0]!r}, expected 'batch'")
        out.append({"name": entry["name"], "data_type": TRITON_DTYPES[entry["dtype"]], "dims": [-1] * batch_dim + entry["shape"][1:]})
    return out


REPOSITORY_FORMAT = "fssam-triton-repository/1"


def _repository_owned(out: str) -> tuple[set, set]:
    """(files, folders) of the complete repository at `out`: its marker and the models it lists."""
    try:
        description = read_json(os.path.join(out, MARKER), REPOSITORY_FORMAT)
    except ValueError as reason:
        raise ValueError(f"{MARKER}: {reason}") from None
    models = description.get("models")
    if not isinstance(models, list) or not all(isinstance(m, str) and m and os.sep not in m and m not in (".", "..")
                                               for m in models):
        raise ValueError(f"{MARKER} lists no models")
    return {MARKER}, set(models)


def _prepare_out(out: str) -> str:
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise InputError(f"output parent folder {parent!r} does not exist")
    check_replaceable(out, "an fssam model repository", _repository_owned)
    return out


def native_openvino_parameters(properties: dict) -> dict:
    """compile_model properties (fssam.runtime.runners.openvino.compile_properties) as the config
    parameters of Triton's OpenVINO backend: it reads PERFORMANCE_HINT, INFERENCE_NUM_THREADS and
    HINT_BF16 (only "YES"); it has no parameter that pins f32 (nor a compile cache)."""
    params = {key: properties[key] for key in ("PERFORMANCE_HINT", "INFERENCE_NUM_THREADS") if key in properties}
    if properties.get("INFERENCE_PRECISION_HINT") == "bf16":
        params["HINT_BF16"] = "YES"
    return params


def _precision(manifest: dict, stage_backend: str, precision: str | None) -> str:
    """The asked precision: an OpenVINO plan's (default fp32), else the export's own."""
    if stage_backend in OPENVINO_BACKENDS:
        precision = precision or "fp32"
        if precision not in ov_runner.PRECISIONS:
            raise ConfigError(f"precision {precision!r}: expected one of {', '.join(ov_runner.PRECISIONS)}")
        return precision
    if precision not in (None, manifest["precision"]):
        raise ConfigError(f"stage backend {stage_backend} runs the export's own precision ({manifest['precision']}), "
                          f"not {precision}: --precision is for python-openvino and openvino")
    return manifest["precision"]


def _plan(manifest: dict, stage_backend: str, precision: str) -> dict:
    """{stage: {"precision", "file"}}: what each stage model runs."""
    if stage_backend in OPENVINO_BACKENDS:
        plan = ov_runner.plan(manifest, precision)
        if stage_backend == "python-openvino" and any(entry["precision"] == "bf16" for entry in plan.values()):
            ov_runner.require_native_bf16()  # this machine serves it
        return plan
    if stage_backend == "tensorrt":
        engines = manifest["tensorrt"]["engines"]
        return {name: {"precision": precision, "file": engines[name]["file"] if isinstance(engines[name], dict)
                       else engines[name]} for name in STAGE_ORDER}
    return {name: {"precision": precision, "file": manifest["stages"][name]["file"]} for name in STAGE_ORDER}


def _copy_model(artifacts: str, file: str, version: str, stage_backend: str) -> str:
    """The stage's file into the version folder as model.onnx / model.xml + model.bin / model.plan."""
    if file.endswith(".xml"):
        shutil.copy2(os.path.join(artifacts, file[: -len(".xml")] + ".bin"), os.path.join(version, "model.bin"))
        name = "model.xml"
    else:
        name = "model.plan" if stage_backend == "tensorrt" else "model.onnx"
    shutil.copy2(os.path.join(artifacts, file), os.path.join(version, name))
    return name


def _stage_model(stage_backend: str, entry: dict, model_file: str, threads: int) -> tuple[str, dict, str, int]:
    """(config header, parameters, instance kind, max_batch_size) of one stage model."""
    if stage_backend == "python-ort":
        params = {"runtime": "onnxruntime", "model_file": model_file, "intra_op_threads": threads}
        return 'backend: "python"\n', params, "KIND_CPU", ONNX_MAX_BATCH
    if stage_backend == "onnxruntime":
        return 'backend: "onnxruntime"\n', {}, "KIND_GPU", ONNX_MAX_BATCH
    if stage_backend == "tensorrt":
        return 'backend: "tensorrt"\nplatform: "tensorrt_plan"\n', {}, "KIND_GPU", TENSORRT_MAX_BATCH
    properties = ov_runner.compile_properties(entry["precision"], threads or None)
    if stage_backend == "python-openvino":
        params = {"runtime": "openvino", "model_file": model_file, "openvino_properties": json.dumps(properties)}
        return 'backend: "python"\n', params, "KIND_CPU", ONNX_MAX_BATCH
    # openvino: max_batch_size > 0 makes the backend fix the model's batch at max_batch_size
    # (ov::set_batch; other batches are errors unless padded): 0 and a -1 batch dim keep it dynamic
    header = 'backend: "openvino"\n' + ('default_model_filename: "model.onnx"\n' if model_file == "model.onnx" else "")
    return header, native_openvino_parameters(properties), "KIND_CPU", 0


def _check_servable(artifacts: str, manifest: dict, stage_backend: str) -> None:
    missing = [name for name in STAGE_ORDER if name not in manifest["stages"]]
    if missing:
        raise InputError(f"{artifacts!r}: manifest has no stage(s) {', '.join(missing)}")
    if manifest["dtype"] == "bfloat16":
        raise ConfigError("bf16 exports cannot be served: the pipeline passes stage tensors as numpy, which has no "
                          "bfloat16; export fp32 or fp16 for serving")
    if stage_backend in OPENVINO_BACKENDS and manifest["dtype"] != "float32":
        raise ConfigError(f"OpenVINO stage backends serve fp32 exports (their precision is a compile hint); this export "
                          f"is {manifest['precision']}: export with --precision fp32")
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


def _write_stages(tmp: str, artifacts: str, manifest: dict, stage_backend: str, plan: dict, instances: int,
                  threads: int) -> dict:
    """One model per stage; returns {stage: {"backend", "precision", "file", "max_batch"}}."""
    written = {}
    for name in STAGE_ORDER:
        spec, entry = manifest["stages"][name], plan[name]
        version = os.path.join(tmp, name, "1")
        os.makedirs(version)
        model_file = _copy_model(artifacts, entry["file"], version, stage_backend)
        if stage_backend in PYTHON_BACKENDS:
            shutil.copy2(os.path.join(TEMPLATES, STAGE_TEMPLATE), os.path.join(version, "model.py"))
        header, params, kind, max_batch = _stage_model(stage_backend, entry, model_file, threads)
        inputs, outputs = _stage_io(spec["inputs"], not max_batch), _stage_io(spec["outputs"], not max_batch)
        text = _config(name, header, max_batch, inputs, outputs, 100, instances, kind, params, _warmup(inputs))
        with open(os.path.join(tmp, name, "config.pbtxt"), "w") as handle:
            handle.write(text)
        written[name] = {"backend": stage_backend, "precision": entry["precision"], "file": model_file,
                         "max_batch": max_batch or ONNX_MAX_BATCH}  # a -1 batch dim: the export's range
    return written


def write_repository(
    artifacts: str,
    out: str,
    stage_backend: str = "python-ort",
    support_cache_size: int = 64,
    stage_instances: int = 1,
    pipeline_instances: int = 1,
    threads: int = 0,
    queue_delay_us: int = 500,
    precision: str | None = None,
) -> dict:
    """Write the repository to `out` (replaced atomically); returns the description in MARKER.

    `precision`: the OpenVINO plan the python-openvino / openvino stage backends run (fp32, bf16,
    int8; default fp32); the other backends run the export's own precision. `threads`: ONNX Runtime
    intra-op threads or OpenVINO inference threads per stage (0: the runtime's default)."""
    if stage_backend not in BACKENDS:
        raise ConfigError(f"stage backend {stage_backend!r}: expected one of {', '.join(BACKENDS)}")
    for label, value, low in (("support cache size", support_cache_size, 0), ("stage instances", stage_instances, 1),
                              ("pipeline instances", pipeline_instances, 1), ("threads", threads, 0)):
        if value < low:
            raise ConfigError(f"{label} must be >= {low}, got {value}")
    manifest = load_manifest(artifacts)
    _check_servable(artifacts, manifest, stage_backend)
    precision = _precision(manifest, stage_backend, precision)
    plan = _plan(manifest, stage_backend, precision)
    out = _prepare_out(out)
    with partial_folder(out, markers=(MARKER,)) as tmp:
        stages = _write_stages(tmp, artifacts, manifest, stage_backend, plan, stage_instances, threads)
        stage_max = min(entry["max_batch"] for entry in stages.values())
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
            "stage_max_batch": json.dumps({name: entry["max_batch"] for name, entry in stages.items()}),
        }
        text = _config(PIPELINE_MODEL, 'backend: "python"\n', pipeline_batch, inputs, outputs, queue_delay_us,
                       pipeline_instances, "KIND_CPU", params, _warmup(inputs, files))
        with open(os.path.join(tmp, PIPELINE_MODEL, "config.pbtxt"), "w") as handle:
            handle.write(text)
        description = {
            "format": REPOSITORY_FORMAT,
            "artifacts": os.path.abspath(artifacts),
            "stage_backend": stage_backend,
            "stage_precision": precision,
            **({"openvino_gated": precision in manifest.get("openvino", {})} if stage_backend in OPENVINO_BACKENDS else {}),
            "config": manifest["config"]["name"],
            "image_size": size,
            "shots": shots,
            "precision": manifest["precision"],
            "weights": manifest["weights"]["source"],
            "models": [*STAGE_ORDER, PIPELINE_MODEL],
            "stages": {name: {key: entry[key] for key in ("backend", "precision", "file")} for name, entry in stages.items()},
            "pipeline": {"model": PIPELINE_MODEL, "inputs": inputs, "outputs": outputs, "max_batch_size": pipeline_batch,
                         "support_cache_size": support_cache_size},
        }
        with open(os.path.join(tmp, MARKER), "w") as handle:
            json.dump(description, handle, indent=2)
        _prepare_out(out)  # still replaceable now that the new one is complete
        replace_folder(tmp, out)
        return description


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
