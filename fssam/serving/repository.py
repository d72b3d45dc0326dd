"""`fssam repository`: a self-contained Triton model repository from an export folder.

Layout (REPO), every model versioned (folder 1/, `version_policy: latest 1`):
  fssam/config.pbtxt            the ensemble clients call: validate -> support_encoder -> query_segmenter
  fssam/1/                      (ensembles have no files)
  validate/config.pbtxt         Python backend (numpy only): mask values -> INVALID_ARGUMENT; 255 -> 0
  validate/1/model.py
  support_encoder/config.pbtxt  deployable graph 1, Triton's response cache on: the support-set cache
  support_encoder/1/model.*     model.onnx | model.xml + model.bin | model.plan | model.pt2 (model.b<N>.pt2: CUDA
                                batch buckets) (+ model.py, Python backends)
  support_encoder/warmup/*      raw input files of model_warmup (a real episode)
  query_segmenter/...           deployable graph 2, same layout
  fssam_repository.json         what was written: backend, precision per graph, shapes, weights

Request contract (the `fssam` ensemble): query UINT8 (B,3,S,S), support_images UINT8 (B,K,3,S,S),
support_masks UINT8 (B,K,S,S) with 0 = background, 1 = foreground, 255 = ignore; output logits
FP32 (B,1,S,S). Backends of the two graphs:
  python-ort       Python backend running ONNX Runtime on CPU (the nvidia-pytriton wheel's tritonserver)
  python-openvino  Python backend running OpenVINO on CPU at --precision fp32 | bf16 (the graph gate's
                   choice); same server
  onnxruntime      Triton's ONNX Runtime backend (official containers; GPU, or CPU with device="cpu";
                   optional TensorRT execution accelerator)
  openvino         Triton's OpenVINO backend (official containers, CPU)
  tensorrt         Triton's TensorRT backend, the graph engines of `fssam export --tensorrt` (GPU); engines
                   holding the fssam::SCMA plugin's AOT kernel load as they are, JIT ones are refused
  python-torch     Python backend running torch on the AOTInductor packages of `fssam export --aoti P`
                   (--precision fp32 | bf16 | fp16), CPU or the GPU they were built on, with the torch
                   that built them; this machine's server
  torch-aoti       Triton's PyTorch backend, platform torch_aoti (official containers from 26.05, beta):
                   the same packages, one episode per request (the backend's limit)
--max-batch is at most the export's own limit (manifest["max_batch"]).
The Python models import numpy, their runtime and triton_python_backend_utils only; no file names a
path of the machine that wrote them.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np

from fssam.errors import ConfigError, InputError
from fssam.files import (check_replaceable, make_parents, partial_folder, read_json, relative_paths, replace_folder,
                         written_files)
from fssam.runtime.contract import DEFAULT_MAX_BATCH, GRAPH_ORDER, MAX_BATCH_LIMIT
from fssam.runtime.manifest import MANIFEST, file_sha256, load_manifest, weights_line
from fssam.runtime.runners import openvino as ov_runner
from fssam.serving import ENSEMBLE_MODEL, WEIGHTS_PARAMETER

BACKENDS = ("plan", "python-ort", "python-openvino", "python-torch", "onnxruntime", "openvino", "tensorrt",
            "torch-aoti")
PLAN = "plan"  # each graph on the backend of the export's graph plan (python-ort / python-openvino)
OPENVINO_BACKENDS = ("python-openvino", "openvino")
PYTHON_BACKENDS = ("python-ort", "python-openvino", "python-torch")  # templates/graph_model.py in the Python backend
RUNTIME_OF = {"python-ort": "onnxruntime", "python-openvino": "openvino", "python-torch": "torch"}  # its sections
TORCH_BACKENDS = ("python-torch", "torch-aoti")  # the AOTInductor packages of `fssam export --aoti`
AOTI_EPISODES = 1  # torch-aoti: Triton's PyTorch backend runs PT2 packages at batch size 1 only (see _torch_config)
VALIDATE_MODEL = "validate"
MARKER = "fssam_repository.json"
REPOSITORY_FORMAT = "fssam-triton-repository/2"
OLDER_FORMATS = ("fssam-triton-repository/1",)
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "uint8": "TYPE_UINT8"}
# --max-batch: at most the export's own limit (manifest["max_batch"], `fssam export --max-batch`),
# which its ONNX files, TensorRT profiles and runners share; exports made before it was recorded
# admit the older fixed limits: 64 (ONNX) and 8 (TensorRT profiles).
LEGACY_MAX_BATCH = {"onnx": MAX_BATCH_LIMIT, "tensorrt": 8}
TEMPLATES = os.path.join(os.path.dirname(__file__), "templates")
WARMUP_SEED = 0
SUPPORT_KEY = "support_key"  # validate's HMAC-SHA256 of a support set (templates/validate_model.py)
KEY_BYTES = 32
NATIVE_NO_CACHE = ("no support cache: Triton's response-cache key is a 64-bit non-cryptographic hash that clients "
                   "can make collide, so the cache is keyed by validate's HMAC of the support set, an input that "
                   "only the Python backends' support_encoder takes (a native backend would pass it to the graph); "
                   "serve python-ort, python-openvino or python-torch for a support cache")


# ---------------------------------------------------------------- config.pbtxt text

def _dims(shape) -> str:
    return "[ " + ", ".join(str(int(d)) for d in shape) + " ]"


def _tensors(kind: str, entries: list) -> str:
    items = [f'  {{\n    name: "{e["name"]}"\n    data_type: {e["data_type"]}\n    dims: {_dims(e["dims"])}\n  }}'
             for e in entries]
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def _parameters(params: dict) -> str:
    return "".join(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: {json.dumps(str(value))} }}\n}}\n'
                   for key, value in params.items())


def _warmup(inputs: list, batched: bool) -> str:
    """model_warmup: one batch-1 request from the raw files under <model>/warmup/ (named as the inputs)."""
    lines = ['model_warmup [\n  {\n    name: "episode"\n    batch_size: 1\n']
    for entry in inputs:
        dims = entry["dims"][1:] if not batched else entry["dims"]  # max_batch_size 0: the -1 batch dim is 1
        dims = [1] + list(dims) if not batched else dims
        lines.append(f'    inputs {{\n      key: "{entry["name"]}"\n      value: {{\n        data_type: {entry["data_type"]}\n'
                     f'        dims: {_dims(dims)}\n        input_data_file: "{entry["name"]}"\n      }}\n    }}\n')
    lines.append("  }\n]\n")
    return "".join(lines)


def _header(name: str, max_batch: int) -> str:
    return f'name: "{name}"\nmax_batch_size: {max_batch}\nversion_policy: {{ latest {{ num_versions: 1 }} }}\n'


def _batching(max_batch: int, queue_delay_us: int) -> str:
    return f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}\n" if max_batch else ""


def _instances(count: int, kind: str) -> str:
    return f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]\n"


def _io(entries: list, batched: bool) -> list:
    """Config tensors from manifest specs ("batch" first): without batching the batch is a -1 dim."""
    out = []
    for entry in entries:
        if entry["shape"][0] != "batch":
            raise InputError(f"tensor {entry['name']}: dim 0 is {entry['shape'][0]!r}, expected 'batch'")
        out.append({"name": entry["name"], "data_type": TRITON_DTYPES[entry["dtype"]],
                    "dims": ([] if batched else [-1]) + list(entry["shape"][1:])})
    return out


# ---------------------------------------------------------------- checks

def _repository_owned(out: str) -> tuple[set, set]:
    """(files, no folders) of the complete repository at `out`: its marker and the files it lists as
    written (a file someone added, in a model folder too, makes it not replaceable)."""
    for format in (REPOSITORY_FORMAT, *OLDER_FORMATS):  # an older fssam's repository may be replaced too
        try:
            description = read_json(os.path.join(out, MARKER), format)
            break
        except ValueError as reason:
            error = reason
    else:
        raise ValueError(f"{MARKER}: {error}") from None
    models = description.get("models")
    if not isinstance(models, list) or not all(isinstance(m, str) and m and os.sep not in m and m not in (".", "..")
                                               for m in models):
        raise ValueError(f"{MARKER} lists no models")
    files = description.get("files")
    if not relative_paths(files):
        raise ValueError(f"{MARKER} does not list the files it wrote (an older fssam's repository: remove it "
                         "yourself, or choose another --out)")
    return {MARKER, *files}, set()


def remove_repository(path: str) -> None:
    """Delete the complete fssam repository at `path`; InputError, touching nothing, if it is not
    one or holds anything it does not list."""
    check_replaceable(path, "an fssam model repository", _repository_owned)
    shutil.rmtree(path)


def _prepare_out(out: str) -> str:
    given, out = out, os.path.abspath(out)
    make_parents(out, "--out", given)  # mkdir -p
    check_replaceable(out, "an fssam model repository", _repository_owned)
    return out


def _check_servable(artifacts: str, manifest: dict, backend: str) -> None:
    if not manifest.get("graphs") or any(name not in manifest["graphs"] for name in GRAPH_ORDER):
        raise InputError(f"{artifacts!r} has no deployable graphs (support_encoder, query_segmenter): export it "
                         "again with this fssam version")
    if manifest["precision"] == "bf16" and backend != "tensorrt":
        raise ConfigError("bf16 exports are served by the tensorrt backend only: ONNX Runtime has no bf16 kernels "
                          "on the CPU and lacks several on the GPU; export fp32 (or fp16) for this backend")
    if backend in OPENVINO_BACKENDS and manifest["precision"] != "fp32":
        raise ConfigError(f"OpenVINO backends serve fp32 exports (their precision is a compile hint); this export "
                          f"is {manifest['precision']}: export with --precision fp32")
    if backend == "tensorrt":
        engines = manifest.get("tensorrt", {}).get("engines", {})
        if any(name not in engines for name in GRAPH_ORDER):
            raise InputError(f"{artifacts!r} has no TensorRT engines of the graphs: run `fssam export --tensorrt` on "
                             "the GPU server (engines are specific to the GPU and TensorRT version), or use "
                             "--backend onnxruntime")
        kinds = graph_plugins(manifest)
        jit = [name for name, kind in kinds.items() if kind == "jit"]  # in GRAPH_ORDER
        unknown = [name for name, kind in kinds.items() if kind == "unknown"]
        if jit:
            raise ConfigError(f"{artifacts!r}: the engines of {', '.join(jit)} hold fssam::SCMA plugin nodes with the "
                              "plugin's JIT implementation, a Python callback (tensorrt.plugin + torch + the Triton "
                              "kernel) that only a Python process which registered the plugin can run; Triton's "
                              "TensorRT backend runs engines from C++. Export with the AOT plugin (the kernel is "
                              "compiled into the engine) or --scma-node decomposed for serving")
        if unknown:
            raise ConfigError(f"{artifacts!r}: its engines may hold fssam::SCMA plugin nodes (--scma-node custom) "
                              f"and its manifest does not say whether {', '.join(unknown)} use the plugin's AOT "
                              "kernel (embedded in the engine, servable) or its JIT Python callback (not servable "
                              "by Triton's TensorRT backend): export again with this fssam version")


def graph_plugins(manifest: dict) -> dict:
    """{graph: None | "aot" | "jit" | "unknown"}: the fssam::SCMA plugin implementation each graph
    engine holds, as the export recorded it (fssam.export.tensorrt.plugin_kind); "unknown" for an
    older export with --scma-node custom that did not record it."""
    engines = manifest.get("tensorrt", {}).get("engines", {})
    kinds = {}
    for name in GRAPH_ORDER:
        entry = engines.get(name, {})
        if "plugin" in entry:
            kinds[name] = entry["plugin"]
        else:
            kinds[name] = "unknown" if manifest.get("scma_node") == "custom" else None
    return kinds


def max_batch_limit(manifest: dict, backend: str) -> int:
    """Episodes per request the export admits on `backend`: its recorded limit, or an older export's."""
    if "max_batch" in manifest:
        return int(manifest["max_batch"])
    return LEGACY_MAX_BATCH["tensorrt" if backend == "tensorrt" else "onnx"]


AOT_NOTE = ("# fssam::SCMA runs as the TensorRT plugin's AOT kernel: its PTX is compiled into model.plan, so\n"
            "# TensorRT launches it itself; no plugin library (--backend-config=tensorrt,plugins=...), no\n"
            "# LD_PRELOAD and no Python are needed. The engine needs the TensorRT version and GPU it was built with.\n")


def _precision(manifest: dict, backend: str, precision: str | None) -> str:
    """The asked precision: an OpenVINO plan's (default fp32), int8 (the graph plan's int8 graphs),
    the graph plan's own mix ("plan"), else the export's own."""
    if backend == PLAN:
        if "graph_plan" not in manifest:
            raise ConfigError("this export has no graph plan: export with `fssam export --plan` (or run `fssam "
                              "deploy`), or name a --backend")
        if precision is not None:
            raise ConfigError("--backend plan serves each graph at the precision its plan chose: leave --precision out")
        return PLAN
    if backend in TORCH_BACKENDS:
        precision = precision or "fp32"
        if precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision {precision!r}: the AOTInductor packages are fp32, bf16 or fp16")
        return precision
    if backend in OPENVINO_BACKENDS:
        precision = precision or "fp32"
        if precision not in ("fp32", "bf16", "int8"):
            raise ConfigError(f"precision {precision!r}: the served graphs run OpenVINO fp32, bf16 or int8")
        return precision
    if precision == "int8" and backend in ("python-ort", "onnxruntime") and manifest["precision"] == "fp32":
        return precision
    if precision not in (None, manifest["precision"]):
        raise ConfigError(f"backend {backend} runs the export's own precision ({manifest['precision']}), not "
                          f"{precision}: --precision is for python-openvino and openvino")
    return manifest["precision"]


def _int8_files(manifest: dict, runtime: str) -> dict:
    """{graph: file} of `runtime`'s gated int8 graphs; every graph must have one."""
    from fssam.runtime.runners.onnxruntime import require_int8_graphs

    files = require_int8_graphs(manifest, runtime)
    missing = [name for name in GRAPH_ORDER if name not in files]
    if missing:
        tried = manifest["graph_plan"]["candidates"]
        why = "; ".join(f"{name}: {', '.join(tried[name][f'{runtime} int8']['failures'][:1]) or 'outside the margin'}"
                        for name in missing if f"{runtime} int8" in tried.get(name, {}))
        raise ConfigError(f"{runtime} int8 of {', '.join(missing)} failed its gate ({why or 'not tried'}): serve "
                          "--backend plan (each graph on its fastest gated candidate) or another precision")
    return files


def _plan(manifest: dict, backend: str, precision: str) -> dict:
    """{graph: {"precision", "file"} (+ "backend" for the graph plan)}: what each graph model runs."""
    if backend == PLAN:
        chosen = manifest["graph_plan"]["chosen"]
        plan = {name: {"precision": chosen[name]["precision"], "file": chosen[name]["file"],
                       "backend": chosen[name]["backend"]} for name in GRAPH_ORDER}
        if any(e["backend"] == "python-openvino" and e["precision"] == "bf16" for e in plan.values()):
            ov_runner.require_native_bf16()
        return plan
    if precision == "int8":
        runtime = "openvino" if backend in OPENVINO_BACKENDS else "onnxruntime"
        return {name: {"precision": "int8", "file": file} for name, file in _int8_files(manifest, runtime).items()}
    if backend in OPENVINO_BACKENDS:
        plan = ov_runner.plan(manifest, precision)
        plan = {name: plan[name] for name in GRAPH_ORDER}
        if backend == "python-openvino" and any(entry["precision"] == "bf16" for entry in plan.values()):
            ov_runner.require_native_bf16()  # this machine serves it
        return plan
    if backend == "tensorrt":
        engines = manifest["tensorrt"]["engines"]
        return {name: {"precision": precision, "file": engines[name]["file"]} for name in GRAPH_ORDER}
    if backend in TORCH_BACKENDS:
        entry = torch_packages(manifest, backend, precision)
        return {name: {"precision": precision, "file": None, "packages": entry["graphs"][name]["files"]}
                for name in GRAPH_ORDER}
    return {name: {"precision": precision, "file": manifest["graphs"][name]["file"]} for name in GRAPH_ORDER}


def torch_packages(manifest: dict, backend: str, precision: str) -> dict:
    """manifest["aoti"][precision] where it can be served: gated packages of both graphs; for
    python-torch (this machine's server) built by this torch for a device this machine has
    (fssam.runtime.runners.torch.check_where). One ConfigError line otherwise."""
    entry = manifest.get("aoti", {}).get(precision)
    if entry is None:
        raise ConfigError(f"this export has no AOTInductor {precision} packages for --backend {backend}: export them "
                          f"with `fssam export --aoti {precision}` (--device cuda on the GPU that serves them)")
    if not entry.get("passed") or any(name not in entry.get("graphs", {}) for name in GRAPH_ORDER):
        raise ConfigError(f"the AOTInductor {precision} packages of this export failed their gate (nothing to serve): "
                          f"export again with `fssam export --aoti {precision}`, or serve another --precision")
    if backend == "python-torch":
        from fssam.runtime.runners.torch import check_where

        check_where(entry, precision)
    elif precision == "fp16":
        raise ConfigError("--backend torch-aoti serves fp32 and bf16 packages: fp16 ones take and give fp16 tensors, "
                          "Triton's PyTorch backend casts nothing, and the ensemble passes fp32 between the graphs; "
                          "serve fp16 with --backend python-torch")
    return entry


# ---------------------------------------------------------------- models

def _copy_model(artifacts: str, file: str, version: str, backend: str) -> str:
    """The graph's file into the version folder as model.onnx / model.xml + model.bin / model.plan."""
    if file.endswith(".xml"):
        shutil.copy2(os.path.join(artifacts, file[: -len(".xml")] + ".bin"), os.path.join(version, "model.bin"))
        name = "model.xml"
    else:
        name = "model.plan" if backend == "tensorrt" else "model.onnx"
    shutil.copy2(os.path.join(artifacts, file), os.path.join(version, name))
    return name


def _copy_packages(packages: dict, artifacts: str, version: str, backend: str) -> str:
    """A graph's AOTInductor package(s) into the version folder: model.pt2 (a CPU package, dynamic
    batch; torch-aoti: the batch-1 one), or model.b<N>.pt2 per CUDA batch bucket (python-torch);
    returns the config's model_file (the smallest bucket's)."""
    if "dynamic" in packages:
        chosen = {"model.pt2": packages["dynamic"]}
    elif backend == "torch-aoti":
        chosen = {"model.pt2": packages["1"]}
    else:
        chosen = {f"model.b{key}.pt2": packages[key] for key in sorted(packages, key=int)}
    for name, item in chosen.items():
        shutil.copy2(os.path.join(artifacts, item["file"]), os.path.join(version, name))
    return next(iter(chosen))


def _backend_config(backend: str, precision: str, model_file: str, threads: int, device: str,
                    accelerator: str | None, tensorrt_profile: dict | None = None) -> tuple[str, dict, str]:
    """(config header lines, parameters, instance kind) of one graph model. tensorrt_profile: the
    TensorRT accelerator's explicit shape range (trt_profile_*_shapes), so that no batch the server
    forms rebuilds an engine."""
    if backend == "python-ort":
        return 'backend: "python"\n', {"runtime": "onnxruntime", "model_file": model_file,
                                        "intra_op_threads": threads}, "KIND_CPU"
    if backend == "onnxruntime":
        header = 'backend: "onnxruntime"\n'
        if accelerator == "tensorrt":
            import uuid

            mode = {"fp16": "FP16"}.get(precision, "FP32")
            # Engine cache (ONNX Runtime's TensorRT EP options trt_engine_cache_enable / _path, which
            # Triton's onnxruntime backend accepts as accelerator parameters and passes on as given).
            # The backend has no model-folder mechanism: a relative path would be relative to
            # tritonserver's working directory, so the folder is a fixed path of the server (its /tmp,
            # writable in the official containers, whatever the user; ONNX Runtime creates only the
            # last level of the path). ONNX Runtime names engines after the model's file and tensor
            # names, not its weights: a folder of this model of this repository write (a random
            # name) keeps another repository's, or an earlier write's, engines out of it.
            cache = f"/tmp/fssam-ort-trt-{uuid.uuid4().hex[:16]}"
            params = {"precision_mode": mode, "max_workspace_size_bytes": "4294967296",
                      "trt_engine_cache_enable": "1", "trt_engine_cache_path": cache}
            note = ("# TensorRT execution accelerator: its engines are built at the first load and cached in\n"
                    f"# {cache}, a folder of this model of this repository write only (ONNX Runtime\n"
                    "# names engines after file and tensor names, not weights); later loads reuse them. Mount a\n"
                    "# volume there (or at /tmp) to keep them across container restarts.\n")
            if precision == "fp32":
                # TensorRT allows TF32 for fp32 layers by default, and neither ONNX Runtime's TensorRT EP
                # nor Triton's onnxruntime backend has a parameter for it (the backend refuses unknown
                # ones): NVIDIA_TF32_OVERRIDE=0 in tritonserver's environment keeps TensorRT (and cuBLAS /
                # cuDNN of the CUDA EP's nodes) off TF32. Engines are cached: it must be set before they
                # are built.
                note += ("# fp32 export: start tritonserver with NVIDIA_TF32_OVERRIDE=0 in its environment\n"
                         "# (docker run -e NVIDIA_TF32_OVERRIDE=0 ...) before the engines are built: TensorRT uses\n"
                         "# TF32 for fp32 layers by default and this backend has no parameter to turn it off;\n"
                         "# engines built with TF32 stay cached until the folder above is removed.\n")
            header = note + header
            header += ("optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
                       '        name: "tensorrt"\n'
                       + "".join(f'        parameters {{ key: "{key}" value: "{value}" }}\n'
                                 for key, value in [*params.items(), *sorted((tensorrt_profile or {}).items())])
                       + "      }\n    ]\n  }\n}\n")
        return header, {}, "KIND_GPU" if device == "gpu" else "KIND_CPU"
    if backend == "tensorrt":
        return 'backend: "tensorrt"\nplatform: "tensorrt_plan"\n', {}, "KIND_GPU"
    properties = ov_runner.compile_properties(precision, threads or None)
    if backend == "python-openvino":
        return 'backend: "python"\n', {"runtime": "openvino", "model_file": model_file,
                                        "openvino_properties": json.dumps(properties)}, "KIND_CPU"
    header = 'backend: "openvino"\n' + ('default_model_filename: "model.onnx"\n' if model_file == "model.onnx" else "")
    return header, native_openvino_parameters(properties), "KIND_CPU"


def native_openvino_parameters(properties: dict) -> dict:
    """compile_model properties as the config parameters of Triton's OpenVINO backend: it reads
    PERFORMANCE_HINT, INFERENCE_NUM_THREADS and HINT_BF16 (only "YES"); it has no parameter that
    pins f32 (nor a compile cache)."""
    params = {key: properties[key] for key in ("PERFORMANCE_HINT", "INFERENCE_NUM_THREADS") if key in properties}
    if properties.get("INFERENCE_PRECISION_HINT") == "bf16":
        params["HINT_BF16"] = "YES"
    return params


def _torch_config(backend: str, precision: str, entry: dict, packages: dict, model_file: str,
                  threads: int) -> tuple[str, dict, str]:
    """(config header lines, parameters, instance kind) of a graph model on AOTInductor packages
    (entry: manifest["aoti"][precision]): on the GPU where they were built for CUDA."""
    kind = "KIND_GPU" if entry["device"] == "cuda" else "KIND_CPU"
    where = f"torch {entry['torch']} on " + (f"a CUDA GPU ({entry.get('gpu')})" if entry["device"] == "cuda"
                                              else "the CPU")
    if backend == "python-torch":
        buckets = ",".join(sorted((key for key in packages if key != "dynamic"), key=int))
        return 'backend: "python"\n', {"runtime": "torch", "model_file": model_file, "torch_version": entry["torch"],
                                       "torch_device": entry["device"], "torch_gpu": entry.get("gpu", ""),
                                       "torch_buckets": buckets,
                                       "torch_float": "float16" if precision == "fp16" else "float32",
                                       "intra_op_threads": threads}, kind
    # triton-inference-server/pytorch_backend, README "AOT Inductor Support (Beta)" and src/pt2: model.pt2
    # loads with platform "torch_aoti" (from 26.03); tensors are named by their position in the package's
    # call, INPUT__<i> / OUTPUT__<i> (26.05 maps the call spec's ordinals; 26.03 and 26.04 compare the
    # config's input count with the 2 entries of get_call_spec(), so query_segmenter's 5 inputs need
    # 26.05); batch sizes above 1 are not supported yet.
    note = ("# Triton's PyTorch backend, platform torch_aoti (beta; official containers from 26.05: 26.03 and\n"
            "# 26.04 load only packages of 2 inputs). It runs AOTInductor packages one episode per request\n"
            "# (batch sizes above 1 are not supported yet), so every model of this repository has\n"
            f"# max_batch_size 0 and a batch dimension of {AOTI_EPISODES}. Tensors are named by their position in the\n"
            "# package's call (INPUT__<i>, OUTPUT__<i>). The package loads only with\n"
            f"# {where}: export it in the NGC PyTorch container of the server's release.\n")
    return note + 'backend: "pytorch"\nplatform: "torch_aoti"\n', {}, kind


def _write_raw(folder: str, arrays: dict) -> None:
    """Warm-up inputs as raw little-endian files named after the inputs."""
    os.makedirs(folder)
    for name, array in arrays.items():
        np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tofile(os.path.join(folder, name))


def _warmup_episode(artifacts: str, manifest: dict) -> dict:
    """A real episode for model_warmup: noise images, a square mask, and the support tensors the
    support_encoder graph gives for them (ONNX Runtime on the exported graph)."""
    from fssam.runtime import open_runner

    size, shots = int(manifest["config"]["image_size"]), int(manifest["shots"])
    rng = np.random.default_rng(WARMUP_SEED)
    masks = np.zeros((1, shots, size, size), np.uint8)
    masks[:, :, size // 4: size // 2, size // 4: size // 2] = 1
    arrays = {"query": rng.integers(0, 256, (1, 3, size, size), dtype=np.uint8),
              "support_images": rng.integers(0, 256, (1, shots, 3, size, size), dtype=np.uint8),
              "support_masks": masks}
    if manifest["precision"] != "bf16":
        runner = open_runner("onnxruntime", artifacts, verify=False)
        features, memory, pointers = runner.support_encoder(arrays["support_images"], masks)
    else:  # bf16 (served by TensorRT): ONNX Runtime would run only the slow fp32-arithmetic copy on the
        # CPU; a warm-up needs values of the right shape and dtype (fp32 between the graphs), not these
        specs = {e["name"]: e for e in manifest["graphs"]["support_encoder"]["outputs"]}
        features, memory, pointers = (rng.standard_normal((1, *specs[n]["shape"][1:])).astype(np.float32)
                                      for n in ("support_features", "support_memory", "support_pointers"))
    arrays.update(support_features=features, support_memory=memory, support_pointers=pointers,
                  support_key=rng.integers(0, 256, (1, KEY_BYTES), dtype=np.uint8))  # any 32 bytes warm it up
    return arrays


def _write_graph(tmp, artifacts, manifest, name, entry, backend, options, episode) -> dict:
    backend = entry.get("backend", backend)  # the graph plan: each graph its own
    spec = manifest["graphs"][name]
    version = os.path.join(tmp, name, "1")
    os.makedirs(version)
    if backend in TORCH_BACKENDS:
        model_file = _copy_packages(entry["packages"], artifacts, version, backend)
    else:
        model_file = _copy_model(artifacts, entry["file"], version, backend)
    if backend in PYTHON_BACKENDS:
        with open(os.path.join(version, "model.py"), "w") as handle:
            handle.write(graph_model_source(RUNTIME_OF[backend]))
    profile = None
    if backend == "onnxruntime" and options["accelerator"] == "tensorrt":
        from fssam.runtime.runners.onnxruntime import tensorrt_profile_options

        profile = tensorrt_profile_options(name, spec, max(1, options["max_batch"]), int(manifest["shots"]))
    if backend in TORCH_BACKENDS:
        header, params, kind = _torch_config(backend, entry["precision"], options["aoti"], entry["packages"],
                                             model_file, options["threads"])
    else:
        header, params, kind = _backend_config(backend, entry["precision"], model_file, options["threads"],
                                               options["device"], options["accelerator"], profile)
    if backend == "tensorrt" and graph_plugins(manifest)[name] == "aot":
        header = AOT_NOTE + header
    batched = options["max_batch"] > 0
    inputs, outputs = _io(spec["inputs"], batched), _io(spec["outputs"], batched)
    cached = name == "support_encoder" and options["cache"] and backend in PYTHON_BACKENDS
    if cached:  # validate's HMAC of the support set: part of Triton's cache key, not of the graph
        inputs.append(_key_tensor(batched))
        params["cache_key_inputs"] = SUPPORT_KEY
    # torch-aoti: the tensors named by position (see _torch_config), a batch dimension of 1
    names = ({e["name"]: f"{prefix}__{i}" for prefix, entries in (("INPUT", inputs), ("OUTPUT", outputs))
              for i, e in enumerate(entries)} if backend == "torch-aoti" else {})
    config_inputs, config_outputs = (_fixed(entries, names, options["episodes"]) for entries in (inputs, outputs))
    _write_raw(os.path.join(tmp, name, "warmup"), {names.get(e["name"], e["name"]): episode[e["name"]] for e in inputs})
    cache = 'response_cache {\n  enable: true\n}\n' if cached else ""
    text = (_header(name, options["max_batch"]) + header + _tensors("input", config_inputs)
            + _tensors("output", config_outputs) + _batching(options["max_batch"], options["queue_delay_us"]) + cache
            + _instances(options["instances"], kind) + _parameters(params) + _warmup(config_inputs, batched))
    with open(os.path.join(tmp, name, "config.pbtxt"), "w") as handle:
        handle.write(text)
    return {"backend": backend, "precision": entry["precision"], "file": model_file,
            "inputs": _fixed(inputs, {}, options["episodes"]), "outputs": _fixed(outputs, {}, options["episodes"]),
            **({"tensor_names": names} if names else {})}


def _fixed(entries: list, names: dict, episodes: int | None) -> list:
    """Config tensors renamed by `names`, with a batch dimension of `episodes` where the batch is fixed."""
    return [dict(e, name=names.get(e["name"], e["name"]),
                 dims=[episodes, *e["dims"][1:]] if episodes else e["dims"]) for e in entries]


def graph_model_source(runtime: str) -> str:
    """templates/graph_model.py with only the section of `runtime` (between its `# >>> runtime R` and
    `# <<< runtime R` lines): a model file imports the runtime it runs and no other."""
    with open(os.path.join(TEMPLATES, "graph_model.py")) as handle:
        lines, keep = [], True
        for line in handle:
            if line.startswith(("# >>> runtime ", "# <<< runtime ")):
                keep = line.startswith("# <<<") or line.split()[-1] == runtime
                if line.split()[-1] != runtime:
                    continue
            if keep:
                lines.append(line)
    if f'RUNTIMES["{runtime}"] = ' not in "".join(lines):
        raise ValueError(f"templates/graph_model.py has no section of runtime {runtime!r}")
    return re.sub(r"\n{4,}", "\n\n\n", "".join(lines))  # the blank lines around a dropped section


def _key_tensor(batched: bool) -> dict:
    return {"name": SUPPORT_KEY, "data_type": "TYPE_UINT8", "dims": ([] if batched else [-1]) + [KEY_BYTES]}


def _write_validate(tmp: str, images: dict, masks: dict, options: dict, episode: dict) -> None:
    version = os.path.join(tmp, VALIDATE_MODEL, "1")
    os.makedirs(version)
    shutil.copy2(os.path.join(TEMPLATES, "validate_model.py"), os.path.join(version, "model.py"))
    binary = dict(masks, name="binary_masks")
    batched = options["max_batch"] > 0
    _write_raw(os.path.join(tmp, VALIDATE_MODEL, "warmup"),
               {name: episode[name] for name in ("support_images", "support_masks")})
    text = (_header(VALIDATE_MODEL, options["max_batch"]) + _episodes_note(options["episodes"]) + 'backend: "python"\n'
            + _tensors("input", [images, masks]) + _tensors("output", _fixed([binary, _key_tensor(batched)], {},
                                                                              options["episodes"]))
            + _batching(options["max_batch"], options["queue_delay_us"])
            + _instances(1, "KIND_CPU") + _warmup([images, masks], batched))
    with open(os.path.join(tmp, VALIDATE_MODEL, "config.pbtxt"), "w") as handle:
        handle.write(text)


def _episodes_note(episodes: int | None) -> str:
    return ("# one episode per request (a batch dimension of 1): Triton's PyTorch backend runs the graphs'\n"
            "# AOTInductor packages (platform torch_aoti) at batch size 1 only\n") if episodes else ""


def _map(kind: str, pairs: dict) -> str:
    return "".join(f'      {kind} {{\n        key: "{key}"\n        value: "{value}"\n      }}\n'
                   for key, value in pairs.items())


def _step(model: str, inputs: dict, outputs: dict) -> str:
    return (f'    {{\n      model_name: "{model}"\n      model_version: -1\n' + _map("input_map", inputs)
            + _map("output_map", outputs) + "    }")


def _graph_step(graphs: dict, model: str, inputs: dict, outputs: dict) -> str:
    names = graphs[model].get("tensor_names", {})
    return _step(model, {names.get(k, k): v for k, v in inputs.items()},
                 {names.get(k, k): v for k, v in outputs.items()})


def _write_ensemble(tmp: str, graphs: dict, max_batch: int, weights: str, episodes: int | None = None) -> dict:
    """The `fssam` ensemble: validate -> support_encoder -> query_segmenter, all in the server; its
    WEIGHTS_PARAMETER says which weights it serves. A graph model's tensor_names (torch-aoti) name its
    side of the steps' maps."""
    support, query = graphs["support_encoder"], graphs["query_segmenter"]
    inputs = [query["inputs"][0], *support["inputs"][:2]]  # query, support_images, support_masks
    outputs = query["outputs"]
    support_outputs = [e["name"] for e in support["outputs"]]
    keyed = any(e["name"] == SUPPORT_KEY for e in support["inputs"])
    key = {SUPPORT_KEY: SUPPORT_KEY} if keyed else {}
    steps = [
        _step(VALIDATE_MODEL, {"support_images": "support_images", "support_masks": "support_masks"},
              {"binary_masks": "binary_masks", **key}),
        _graph_step(graphs, "support_encoder", {"support_images": "support_images", "support_masks": "binary_masks",
                                                **key}, {name: name for name in support_outputs}),
        _graph_step(graphs, "query_segmenter", {"query": "query", **{name: name for name in support_outputs},
                                                "support_masks": "binary_masks"}, {"logits": "logits"}),
    ]
    text = (_header(ENSEMBLE_MODEL, max_batch) + _episodes_note(episodes) + 'platform: "ensemble"\n'
            + _tensors("input", inputs)
            + _tensors("output", outputs) + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"
            + _parameters({WEIGHTS_PARAMETER: weights}))
    os.makedirs(os.path.join(tmp, ENSEMBLE_MODEL, "1"))
    with open(os.path.join(tmp, ENSEMBLE_MODEL, "config.pbtxt"), "w") as handle:
        handle.write(text)
    return {"model": ENSEMBLE_MODEL, "inputs": inputs, "outputs": outputs, "max_batch_size": max_batch}


def write_repository(
    artifacts: str,
    out: str,
    backend: str = "python-ort",
    precision: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    instances: int = 1,
    threads: int = 0,
    queue_delay_us: int = 500,
    cache: bool = True,
    device: str = "gpu",
    accelerator: str | None = None,
) -> dict:
    """Write the repository to `out` (replaced atomically, only over an earlier fssam repository);
    returns the description written to MARKER.

    `precision`: the OpenVINO precision of python-openvino / openvino (fp32 or bf16; default fp32);
    the other backends run the export's own. `max_batch`: episodes per request and per dynamic
    batch (ignored by the native openvino backend, which keeps the batch dynamic with max_batch_size
    0). `threads`: ONNX Runtime / OpenVINO threads per graph instance (0: the runtime's default).
    `cache`: Triton's response cache on support_encoder (the server needs --cache-config; `fssam
    serve` passes it). `device`, `accelerator` (None | "tensorrt"): the native onnxruntime backend's
    instance kind and execution accelerator. python-torch / torch-aoti: `precision` picks the
    AOTInductor packages (default fp32); torch-aoti serves one episode per request (max_batch is
    ignored)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if device not in ("gpu", "cpu"):
        raise ConfigError(f"device {device!r}: expected gpu or cpu")
    if accelerator not in (None, "tensorrt") or (accelerator and (backend != "onnxruntime" or device != "gpu")):
        raise ConfigError("the TensorRT execution accelerator is for --backend onnxruntime on a GPU")
    for label, value, low, high in (("max batch", max_batch, 1, MAX_BATCH_LIMIT), ("instances", instances, 1, 64),
                                    ("threads", threads, 0, 1024), ("queue delay", queue_delay_us, 0, 10**7)):
        if not low <= value <= high:
            raise ConfigError(f"{label} must be in {low}..{high}, got {value}")
    manifest = load_manifest(artifacts)
    _check_servable(artifacts, manifest, backend)
    limit = max_batch_limit(manifest, backend)
    if backend not in ("openvino", "torch-aoti") and max_batch > limit:  # those run unbatched (see below)
        raise ConfigError(f"max batch {max_batch} is over the export's limit of {limit} episodes per call (its ONNX "
                          f"files{', TensorRT profiles' if backend == 'tensorrt' else ''} and runners admit no more): "
                          f"use --max-batch {limit} or less, or export again with `fssam export --max-batch "
                          f"{max_batch}`")
    precision = _precision(manifest, backend, precision)
    if precision == "int8" and accelerator:
        raise ConfigError("the int8 graphs are ONNX Runtime dynamic quantization (MatMulInteger), which TensorRT "
                          "does not run: leave --accelerator out")
    plan = _plan(manifest, backend, precision)
    out = _prepare_out(out)
    # native openvino: a fixed batch otherwise (see native_openvino_parameters); torch-aoti: one episode
    batch = 0 if backend in ("openvino", "torch-aoti") else max_batch
    options = {"max_batch": batch, "instances": instances, "threads": threads, "queue_delay_us": queue_delay_us,
               "cache": cache, "device": device, "accelerator": accelerator,
               "episodes": AOTI_EPISODES if backend == "torch-aoti" else None,
               "aoti": manifest["aoti"][precision] if backend in TORCH_BACKENDS else None}
    episode = _warmup_episode(artifacts, manifest)
    with partial_folder(out, markers=(MARKER,)) as tmp:
        graphs = {name: _write_graph(tmp, artifacts, manifest, name, plan[name], backend, options, episode)
                  for name in GRAPH_ORDER}
        _write_validate(tmp, *graphs["support_encoder"]["inputs"][:2], options, episode)
        ensemble = _write_ensemble(tmp, graphs, batch, weights_line(manifest), options["episodes"])
        keyed = any(e["name"] == SUPPORT_KEY for e in graphs["support_encoder"]["inputs"])
        description = {
            "format": REPOSITORY_FORMAT,
            "export": {"manifest_sha256": file_sha256(os.path.join(artifacts, MANIFEST)),
                       "fssam_version": manifest.get("fssam_version")},
            "backend": backend,
            "precision": precision,
            "config": manifest["config"]["name"],
            "image_size": int(manifest["config"]["image_size"]),
            "shots": int(manifest["shots"]),
            "export_precision": manifest["precision"],
            "weights": manifest["weights"]["source"],
            "weights_line": weights_line(manifest),
            "models": [ENSEMBLE_MODEL, VALIDATE_MODEL, *GRAPH_ORDER],
            "graphs": {name: {key: entry[key] for key in ("backend", "precision", "file")} for name, entry in graphs.items()},
            "ensemble": ensemble,
            "support_cache": (f"triton response cache on support_encoder, keyed by validate's HMAC ({SUPPORT_KEY})"
                              if keyed else None),
            **({"support_cache_note": NATIVE_NO_CACHE} if cache and not keyed else {}),
            "export_max_batch": limit,
            **({"scma_plugin": graph_plugins(manifest)} if backend == "tensorrt" else {}),
            **({"graph_plan": {name: f"{e['backend']} {e['precision']}" for name, e in plan.items()}}
               if backend == PLAN else {}),
            **({"openvino_gated": precision == "int8" or "graphs" in manifest.get("openvino", {}).get(precision, {})}
               if backend in OPENVINO_BACKENDS else {}),
            # where the AOTInductor packages load: only with this torch version, on this device (and GPU)
            **({"torch": {key: value for key, value in options["aoti"].items()
                          if key in ("torch", "device", "gpu", "cuda")}} if backend in TORCH_BACKENDS else {}),
            **({"episodes_per_request": AOTI_EPISODES,
                "tensor_names": {name: graphs[name]["tensor_names"] for name in GRAPH_ORDER}}
               if backend == "torch-aoti" else {}),
        }
        description["files"] = written_files(tmp, exclude=(MARKER,))
        with open(os.path.join(tmp, MARKER), "w") as handle:
            json.dump(description, handle, indent=2)
        _prepare_out(out)  # still replaceable now that the new one is complete
        replace_folder(tmp, out)
        return description


def read_repository(repo: str) -> dict:
    path = os.path.join(repo, MARKER)
    if not os.path.isfile(path):
        raise InputError(f"{repo!r} is not an fssam model repository (no {MARKER}; run `fssam repository` first)")
    try:
        description = read_json(path, REPOSITORY_FORMAT)
    except ValueError as reason:
        raise InputError(f"{path!r}: {reason}; write the repository again with `fssam repository`") from None
    return description
