"""The Triton serving path against a real tritonserver on loopback (tiny config).

The module exports the tiny config once (stages + the two deployable graphs), writes the
repository (ensemble `fssam`: validate -> support_encoder -> query_segmenter) and starts the
nvidia-pytriton wheel's tritonserver on it with the response cache. A server that cannot start
fails the tests. The native configs (onnxruntime, openvino, tensorrt) are checked by parsing them
with Triton's model-config protobuf: the wheel's server has none of those backends.
"""

import concurrent.futures
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fssam.model import get_config
from fssam.runtime.parity import FP32_MIN_IOU, fp32_limit, mask_iou, sample_episode

SIZE = 64
MODELS = ("fssam", "validate", "support_encoder", "query_segmenter")
TEMPLATES = os.path.join(os.path.dirname(__file__), "..", "fssam", "serving", "templates")
CACHE_MB = 64
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def _serve(folder, repository, **options):
    from fssam.serving.server import TritonServer

    triton = TritonServer(str(repository), http_port=0, grpc_port=0, log_path=str(folder / "tritonserver.log"),
                          cache_mb=CACHE_MB, **options)
    triton.start(timeout=240)  # raises ServingError with the log tail: a broken server fails the tests
    return triton


def _stop(triton):
    code = triton.stop()
    assert code == 0, f"tritonserver did not shut down cleanly (exit code {code}); log {triton.log_path}"


@pytest.fixture(scope="module")
def repository(tmp_path_factory, tiny_artifacts):
    from fssam.serving.repository import write_repository

    out = tmp_path_factory.mktemp("serving") / "repository"
    write_repository(tiny_artifacts[0], str(out), backend="python-ort")
    return out


@pytest.fixture(scope="module")
def server(repository):
    triton = _serve(repository.parent, repository)
    yield triton
    _stop(triton)


@pytest.fixture(scope="module")
def remote(server):
    from fssam.serving.client import RemoteFSSAM

    with RemoteFSSAM(server.grpc_url) as client:
        yield client


def episode(seed):
    return sample_episode(get_config("tiny"), 1, batch=1, seed=seed)


def _parse(path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(open(path).read(), model_config_pb2.ModelConfig())


def _parameters(config) -> dict:
    return {key: value.string_value for key, value in config.parameters.items()}


def _imports(path) -> set:
    from conftest import imported_modules

    return imported_modules(path)


# ---------------------------------------------------------------- the repository files

def test_repository_layout(repository, tiny_artifacts):
    """Versioned models, the ensemble's three steps, the response cache on support_encoder, warm-up
    from real input files, and no path of this machine in any file."""
    from fssam.export.onnx_export import machine_paths

    assert sorted(p.name for p in repository.iterdir()) == sorted([*MODELS, "fssam_repository.json"])
    for name in MODELS:
        config = _parse(repository / name / "config.pbtxt")
        assert config.name == name and config.version_policy.HasField("latest") and (repository / name / "1").is_dir()
        assert config.max_batch_size == 8
    ensemble = _parse(repository / "fssam" / "config.pbtxt")
    assert ensemble.platform == "ensemble"
    assert [step.model_name for step in ensemble.ensemble_scheduling.step] == ["validate", "support_encoder",
                                                                                "query_segmenter"]
    types = {t.name: (model_config_dtype(t.data_type), list(t.dims)) for t in [*ensemble.input, *ensemble.output]}
    assert types == {"query": ("TYPE_UINT8", [3, SIZE, SIZE]), "support_images": ("TYPE_UINT8", [1, 3, SIZE, SIZE]),
                     "support_masks": ("TYPE_UINT8", [1, SIZE, SIZE]), "logits": ("TYPE_FP32", [1, SIZE, SIZE])}
    support = _parse(repository / "support_encoder" / "config.pbtxt")
    assert support.response_cache.enable and support.HasField("dynamic_batching")
    assert not _parse(repository / "query_segmenter" / "config.pbtxt").response_cache.enable
    for name in ("validate", "support_encoder", "query_segmenter"):
        config = _parse(repository / name / "config.pbtxt")
        assert config.backend == "python" and config.instance_group and config.model_warmup
        for key, value in config.model_warmup[0].inputs.items():
            data = (repository / name / "warmup" / value.input_data_file).read_bytes()
            itemsize = 1 if model_config_dtype(value.data_type) == "TYPE_UINT8" else 4
            assert len(data) == itemsize * int(np.prod(value.dims)), key
    masks = np.fromfile(repository / "support_encoder" / "warmup" / "support_masks", np.uint8)
    assert set(np.unique(masks)) == {0, 1}  # a real episode, not random bytes
    roots = machine_paths() + [os.path.abspath(tiny_artifacts[0]), str(repository)]
    for folder, _, files in os.walk(repository):
        for file in files:
            data = open(os.path.join(folder, file), "rb").read()
            for root in roots:
                assert root.encode() not in data, f"{file} names {root}"


def test_repository_command_writes_what_its_flags_say(tmp_path, tiny_artifacts):
    """`fssam repository` as a user runs it: the flags reach the generated configs (parsed with
    Triton's own protobuf), it replaces its own repository, and refuses a folder of other files."""
    import subprocess
    import sys

    out = tmp_path / "repo"
    command = [sys.executable, "-m", "fssam.cli", "repository", "--artifacts", tiny_artifacts[0], "--out", str(out),
               "--max-batch", "4", "--instances", "2", "--max-queue-delay-us", "250", "--no-cache"]
    for _ in range(2):  # the second run replaces the first one's repository
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
    for name in ("support_encoder", "query_segmenter"):
        config = _parse(out / name / "config.pbtxt")
        assert config.max_batch_size == 4 and [group.count for group in config.instance_group] == [2]
        assert config.dynamic_batching.max_queue_delay_microseconds == 250
        assert not config.response_cache.enable  # --no-cache
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    result = subprocess.run([*command[:7], str(tmp_path / "mine")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0, result.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def model_config_dtype(value) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(value)


def test_no_file_of_the_repository_imports_fssam_or_torch(repository):
    for folder, _, files in os.walk(repository):
        for file in files:
            if file.endswith(".py"):
                modules = _imports(os.path.join(folder, file))
                assert not modules & {"fssam", "torch", "sam2", "timm"}, (file, modules)
                # hashlib, hmac: validate's HMAC of the support set (the support cache's key)
                assert modules <= {"json", "os", "hashlib", "hmac", "numpy", "onnxruntime", "openvino",
                                   "triton_python_backend_utils"}


def _with_openvino_bf16_plan(tmp_path, tiny_artifacts):
    """A copy of the tiny export whose manifest records an OpenVINO bf16 plan as `fssam export
    --openvino bf16` writes it (graphs whole at bf16: its graph gate passed). The configs are parsed,
    not served: the gate itself is tested in test_runtime."""
    artifacts = tmp_path / "artifacts-bf16-plan"
    shutil.copytree(tiny_artifacts[0], artifacts)
    manifest = json.loads((artifacts / "manifest.json").read_text())
    stages = {name: {"precision": "bf16", "file": spec["file"]} for name, spec in manifest["stages"].items()}
    manifest["openvino"] = {"bf16": {"stages": stages, "parity": {"passed": True},
                                     "graphs": {"precision": "bf16", "tried": {"bf16": True}, "parity": {"passed": True}}}}
    (artifacts / "manifest.json").write_text(json.dumps(manifest))
    return str(artifacts)


@pytest.mark.parametrize("backend,precision", [
    ("python-ort", None), ("python-openvino", "fp32"), ("python-openvino", "bf16"), ("onnxruntime", None),
    ("openvino", "fp32"), ("openvino", "bf16"),
])
def test_every_config_parses_as_a_triton_model_config(tmp_path, tiny_artifacts, backend, precision):
    """Every config.pbtxt of each backend parses with tritonclient's model-config protobuf, with the
    backend, instance kind, batching and parameters that backend needs."""
    from fssam.runtime.cpu import native_bf16
    from fssam.runtime.runners.openvino import compile_properties
    from fssam.serving.repository import write_repository

    if backend == "python-openvino" and precision == "bf16" and not native_bf16():
        pytest.skip("python-openvino bf16 needs a CPU with native bf16 (the refusal is tested below)")
    artifacts = _with_openvino_bf16_plan(tmp_path, tiny_artifacts) if precision == "bf16" else tiny_artifacts[0]
    info = write_repository(artifacts, str(tmp_path / "repo"), backend=backend, precision=precision, threads=2)
    assert info["backend"] == backend and set(info["graphs"]) == {"support_encoder", "query_segmenter"}
    for name in MODELS:
        config = _parse(tmp_path / "repo" / name / "config.pbtxt")
        assert config.name == name and config.input and config.output
    for name, entry in info["graphs"].items():
        config = _parse(tmp_path / "repo" / name / "config.pbtxt")
        params = _parameters(config)
        assert entry["precision"] == (precision or "fp32") and (tmp_path / "repo" / name / "1" / entry["file"]).is_file()
        kind = config.instance_group[0].kind
        if backend.startswith("python-"):
            assert config.backend == "python" and config.max_batch_size == 8 and config.HasField("dynamic_batching")
            assert params["runtime"] == {"python-ort": "onnxruntime", "python-openvino": "openvino"}[backend]
        if backend == "python-openvino":
            assert json.loads(params["openvino_properties"]) == compile_properties(entry["precision"], 2)
        if backend == "onnxruntime":
            assert config.backend == "onnxruntime" and kind == config.instance_group[0].KIND_GPU
            assert entry["file"] == "model.onnx" and not config.HasField("optimization")
        if backend == "openvino":
            # the OpenVINO backend fixes the batch at max_batch_size > 0: 0 and a -1 batch dim keep it dynamic
            assert config.backend == "openvino" and config.default_model_filename == "model.onnx"
            assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
            assert all(tensor.dims[0] == -1 for tensor in [*config.input, *config.output])
            assert all(t.dims[0] == 1 for t in config.model_warmup[0].inputs.values())
            assert kind == config.instance_group[0].KIND_CPU
            assert params == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": "2",
                              **({"HINT_BF16": "YES"} if entry["precision"] == "bf16" else {})}
    ensemble = _parse(tmp_path / "repo" / "fssam" / "config.pbtxt")
    assert ensemble.max_batch_size == (0 if backend == "openvino" else 8)


def test_onnxruntime_tensorrt_accelerator_and_cpu_configs(tmp_path, tiny_artifacts):
    from fssam.errors import ConfigError
    from fssam.serving.repository import write_repository

    write_repository(tiny_artifacts[0], str(tmp_path / "trt"), backend="onnxruntime", accelerator="tensorrt")
    config = _parse(tmp_path / "trt" / "query_segmenter" / "config.pbtxt")
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP32"
    # the explicit shape range: batch 1 .. the served --max-batch (8), other dims as exported
    query_dims = "x".join(map(str, tiny_artifacts[1]["graphs"]["query_segmenter"]["inputs"][0]["shape"][1:]))
    assert accelerator.parameters["trt_profile_min_shapes"].startswith(f"query:1x{query_dims},")
    assert accelerator.parameters["trt_profile_max_shapes"].startswith(f"query:8x{query_dims},")
    assert accelerator.parameters["trt_profile_opt_shapes"].count(":1x") == len(config.input)
    write_repository(tiny_artifacts[0], str(tmp_path / "cpu"), backend="onnxruntime", device="cpu")
    config = _parse(tmp_path / "cpu" / "support_encoder" / "config.pbtxt")
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    with pytest.raises(ConfigError, match="TensorRT execution accelerator"):
        write_repository(tiny_artifacts[0], str(tmp_path / "bad"), backend="python-ort", accelerator="tensorrt")


def test_native_backend_refusals(tmp_path, tiny_artifacts):
    from fssam.errors import ConfigError, InputError
    from fssam.serving.repository import write_repository

    artifacts = tiny_artifacts[0]
    with pytest.raises(InputError, match="no TensorRT engines of the graphs"):
        write_repository(artifacts, str(tmp_path / "trt"), backend="tensorrt")
    with pytest.raises(ConfigError, match="int8"):
        write_repository(artifacts, str(tmp_path / "int8"), backend="python-openvino", precision="int8")
    with pytest.raises(ConfigError, match="--precision is for python-openvino and openvino"):
        write_repository(artifacts, str(tmp_path / "ort"), backend="onnxruntime", precision="bf16")
    with pytest.raises(ConfigError, match="max batch must be in 1..64, got 0"):
        write_repository(artifacts, str(tmp_path / "big"), backend="python-ort", max_batch=0)
    assert not any(tmp_path.iterdir())


def test_python_openvino_bf16_refused_without_native_bf16(tmp_path, tiny_artifacts, monkeypatch):
    """On a CPU without amx_bf16 / avx512_bf16 the python-openvino bf16 repository is refused, naming
    the flags; the native openvino configs (for another machine) are still written. Without a gated
    bf16 plan, bf16 is refused for both: nothing reduced-precision is served unchecked."""
    from fssam.errors import ConfigError
    from fssam.serving.repository import write_repository

    artifacts = _with_openvino_bf16_plan(tmp_path, tiny_artifacts)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Test CPU\nflags\t\t: fpu sse2 avx2 avx512f\n")
    monkeypatch.setenv("FSSAM_CPUINFO", str(cpuinfo))
    with pytest.raises(ConfigError, match="native bf16.*Test CPU.*avx512_bf16 no"):
        write_repository(artifacts, str(tmp_path / "repo"), backend="python-openvino", precision="bf16")
    assert not (tmp_path / "repo").exists()
    write_repository(artifacts, str(tmp_path / "native"), backend="openvino", precision="bf16")
    for backend in ("python-openvino", "openvino"):
        with pytest.raises(ConfigError, match=r"no OpenVINO bf16 plan: export it with `fssam export --openvino bf16`"):
            write_repository(tiny_artifacts[0], str(tmp_path / "ungated"), backend=backend, precision="bf16")
    assert not (tmp_path / "ungated").exists()


@pytest.mark.parametrize("change,backend,message", [
    ({"precision": "bf16"}, "onnxruntime", "bf16 exports are served by the tensorrt backend only"),
    ({"precision": "bf16"}, "python-ort", "bf16 exports are served by the tensorrt backend only"),
    ({"precision": "bf16"}, "python-openvino", "bf16 exports are served by the tensorrt backend only"),
    ({"scma_node": "custom", "tensorrt": {"engines": {"support_encoder": {"file": "a"},
                                                      "query_segmenter": {"file": "b"}}}},
     "tensorrt", "fssam::SCMA plugin nodes"),
    ({"graphs": {}}, "python-ort", "no deployable graphs"),
])
def test_repository_refuses_what_the_server_cannot_run(tmp_path, tiny_artifacts, change, backend, message):
    from fssam.errors import FSSAMError
    from fssam.serving.repository import write_repository

    artifacts = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts[0], artifacts)
    manifest = json.loads((artifacts / "manifest.json").read_text())
    (artifacts / "manifest.json").write_text(json.dumps({**manifest, **change}))
    with pytest.raises(FSSAMError, match=message):
        write_repository(str(artifacts), str(tmp_path / "repo"), backend=backend)
    assert not (tmp_path / "repo").exists()


# ---------------------------------------------------------------- the running server

def test_ensemble_matches_eager_and_the_graphs_in_process(server, remote, tiny_model, tiny_artifacts):
    from fssam.runtime import as_torch, open_runner

    query, supports, masks = episode(5)
    with torch.inference_mode():
        eager = tiny_model(query, supports, masks)
        inprocess = as_torch(open_runner("onnxruntime", tiny_artifacts[0])).run_graphs(query, supports, masks)
    logits = remote.infer(query, supports, masks)
    assert logits.shape == (1, 1, SIZE, SIZE) and logits.dtype == torch.float32
    assert (logits - eager).abs().max().item() <= fp32_limit(eager.abs().max().item())
    assert mask_iou(logits, eager) >= FP32_MIN_IOU
    assert (logits - inprocess).abs().max().item() <= 1e-6


def test_cache_hit_equals_miss_and_triton_counts_it(remote):
    query, supports, masks = episode(7)
    before = remote.cache_stats()
    first = remote.infer(query, supports, masks)
    middle = remote.cache_stats()
    second = remote.infer(query, supports, masks)
    after = remote.cache_stats()
    assert middle["misses"] == before["misses"] + 1 and middle["hits"] == before["hits"]
    assert after["hits"] == middle["hits"] + 1 and after["misses"] == middle["misses"]
    assert torch.equal(first, second)
    remote.infer(episode(8)[0], supports, masks)  # a new query on the cached support set: a hit
    assert remote.cache_stats()["hits"] == after["hits"] + 1
    ignored = masks.clone()  # 255 (ignore) on background pixels: validate binarises it before the cache
    ignored[(masks == 0) & (torch.arange(SIZE)[:, None] < 2)] = 255
    assert torch.equal(remote.infer(query, supports, ignored), first)
    assert remote.cache_stats()["hits"] == after["hits"] + 2


def test_predict_remote_grpc_and_http(server, tiny_model):
    from fssam.serving.client import predict_remote

    query, supports, masks = episode(6)
    with torch.inference_mode():
        eager = tiny_model(query, supports, masks)
    for url, protocol in ((server.grpc_url, "grpc"), (f"http://{server.http_url}", "http")):
        logits = predict_remote(url, query, supports, masks, protocol=protocol)
        assert logits.shape == (1, 1, SIZE, SIZE)
        assert (logits - eager).abs().max().item() <= fp32_limit(eager.abs().max().item()), protocol


def test_concurrent_load_8_clients_x_20_requests(server):
    """0 failures, and every result equals the single request's within 1e-6 (dynamic batching on)."""
    from fssam.serving.client import RemoteFSSAM

    clients, requests = 8, 20
    episodes = [episode(100 + i) for i in range(clients)]
    with RemoteFSSAM(server.grpc_url) as single:
        references = [single.infer(*e) for e in episodes]

    def work(i):
        with RemoteFSSAM(server.grpc_url) as client:
            return [client.infer(*episodes[i]) for _ in range(requests)]

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(work, i) for i in range(clients)]
        outcomes = [f.exception() or f.result() for f in futures]
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert not failures, f"{len(failures)} clients failed: {failures[0]}"
    worst = max((logits - reference).abs().max().item()
                for reference, results in zip(references, outcomes) for logits in results)
    assert sum(len(results) for results in outcomes) == clients * requests
    assert worst <= 1e-6, f"results under load differ from single requests by {worst:.2e}"


def _good():
    query, supports, masks = episode(9)
    return query.numpy().astype(np.uint8), supports.numpy().astype(np.uint8), masks.numpy().astype(np.uint8)


def _bad_cases():
    q, s, m = _good()
    seven = m.copy()
    seven[0, 0, 1, 1] = 7
    return {
        "non-binary mask": (dict(masks=seven), "support_masks", "values 0, 1, 7"),
        "0/255 mask (no 1)": (dict(masks=m * 255), "support_masks", "no foreground"),
        "empty mask": (dict(masks=np.zeros_like(m)), "support_masks", "no foreground"),
        "wrong shape": (dict(query=q[:, :, :32, :32]), "query", "shape"),
        "wrong dtype": (dict(query=q.astype(np.float32)), "query", "FP32"),
        "mismatched support count": (dict(supports=np.concatenate([s, s], 1)), "support_images", "shape"),
        "batch over the limit": (dict(query=np.repeat(q, 9, 0), supports=np.repeat(s, 9, 0), masks=np.repeat(m, 9, 0)),
                                 "'fssam'", "batch-size must be <= 8"),
    }


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_request_is_invalid_argument_and_server_stays_ready(server, case, protocol):
    """INVALID_ARGUMENT (gRPC) / HTTP 400 with a message naming the input, never INTERNAL / 500."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    q, s, m = _good()
    changes, name, expected = _bad_cases()[case]
    arrays = {"query": q, "support_images": s, "support_masks": m}
    arrays.update({{"supports": "support_images", "masks": "support_masks"}.get(k, k): v for k, v in changes.items()})
    module = grpcclient if protocol == "grpc" else httpclient
    client = module.InferenceServerClient(server.grpc_url if protocol == "grpc" else server.http_url)
    inputs = []
    for key, array in arrays.items():
        item = module.InferInput(key, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        inputs.append(item)
    with pytest.raises(InferenceServerException) as info:
        client.infer("fssam", inputs)
    status, message = str(info.value.status()), info.value.message()
    assert status == ("StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400"), (status, message)
    assert name in message and expected in message, message
    assert client.is_server_ready() and server.ready()
    good = []
    for key, array in zip(("query", "support_images", "support_masks"), _good()):
        item = module.InferInput(key, list(array.shape), "UINT8")
        item.set_data_from_numpy(array)
        good.append(item)
    assert client.infer("fssam", good).as_numpy("logits").shape == (1, 1, SIZE, SIZE)  # still answers
    client.close()


def test_unknown_model_and_unreachable_server(server):
    from fssam.serving import ServingError
    from fssam.serving.client import RemoteFSSAM, predict_remote
    from fssam.serving.server import free_port

    q, s, m = _good()
    with RemoteFSSAM(server.grpc_url, model="no_such_model") as client:
        with pytest.raises(ServingError, match="no_such_model"):
            client.infer(q, s, m)
    assert server.ready()
    with pytest.raises(ServingError, match="cannot reach"):
        predict_remote(f"127.0.0.1:{free_port()}", q, s, m, protocol="http", timeout=5)


def test_cli_predict_url_matches_eager(server, tmp_path, tiny_model):
    """`fssam predict --url` writes the mask eager PyTorch gives for the same (UINT8) pixels, and
    nearly the in-process `fssam predict` mask (which keeps the resized pixels in float)."""
    import subprocess
    import sys

    import cv2
    from PIL import Image

    from fssam.data.preprocess import load_episode, logits_to_mask

    rng = np.random.default_rng(3)
    paths = {}
    for name, (h, w) in {"support": (80, 100), "query": (70, 90)}.items():
        cv2.imwrite(str(tmp_path / f"{name}.jpg"), (rng.random((h, w, 3)) * 255).astype(np.uint8))
        mask = np.zeros((h, w), np.uint8)
        mask[20:50, 30:70] = 1
        Image.fromarray(mask).save(tmp_path / f"{name}.png")
        paths[name] = str(tmp_path / f"{name}.jpg")
    common = ["--support", paths["support"], "--support-mask", str(tmp_path / "support.png"), "--query", paths["query"]]
    outputs = {}
    for label, extra in (("eager", ["--config", "tiny"]), ("served", ["--url", server.grpc_url, "--protocol", "grpc"])):
        out = tmp_path / f"{label}.png"
        result = subprocess.run([sys.executable, "-m", "fssam.cli", "predict", *extra, *common, "--out", str(out)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        outputs[label] = np.asarray(Image.open(out))
        assert (tmp_path / f"{label}_overlay.png").exists()
        # both say their weights are random (the served ones from the ensemble's config parameter)
        assert "RANDOM-INIT model (seed 0)" in result.stderr, (label, result.stderr)
    assert outputs["eager"].shape == outputs["served"].shape == (70, 90)
    query, supports, masks, query_rgb = load_episode([paths["support"]], [str(tmp_path / "support.png")],
                                                     paths["query"], SIZE)
    with torch.inference_mode():
        logits = tiny_model(query.round(), supports.round(), masks)
    expected = logits_to_mask(logits, *query_rgb.shape[:2]) * 255
    assert (outputs["served"] == expected).mean() >= 0.999
    assert (outputs["eager"] == outputs["served"]).mean() >= 0.99  # float vs rounded resized pixels
    # the server reports its input size: a --config of another size is refused before any request
    result = subprocess.run([sys.executable, "-m", "fssam.cli", "predict", "--config", "small", "--url", server.grpc_url,
                             "--protocol", "grpc", *common, "--out", str(tmp_path / "other.png")], capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "--config small is a 512 px model" in lines[0] and "64 px" in lines[0]
    assert not (tmp_path / "other.png").exists()


def test_eval_through_the_server_matches_eager(server, pascal, tmp_path):
    """`fssam eval --backend triton` against the real server: the same episodes as eager PyTorch fp32,
    nearly the same masks and the same scores (the served python-ort graphs are within the fp32 gate)."""
    import json
    import subprocess
    import sys

    root, lists = pascal
    base = [sys.executable, "-m", "fssam.cli", "eval", "--dataset", "pascal", "--root", root, "--list-root", lists,
            "--fold", "0", "--shots", "1", "--episodes", "6", "--config", "tiny", "--no-progress"]
    eager = subprocess.run([*base, "--backend", "eager", "--device", "cpu", "--out", str(tmp_path / "eager.json"),
                            "--save-masks", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert eager.returncode == 0, eager.stderr
    served = subprocess.run([*base, "--backend", "triton", "--url", server.grpc_url, "--protocol", "grpc",
                             "--out", str(tmp_path / "t.json"),
                             "--compare-with", str(tmp_path / "eager.json")], capture_output=True, text=True, timeout=600)
    assert served.returncode == 0, served.stderr
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["backend"] == "triton" and result["episodes"] == 6
    # the server says which weights it serves (the ensemble's config parameter): random, and recorded so
    assert result["random_init"] is True and result["weights"].startswith("RANDOM-INIT model (seed 0)")
    agreement = result["agreement"]
    # the server takes UINT8 pixels, so its resized images are rounded where eager keeps them in float
    # (as for predict --url above): a few edge pixels differ, the scores do not
    assert agreement["mask_iou"]["pixel_agreement_mean"] >= 0.99 and agreement["mask_iou"]["min"] >= 0.98, agreement
    assert abs(agreement["miou_delta"]) < 1e-3 and abs(agreement["fbiou_delta"]) < 1e-3


# ---------------------------------------------------------------- servers of their own

def test_python_openvino_ensemble_matches_eager(tmp_path, tiny_artifacts, tiny_model):
    """python-openvino fp32 served: within the fp32 gate of eager PyTorch and equal to OpenVINO fp32
    in process."""
    from fssam.runtime import as_torch, open_runner
    from fssam.runtime.parity import check_end_to_end
    from fssam.serving.client import RemoteFSSAM
    from fssam.serving.repository import write_repository

    write_repository(tiny_artifacts[0], str(tmp_path / "repo"), backend="python-openvino", precision="fp32")
    triton = _serve(tmp_path, tmp_path / "repo")
    try:
        query, supports, masks = episode(5)
        with torch.inference_mode():
            eager = tiny_model(query, supports, masks)
            inprocess = as_torch(open_runner("openvino", tiny_artifacts[0], precision="fp32")).run_graphs(
                query, supports, masks)
        with RemoteFSSAM(triton.grpc_url) as remote:
            logits = remote.infer(query, supports, masks)
        end, failures = check_end_to_end(logits, eager)
        assert not failures, failures
        assert (logits - inprocess).abs().max().item() <= 1e-5
    finally:
        _stop(triton)


LAUNCHER = """
import sys
from fssam.serving.server import TritonServer
triton = TritonServer(sys.argv[1], http_port=0, grpc_port=0, log_path=sys.argv[2], cache_mb=64)
try:
    triton.start(timeout=240)
except Exception as error:
    print("FAILED", str(error).splitlines()[0], flush=True)
    raise SystemExit(1)
print(triton.grpc_url, flush=True)
sys.stdin.read()  # until the test closes our stdin
raise SystemExit(triton.stop())
"""


def _poisoned_server(tmp_path, repository, poisoned: tuple, log: str):
    """tritonserver started from a venv whose site-packages holds packages `poisoned` that raise on
    import. The stubs embed that venv's interpreter (they find `python3` on PATH, our folder first,
    fssam.serving.server.stub_interpreter_dir), so its site-packages comes before the base's on their
    sys.path. The launcher itself runs with -S and the real packages on PYTHONPATH (which the stubs,
    isolated interpreters, ignore). Returns (process, its first line: the gRPC URL or FAILED ...)."""
    import site
    import subprocess
    import sys

    venv = tmp_path / f"venv-{len(poisoned)}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    packages = next(venv.glob("lib/python*/site-packages"))
    for name in poisoned:
        (packages / name).mkdir()
        (packages / name / "__init__.py").write_text(f"raise ImportError('{name} must not be imported by the server')\n")
    path = os.pathsep.join([str(SOURCE_ROOT), *site.getsitepackages()])
    process = subprocess.Popen([str(venv / "bin" / "python"), "-S", "-c", LAUNCHER, str(repository), log],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                               env={**os.environ, "PYTHONPATH": path})
    return process, process.stdout.readline().strip()


def test_repository_copied_alone_serves_without_fssam_or_torch(tmp_path, repository, tiny_model):
    """Copy the repository folder alone; serve it with `fssam`, `torch`, `sam2` and `timm` made
    unimportable for its Python models (packages that raise on import, first on the stubs' sys.path):
    it loads and answers as eager does. The control: `onnxruntime` poisoned the same way (the
    python-ort models need it), the server does not come up, so the poison does reach the stubs."""
    from fssam.serving.client import RemoteFSSAM

    copy = tmp_path / "elsewhere" / "repo"
    shutil.copytree(repository, copy)
    control, line = _poisoned_server(tmp_path, copy, ("onnxruntime",), str(tmp_path / "control.log"))
    control.communicate(timeout=60)
    assert line.startswith("FAILED") and "onnxruntime must not be imported" in open(tmp_path / "control.log").read()
    shutil.rmtree(copy)
    shutil.copytree(repository, copy)  # without the control's bytecode caches
    log = str(tmp_path / "tritonserver.log")
    process, url = _poisoned_server(tmp_path, copy, ("fssam", "torch", "sam2", "timm"), log)
    try:
        assert not url.startswith("FAILED"), url
        query, supports, masks = episode(11)
        with torch.inference_mode():
            eager = tiny_model(query, supports, masks)
        with RemoteFSSAM(url) as remote:
            logits = remote.infer(query, supports, masks)
        assert (logits - eager).abs().max().item() <= fp32_limit(eager.abs().max().item())
    finally:
        process.communicate(timeout=120)
    assert process.returncode == 0, f"tritonserver did not shut down cleanly; log {log}"
    assert "must not be imported" not in open(log).read()
    # what serving added to the repository is Python's bytecode of its model.py files, nothing else (the
    # stub ignores PYTHONDONTWRITEBYTECODE); `fssam repository` replaces those too (tests/test_files.py)
    added = {path.relative_to(copy) for path in copy.rglob("*") if path.is_file()} - {
        path.relative_to(repository) for path in repository.rglob("*") if path.is_file()}
    assert all(path.parent.name == "__pycache__" and path.suffix == ".pyc" for path in added), added


def test_sigterm_under_load_gives_only_correct_results_or_errors(tmp_path, repository):
    """Clients keep sending while the server gets SIGTERM: every answer is the right logits or an
    error, never zeros or another made-up tensor."""
    from fssam.serving.client import RemoteFSSAM

    triton = _serve(tmp_path, repository)
    episodes = [episode(200 + i) for i in range(3)]
    with RemoteFSSAM(triton.grpc_url) as single:
        references = [single.infer(*e) for e in episodes]
    results, errors, stop = [], [], threading.Event()

    def client(i):
        with RemoteFSSAM(triton.grpc_url, timeout=30) as remote:
            while not stop.is_set():
                try:
                    results.append((i, remote.infer(*episodes[i])))
                except Exception as error:
                    errors.append(str(error))
                    if not triton.process or triton.process.poll() is not None:
                        return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    triton.process.send_signal(signal.SIGTERM)
    triton.process.wait(60)
    stop.set()
    for thread in threads:
        thread.join(60)
    triton.stop()
    assert results, "no request was answered before the shutdown"
    for i, logits in results:
        assert (logits - references[i]).abs().max().item() <= 1e-6
        assert logits.abs().max().item() > 0
    assert errors, "no request was refused after SIGTERM"


# ---------------------------------------------------------------- deploy

def test_deploy_tiny_end_to_end(tmp_path):
    """The README's main job on the tiny config: export -> repository -> ensemble server -> parity,
    cache hit, overheads, throughput and payload."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fssam.cli", "deploy", "--config", "tiny", "--out", str(tmp_path / "d"),
                             "--runs", "3", "--no-progress", "--clients", "1,2"], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    out = result.stdout
    assert "PASS" in out and "random-init seed 0" in out and out.count("<- chosen") == 2
    for label in ("onnxruntime fp32", "onnxruntime int8", "openvino fp32", "openvino int8"):
        assert f"    {label} " in out, label  # a row of the plan's table, per graph
    # static QDQ int8 is a candidate of `fssam export --plan`, left out of deploy's bounded plan, saying so
    assert "  skipped onnxruntime int8-static: left out of fssam deploy's bounded plan" in out
    for label in ("eager fp32", "eager bf16 autocast"):
        assert f"      {label}" in out and "-> served" in out, label
    assert "response-cache hit on support_encoder" in out and "server overhead" in out
    assert "request payload per episode" in out and "4x less" in out
    info = json.loads((tmp_path / "d" / "repository" / "fssam_repository.json").read_text())
    figures = json.loads((tmp_path / "d" / "deploy.json").read_text())
    # --device auto: the CPU where torch sees no GPU, served as the CPU plan chose
    assert figures["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert figures["backend"] == info["backend"] == "plan" and figures["passed"]
    manifest = json.loads((tmp_path / "d" / "artifacts" / "manifest.json").read_text())
    assert manifest["stages"] == {} and set(os.listdir(tmp_path / "d" / "artifacts")) >= {
        "manifest.json", "query_segmenter.onnx", "support_encoder.onnx"}
    assert not any(name.startswith("prior") or name.startswith("head") for name in os.listdir(tmp_path / "d" / "artifacts"))
    for name, chosen in figures["plan"].items():  # the repository serves what the plan chose
        assert info["graphs"][name]["backend"] == chosen["backend"] and info["graphs"][name]["precision"] == chosen["precision"]
    phases = figures["phases"]
    assert set(phases) >= {"export_and_plan_s", "plan_s", "server_start_s", "checks_s", "latency_s", "throughput_s",
                           "total_s"} and figures["wall_s"] == phases["total_s"] >= phases["export_and_plan_s"] > 0
    for label in ("eager fp32", "eager bf16 autocast"):
        assert figures["speedups"][label]["episode"] > 0 and figures[label]["runs"] >= 1
    assert [(row["concurrency"], row["cached_support"]) for row in figures["throughput"]] == [
        (1, True), (2, True), (1, False), (2, False)]
    assert all(row["failures"] == 0 and row["episodes_per_s"] > 0 for row in figures["throughput"])
    for row in figures["throughput"]:  # Triton's own counts: new support sets were never answered from the cache
        assert (row["cache_hits"], row["cache_misses"]) == (
            (row["requests"], 0) if row["cached_support"] else (0, row["requests"])), row
    assert "cache hits" in out
    assert figures["cache_check"] == {"hits": 1, "misses": 1}
    for name in ("gate_episode", "fresh_episode"):  # the same runtime served and in process
        same = figures["served_vs_inprocess"][name]
        assert same["max_abs"] <= same["limit"] < 1e-3, (name, same)
    # a second run into the same folder that fails in its export: the earlier run's deploy.json and
    # repository are gone before anything is replaced, its complete export stays; nothing describes
    # a model that is not there
    from fssam.export import load_manifest

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    before = load_manifest(str(tmp_path / "d" / "artifacts"))
    again = subprocess.run([sys.executable, "-m", "fssam.cli", "deploy", "--config", "tiny", "--out", str(tmp_path / "d"),
                            "--checkpoint", str(bad), "--no-progress"], capture_output=True, text=True, timeout=900)
    assert again.returncode == 1 and "bad.pt" in again.stderr, again.stderr
    assert sorted(os.listdir(tmp_path / "d")) == ["artifacts"]
    assert load_manifest(str(tmp_path / "d" / "artifacts")) == before
    # a first run that fails before writing anything leaves no --out folder
    fresh = subprocess.run([sys.executable, "-m", "fssam.cli", "deploy", "--config", "tiny", "--out", str(tmp_path / "e"),
                            "--checkpoint", str(bad), "--no-progress"], capture_output=True, text=True, timeout=900)
    assert fresh.returncode == 1 and not (tmp_path / "e").exists(), fresh.stderr


def test_deploy_of_aoti_packages_on_the_cpu(tmp_path):
    """`fssam deploy --device cpu --precisions fp32`: the branch a GPU deploy takes (AOTInductor packages
    gated and timed, served by python-torch behind the front, checked against eager and the same
    packages in process, latency vs both eager baselines, throughput), on CPU packages."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fssam.cli", "deploy", "--config", "tiny", "--device", "cpu",
                             "--precisions", "fp32", "--out", str(tmp_path / "d"), "--runs", "3", "--budget-s", "3",
                             "--no-progress", "--clients", "1,2"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    out = result.stdout
    assert "[6/6] throughput" in out and "AOTInductor CPU packages at fp32" in out and "PASS" in out
    assert "torch AOTInductor fp32" in out and "<- chosen" in out and "compiled in" in out
    figures = json.loads((tmp_path / "d" / "deploy.json").read_text())
    info = json.loads((tmp_path / "d" / "repository" / "fssam_repository.json").read_text())
    assert figures["passed"] and figures["device"] == "cpu" and figures["plan"] == {"torch aoti": "fp32"}
    log = tmp_path / "d" / "tritonserver.log"  # kept: what the served models logged
    assert figures["server_log"] == str(log) and "successfully loaded 'query_segmenter'" in log.read_text()
    assert figures["backend"] == info["backend"] == "python-torch" and figures["precision"] == "fp32"
    entry = figures["aoti"]["fp32"]
    assert entry["passed"] and entry["scma"] == "op" and entry["compile_s"] > 0 and entry["device"] == "cpu"
    assert figures["plan_candidates"]["fp32"]["passed"] and figures["plan_candidates"]["fp32"]["ms"] > 0
    for name in ("gate_episode", "fresh_episode"):  # the same packages served and in process
        same = figures["served_vs_inprocess"][name]
        assert same["max_abs"] <= same["limit"], (name, same)
    for label in ("eager fp32", "eager bf16 autocast"):
        assert figures["speedups"][label]["episode"] > 0 and figures[label]["runs"] >= 1
    for row in figures["throughput"]:
        assert row["failures"] == 0 and (row["cache_hits"], row["cache_misses"]) == (
            (row["requests"], 0) if row["cached_support"] else (0, row["requests"])), row


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the refusal is for machines without")
def test_deploy_on_cuda_without_a_gpu_is_one_error_line_before_any_work(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fssam.cli", "deploy", "--config", "tiny", "--device", "cuda",
                             "--out", str(tmp_path / "d"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and not (tmp_path / "d").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cuda: this machine has no CUDA device" in lines[0], result.stderr


@pytest.mark.parametrize("device, precisions, message", [
    ("cpu", "fp32,fp16", "--precisions fp16 is for --device cuda"),
    ("cpu", "bf16,fp8", "--precisions bf16,fp8: expected a comma list of fp32, bf16, fp16"),
])
def test_deploy_precisions_are_checked_in_one_line_before_any_work(tmp_path, device, precisions, message):
    """--precisions picks the AOTInductor candidates: fp16 on the CPU, or an unknown precision (refused
    first, on any machine), is one error line and no --out."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fssam.cli", "deploy", "--config", "tiny", "--device", device,
                             "--precisions", precisions, "--out", str(tmp_path / "d"), "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and not (tmp_path / "d").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_deploy_plan_says_why_openvino_bf16_is_no_candidate(monkeypatch, tmp_path):
    """Without native bf16 the plan skips OpenVINO bf16 and says why, naming the CPU and its flags."""
    from fssam.export import graph_plan

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Test CPU\nflags\t\t: fpu avx2\n")
    monkeypatch.setenv("FSSAM_CPUINFO", str(cpuinfo))
    available, skipped = graph_plan.candidates()
    assert ("openvino", "bf16") not in available and ("openvino", "int8") in available
    assert "no native bf16" in skipped["openvino bf16"] and "Test CPU; amx_bf16 no" in skipped["openvino bf16"]
    assert not graph_plan.has_vnni()  # OverflowFix on every layer for this CPU's int8


def test_bench_triton_mode_against_running_server(server, tiny_artifacts, tmp_path):
    """`fssam bench --modes triton --url`: client-measured figures and a concurrency sweep (cached and
    new support sets), no failures."""
    import subprocess
    import sys

    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "-m", "fssam.cli", "bench", "--config", "tiny", "--shots", "1", "--modes", "onnxruntime,triton",
         "--iterations", "2", "--warmup", "1", "--artifacts", tiny_artifacts[0], "--url", server.grpc_url,
         "--protocol", "grpc", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    runs = json.loads((out / "results.json").read_text())["runs"]["1"]
    assert runs["modes"]["triton"]["episode"]["n"] == 2 and runs["modes"]["triton"]["stages"] == {}
    assert [(row["concurrency"], row["cached_support"]) for row in runs["concurrency"]] == [
        (c, cached) for cached in (True, False) for c in (1, 2, 4, 8)]
    assert all(row["failures"] == 0 and row["episodes_per_s"] > 0 for row in runs["concurrency"])
    assert (out / "throughput_1shot.png").is_file()


# ---------------------------------------------------------------- fssam serve

def _children(pid: int) -> list:
    from fssam.serving.server import child_processes

    return child_processes(pid)


def _start_serve(repository, *extra, env=None):
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "fssam.cli", "serve", "--repository", str(repository),
                                "--port", "0", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=None if env is None else {**os.environ, **env})
    line = process.stdout.readline()  # "starting ..."
    while line and not line.startswith("ready:"):
        line = process.stdout.readline()
    return process, line


def test_serve_command_restarts_after_a_dead_stub_then_exits_with_the_log(repository, tmp_path):
    """A killed Python stub: `fssam serve --restarts 1` restarts tritonserver (which answers again),
    a second kill makes it exit non-zero naming the stub and the kept log."""
    from fssam.serving.client import RemoteFSSAM
    from fssam.serving.server import stub_processes

    process, ready = _start_serve(repository, "--restarts", "1", "--log", str(tmp_path / "serve.log"))
    try:
        assert ready.startswith("ready:"), process.stderr.read()
        url = ready.split("ready: http://", 1)[1].split()[0]  # the front: 503 while tritonserver restarts
        for round_ in range(2):
            deadline = time.time() + 60
            with RemoteFSSAM(url, protocol="http") as remote:
                while True:  # the (restarted) server answers
                    try:
                        remote.infer(*episode(3))
                        break
                    except Exception:
                        assert time.time() < deadline, "the restarted server never answered"
                        time.sleep(0.5)
            (server_pid,) = [pid for pid in _children(process.pid)
                             if "tritonserver" in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")]
            stubs = stub_processes(server_pid)
            victim = next(pid for pid, model in stubs.items() if model == "query_segmenter")
            os.kill(victim, signal.SIGKILL)
            if round_ == 0:
                line = process.stderr.readline()
                while line and "restarting tritonserver" not in line:
                    line = process.stderr.readline()
                assert "query_segmenter" in line and "(1/1)" in line, line
        code = process.wait(90)
        stderr = process.stderr.read()
        assert code == 1 and "fssam serve: error:" in stderr and "query_segmenter" in stderr
        assert str(tmp_path / "serve.log") in stderr and (tmp_path / "serve.log").is_file()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_command_port_in_use_is_an_error_before_ready(repository):
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "fssam.cli", "serve", "--repository", str(repository),
                                 "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "ready:" not in result.stdout
    assert f"port {port}" in result.stderr and "--port" in result.stderr


def _repository_index_status(http_url: str, headers: dict) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{http_url}/v2/repository/index", data=b"{}", method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_serve_command_admin_key_from_the_environment_then_sigterm_stops_cleanly(repository):
    """$FSSAM_ADMIN_KEY opens the model-repository API to requests carrying it (and only those),
    the ready line says so without printing the key; SIGTERM stops fssam serve and tritonserver."""
    from fssam.serving.server import ADMIN_HEADER

    process, ready = _start_serve(repository, "--no-front", "--grpc-port", "0", env={"FSSAM_ADMIN_KEY": "k3y-from-env"})
    try:
        assert ready.startswith("ready:"), process.stderr.read()
        assert "admin APIs open to the admin key" in ready and "k3y-from-env" not in ready
        http_url = ready.split("HTTP ", 1)[1].split()[0]
        assert _repository_index_status(http_url, {ADMIN_HEADER: "k3y-from-env"}) == 200
        assert _repository_index_status(http_url, {ADMIN_HEADER: "guess"}) == 403
        assert _repository_index_status(http_url, {}) == 403
        children = _children(process.pid)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        time.sleep(0.5)
        assert not [pid for pid in children if os.path.exists(f"/proc/{pid}")], "tritonserver outlived fssam serve"
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_command_bad_admin_key_is_one_line(repository):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fssam.cli", "serve", "--repository", str(repository),
                             "--no-front", "--http-port", "0", "--grpc-port", "0", "--admin-key", "has space"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "ready:" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "admin key" in lines[0], result.stderr


# ---------------------------------------------------------------- TensorRT plugin engines, batch limits

def _with_engines(tmp_path, tiny_artifacts, plugin, scma_node="custom", **changes):
    """A copy of the tiny export whose manifest lists graph engines (stand-in bytes: the configs are
    parsed, not served; engines need the GPU that built them) holding `plugin` ("aot", "jit", None)."""
    from fssam.runtime.manifest import file_sha256

    artifacts = tmp_path / f"artifacts-{plugin}"
    shutil.copytree(tiny_artifacts[0], artifacts)
    manifest = json.loads((artifacts / "manifest.json").read_text())
    engines = {}
    for name in ("support_encoder", "query_segmenter"):
        (artifacts / f"{name}.engine").write_bytes(f"engine of {name}".encode())
        engines[name] = {"file": f"{name}.engine", "sha256": file_sha256(str(artifacts / f"{name}.engine")),
                         "profile": {"min": 1, "opt": 1, "max": manifest["max_batch"]}, "plugin": plugin}
    manifest.update(scma_node=scma_node, tensorrt={"engines": engines, "max_batch": manifest["max_batch"]}, **changes)
    (artifacts / "manifest.json").write_text(json.dumps(manifest))
    return artifacts


def test_tensorrt_backend_serves_aot_plugin_engines_and_refuses_jit_ones(tmp_path, tiny_artifacts):
    """An AOT fssam::SCMA engine carries its kernel (PTX compiled into the plan): the config loads
    model.plan as it is, saying so. A JIT engine calls back into Python, which Triton's TensorRT
    backend does not run: refused with that reason. An older manifest that did not record the kind
    is refused as unknown."""
    from fssam.errors import ConfigError
    from fssam.serving.repository import write_repository

    info = write_repository(str(_with_engines(tmp_path, tiny_artifacts, "aot")), str(tmp_path / "aot"),
                            backend="tensorrt")
    assert info["scma_plugin"] == {"support_encoder": "aot", "query_segmenter": "aot"}
    for name in ("support_encoder", "query_segmenter"):
        text = (tmp_path / "aot" / name / "config.pbtxt").read_text()
        config = _parse(tmp_path / "aot" / name / "config.pbtxt")
        assert config.backend == "tensorrt" and config.platform == "tensorrt_plan" and config.max_batch_size == 8
        assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU and not _parameters(config)
        assert "AOT kernel" in text and "no plugin library" in text
        assert (tmp_path / "aot" / name / "1" / "model.plan").read_bytes() == f"engine of {name}".encode()
    decomposed = write_repository(str(_with_engines(tmp_path, tiny_artifacts, None, scma_node="decomposed")),
                                  str(tmp_path / "plain"), backend="tensorrt")
    assert decomposed["scma_plugin"] == {"support_encoder": None, "query_segmenter": None}
    assert "AOT" not in (tmp_path / "plain" / "query_segmenter" / "config.pbtxt").read_text()
    with pytest.raises(ConfigError, match="JIT implementation, a Python callback.*Triton's TensorRT backend runs "
                                          "engines from C\\+\\+"):
        write_repository(str(_with_engines(tmp_path, tiny_artifacts, "jit")), str(tmp_path / "jit"), backend="tensorrt")
    older = _with_engines(tmp_path, tiny_artifacts, "unrecorded")
    manifest = json.loads((older / "manifest.json").read_text())
    for entry in manifest["tensorrt"]["engines"].values():
        del entry["plugin"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="does not say whether support_encoder, query_segmenter use the plugin's AOT"):
        write_repository(str(older), str(tmp_path / "older"), backend="tensorrt")
    assert not (tmp_path / "jit").exists() and not (tmp_path / "older").exists()


def test_warmup_episode_of_a_bf16_export_opens_no_onnx_runtime(tiny_artifacts, monkeypatch):
    """model_warmup's support tensors: the real support_encoder graph's outputs (ONNX Runtime) for an
    fp32 / fp16 export; for a bf16 one (TensorRT serves it; ONNX Runtime would run only its slow
    fp32-arithmetic copy) values of the graph's output shapes and dtype, and no ONNX Runtime at all."""
    import fssam.runtime as runtime
    from fssam.serving.repository import _warmup_episode

    folder, manifest = tiny_artifacts
    real = _warmup_episode(folder, manifest)
    runner = runtime.open_runner("onnxruntime", folder, verify=False)
    expected = runner.support_encoder(real["support_images"], real["support_masks"])
    for name, value in zip(("support_features", "support_memory", "support_pointers"), expected):
        np.testing.assert_array_equal(real[name], value)

    def no_runner(*args, **kwargs):
        raise AssertionError("a bf16 warm-up opened a runner")

    monkeypatch.setattr(runtime, "open_runner", no_runner)
    bf16 = _warmup_episode(folder, dict(manifest, precision="bf16"))
    for name in ("support_features", "support_memory", "support_pointers"):
        assert bf16[name].shape == real[name].shape and bf16[name].dtype == np.float32, name
    assert set(bf16) == set(real)


def test_repository_max_batch_is_bounded_by_the_exports_limit(tmp_path, tiny_artifacts):
    """--max-batch may not exceed what the export admits (manifest["max_batch"], shared with its
    ONNX files, TensorRT profiles and runners); an export that predates the record keeps the old
    limits (64 for ONNX, 8 for TensorRT profiles)."""
    from fssam.errors import ConfigError
    from fssam.serving.repository import write_repository

    assert tiny_artifacts[1]["max_batch"] == 8
    with pytest.raises(ConfigError, match="max batch 9 is over the export's limit of 8 episodes.*--max-batch 8 or "
                                          "less.*fssam export --max-batch 9"):
        write_repository(tiny_artifacts[0], str(tmp_path / "big"), backend="python-ort", max_batch=9)
    four = _with_engines(tmp_path, tiny_artifacts, None, scma_node="decomposed", max_batch=4)
    info = write_repository(str(four), str(tmp_path / "four"), backend="tensorrt", max_batch=4)
    assert info["export_max_batch"] == 4 and _parse(tmp_path / "four" / "fssam" / "config.pbtxt").max_batch_size == 4
    with pytest.raises(ConfigError, match="over the export's limit of 4 episodes per call \\(its ONNX files, TensorRT "
                                          "profiles and runners"):
        write_repository(str(four), str(tmp_path / "five"), backend="tensorrt", max_batch=5)
    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_artifacts[0], legacy)
    manifest = json.loads((legacy / "manifest.json").read_text())
    del manifest["max_batch"]
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    assert write_repository(str(legacy), str(tmp_path / "legacy-repo"), max_batch=16)["export_max_batch"] == 64
    assert not (tmp_path / "big").exists() and not (tmp_path / "five").exists()
