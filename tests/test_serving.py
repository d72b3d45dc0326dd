"""The Triton serving path, against a real tritonserver on loopback (tiny config).

The module exports the tiny config once, writes python-ort and python-openvino repositories and
starts the server on them (the nvidia-pytriton wheel's tritonserver, or one on PATH). If a server
cannot be started the tests fail: they do not skip. The native configs (onnxruntime, openvino,
tensorrt) are checked by parsing them with Triton's model-config protobuf: the wheel's server has
none of those backends.
"""

import ast
import concurrent.futures
import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

from fssam.runtime.parity import FP32_LOGITS_ATOL, FP32_MIN_IOU, mask_iou, sample_episode
from fssam.model import get_config

SIZE = 64
STAGES = ("prior_backbone", "image_encoder", "prior", "memory_encoder", "refine", "head")
STAGE_TEMPLATE = os.path.join(os.path.dirname(__file__), "..", "fssam", "serving", "templates", "stage_model.py")


def _serve(tmp, artifacts, **options):
    from fssam.serving.repository import write_repository
    from fssam.serving.server import TritonServer

    write_repository(artifacts, str(tmp / "repository"), **options)
    triton = TritonServer(str(tmp / "repository"), http_port=0, grpc_port=0, log_path=str(tmp / "tritonserver.log"))
    triton.start(timeout=240)  # raises ServingError with the log tail: a broken server fails the tests
    return triton


def _stop(triton):
    code = triton.stop()
    assert code == 0, f"tritonserver did not shut down cleanly (exit code {code}); log {triton.log_path}"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_artifacts):
    triton = _serve(tmp_path_factory.mktemp("serving"), tiny_artifacts[0], stage_backend="python-ort")
    yield triton
    _stop(triton)


@pytest.fixture(scope="module")
def openvino_server(tmp_path_factory, tiny_artifacts):
    triton = _serve(tmp_path_factory.mktemp("serving-openvino"), tiny_artifacts[0], stage_backend="python-openvino",
                    precision="fp32")
    yield triton
    _stop(triton)


@pytest.fixture(scope="module")
def remote(server):
    from fssam.serving.client import RemoteFSSAM

    with RemoteFSSAM(server.grpc_url) as client:
        yield client


def episode(seed):
    return sample_episode(get_config("tiny"), 1, batch=1, seed=seed)


def test_repository_layout(server):
    repo = server.repository
    for name in ("prior_backbone", "image_encoder", "prior", "memory_encoder", "refine", "head"):
        config = open(os.path.join(repo, name, "config.pbtxt")).read()
        assert 'backend: "python"' in config and "dynamic_batching" in config and "model_warmup" in config
        assert '"onnxruntime"' in config and os.path.isfile(os.path.join(repo, name, "1", "model.onnx"))
        assert open(os.path.join(repo, name, "1", "model.py")).read() == open(STAGE_TEMPLATE).read()
    pipeline = open(os.path.join(repo, "fssam_pipeline", "config.pbtxt")).read()
    assert "support_cache_size" in pipeline and "instance_group" in pipeline and "input_data_file" in pipeline


def _parse(path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(open(path).read(), model_config_pb2.ModelConfig())


def _parameters(config) -> dict:
    return {key: value.string_value for key, value in config.parameters.items()}


@pytest.mark.parametrize("backend,precision", [
    ("python-ort", None), ("python-openvino", "fp32"), ("python-openvino", "bf16"), ("onnxruntime", None),
    ("openvino", "fp32"), ("openvino", "bf16"),
])
def test_every_config_parses_as_a_triton_model_config(tmp_path, tiny_artifacts, backend, precision):
    """Every config.pbtxt of each stage backend parses with tritonclient's model-config protobuf,
    with the backend, instance kind, batching and parameters that backend needs."""
    from fssam.runtime.cpu import native_bf16
    from fssam.runtime.runners.openvino import compile_properties

    if backend == "python-openvino" and precision == "bf16" and not native_bf16():
        pytest.skip("python-openvino bf16 needs native bf16 (the refusal is tested below)")
    from fssam.serving.repository import write_repository

    info = write_repository(tiny_artifacts[0], str(tmp_path / "repo"), stage_backend=backend, precision=precision,
                            threads=2)
    assert info["stage_backend"] == backend and set(info["stages"]) == set(STAGES)
    for name in (*STAGES, "fssam_pipeline"):
        config = _parse(tmp_path / "repo" / name / "config.pbtxt")
        assert config.name == name and config.input and config.output and config.model_warmup
    for name in STAGES:
        config = _parse(tmp_path / "repo" / name / "config.pbtxt")
        params = _parameters(config)
        entry = info["stages"][name]
        assert entry["backend"] == backend and entry["precision"] == (precision or "fp32")
        assert (tmp_path / "repo" / name / "1" / entry["file"]).is_file()
        kind = config.instance_group[0].kind
        if backend.startswith("python-"):
            assert config.backend == "python" and config.max_batch_size == 64 and config.HasField("dynamic_batching")
            assert params["runtime"] == {"python-ort": "onnxruntime", "python-openvino": "openvino"}[backend]
            assert params["model_file"] == entry["file"] == "model.onnx"
        if backend == "python-openvino":
            assert json.loads(params["openvino_properties"]) == compile_properties(entry["precision"], 2)
        if backend == "onnxruntime":
            assert config.backend == "onnxruntime" and kind == config.instance_group[0].KIND_GPU
        if backend == "openvino":
            # the OpenVINO backend fixes the batch at max_batch_size > 0: 0 and a -1 batch dim keep it dynamic
            assert config.backend == "openvino" and config.default_model_filename == "model.onnx"
            assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
            assert all(tensor.dims[0] == -1 for tensor in [*config.input, *config.output])
            assert all(t.dims[0] == 1 for t in config.model_warmup[0].inputs.values())
            assert kind == config.instance_group[0].KIND_CPU
            assert params == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": "2",
                              **({"HINT_BF16": "YES"} if entry["precision"] == "bf16" else {})}
    pipeline = _parameters(_parse(tmp_path / "repo" / "fssam_pipeline" / "config.pbtxt"))
    assert json.loads(pipeline["stage_max_batch"]) == {name: 64 for name in STAGES}


def test_openvino_ir_stages_are_copied_with_their_weights(tmp_path, tiny_artifacts):
    """A plan stage in IR (the int8 plan's files) lands as model.xml + model.bin, named in the config."""
    import openvino as ov

    from fssam.runtime.manifest import file_sha256
    from fssam.serving.repository import write_repository

    artifacts = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts[0], artifacts)
    (artifacts / "openvino").mkdir(exist_ok=True)
    ov.save_model(ov.Core().read_model(str(artifacts / "head.onnx")), str(artifacts / "openvino" / "head.xml"))
    manifest = json.loads((artifacts / "manifest.json").read_text())
    stages = {name: {"precision": "fp32", "file": spec["file"], "sha256": spec["sha256"]}
              for name, spec in manifest["stages"].items()}
    stages["head"] = {"precision": "int8", "file": "openvino/head.xml",
                      "sha256": file_sha256(str(artifacts / "openvino" / "head.xml"))}
    manifest["openvino"] = {"int8": {"stages": stages, "parity": {"passed": True}}}
    (artifacts / "manifest.json").write_text(json.dumps(manifest))
    for backend in ("python-openvino", "openvino"):
        info = write_repository(str(artifacts), str(tmp_path / backend), stage_backend=backend, precision="int8")
        assert info["openvino_gated"] and info["stages"]["head"] == {"backend": backend, "precision": "int8",
                                                                     "file": "model.xml"}
        assert sorted(os.listdir(tmp_path / backend / "head" / "1")) == sorted(
            ["model.xml", "model.bin"] + (["model.py"] if backend == "python-openvino" else []))
        head = _parse(tmp_path / backend / "head" / "config.pbtxt")
        if backend == "openvino":
            assert head.default_model_filename == ""  # model.xml is the backend's default
        else:
            assert _parameters(head)["model_file"] == "model.xml"
        assert _parse(tmp_path / backend / "prior" / "config.pbtxt")
        assert (tmp_path / backend / "prior" / "1" / "model.onnx").is_file()


def test_native_backend_refusals(tmp_path, tiny_artifacts):
    from fssam.errors import ConfigError, InputError
    from fssam.serving.repository import write_repository

    artifacts = tiny_artifacts[0]
    with pytest.raises(InputError, match="no TensorRT engines"):
        write_repository(artifacts, str(tmp_path / "trt"), stage_backend="tensorrt")
    with pytest.raises(ConfigError, match="no OpenVINO int8 plan"):
        write_repository(artifacts, str(tmp_path / "int8"), stage_backend="python-openvino", precision="int8")
    with pytest.raises(ConfigError, match="--precision is for python-openvino and openvino"):
        write_repository(artifacts, str(tmp_path / "ort"), stage_backend="onnxruntime", precision="bf16")
    assert not any(tmp_path.iterdir())


def test_python_openvino_bf16_refused_without_native_bf16(tmp_path, tiny_artifacts, monkeypatch):
    """On a CPU without amx_bf16 / avx512_bf16 the python-openvino bf16 repository is refused, naming
    the flags; the native openvino configs (for another machine) are still written."""
    from fssam.errors import ConfigError
    from fssam.serving.repository import write_repository

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Test CPU\nflags\t\t: fpu sse2 avx2 avx512f\n")
    monkeypatch.setenv("FSSAM_CPUINFO", str(cpuinfo))
    with pytest.raises(ConfigError, match="native bf16.*Test CPU.*avx512_bf16 no"):
        write_repository(tiny_artifacts[0], str(tmp_path / "repo"), stage_backend="python-openvino", precision="bf16")
    assert not (tmp_path / "repo").exists()
    write_repository(tiny_artifacts[0], str(tmp_path / "native"), stage_backend="openvino", precision="bf16")


def test_stage_template_imports_no_torch_or_fssam():
    tree = ast.parse(open(STAGE_TEMPLATE).read())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add((node.module or "").split(".")[0])
    assert modules == {"json", "os", "numpy", "onnxruntime", "openvino", "triton_python_backend_utils"}, modules


def test_python_openvino_episode_matches_eager(openvino_server, tiny_model):
    """python-openvino fp32 served by the real tritonserver: within the fp32 gate of eager PyTorch,
    and the same as OpenVINO fp32 in process."""
    from fssam.runtime import as_torch, open_runner
    from fssam.runtime.parity import check_end_to_end
    from fssam.serving.client import RemoteFSSAM
    from fssam.serving.repository import read_repository

    info = read_repository(openvino_server.repository)
    assert info["stage_backend"] == "python-openvino" and info["stage_precision"] == "fp32"
    query, supports, masks = episode(5)
    with torch.inference_mode():
        eager = tiny_model(query, supports, masks)
        inprocess = as_torch(open_runner("openvino", info["artifacts"], precision="fp32"))(query, supports, masks)
    with RemoteFSSAM(openvino_server.grpc_url) as remote:
        logits, cached = remote.infer(query, supports, masks)
        again, cached_again = remote.infer(query, supports, masks)
    end, failures = check_end_to_end(logits, eager)
    assert not failures, failures
    assert end["max_abs"] <= FP32_LOGITS_ATOL and end["mask_iou"] >= FP32_MIN_IOU
    assert (logits - inprocess).abs().max().item() <= 1e-5
    assert not bool(cached.any()) and bool(cached_again.all()) and torch.equal(logits > 0, again > 0)


@pytest.mark.parametrize("change,backend,message", [
    ({"dtype": "bfloat16", "precision": "bf16"}, "onnxruntime", "bf16 exports cannot be served"),
    ({"dtype": "bfloat16", "precision": "bf16"}, "python-ort", "bf16 exports cannot be served"),
    ({"scma_node": "custom", "tensorrt": {"engines": {}}}, "tensorrt", "fssam::SCMA plugin nodes"),
])
def test_repository_refuses_what_the_server_cannot_run(tmp_path, tiny_artifacts, change, backend, message):
    import json
    import shutil

    from fssam.errors import ConfigError
    from fssam.serving.repository import write_repository

    artifacts = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts[0], artifacts)
    manifest = json.loads((artifacts / "manifest.json").read_text())
    (artifacts / "manifest.json").write_text(json.dumps({**manifest, **change}))
    with pytest.raises(ConfigError, match=message):
        write_repository(str(artifacts), str(tmp_path / "repo"), stage_backend=backend)
    assert not (tmp_path / "repo").exists()


def test_episode_matches_eager(server, remote, tiny_model):
    query, supports, masks = episode(5)
    with torch.inference_mode():
        eager = tiny_model(query, supports, masks)
    logits, _ = remote.infer(query, supports, masks)
    assert logits.shape == (1, 1, SIZE, SIZE) and logits.dtype == torch.float32
    assert (logits - eager).abs().max().item() <= FP32_LOGITS_ATOL
    assert mask_iou(logits, eager) >= FP32_MIN_IOU


def test_predict_remote_grpc_and_http(server, tiny_model):
    from fssam.serving.client import predict_remote

    query, supports, masks = episode(6)
    with torch.inference_mode():
        eager = tiny_model(query, supports, masks)
    for url, protocol in ((server.grpc_url, "grpc"), (f"http://{server.http_url}", "http")):
        logits = predict_remote(url, query, supports, masks, protocol=protocol)
        assert logits.shape == (1, 1, SIZE, SIZE)
        assert (logits - eager).abs().max().item() <= FP32_LOGITS_ATOL, protocol


def test_cached_support_gives_identical_masks(remote):
    query, supports, masks = episode(7)
    first, cached_first = remote.infer(query, supports, masks)
    second, cached_second = remote.infer(query, supports, masks)
    assert not bool(cached_first.any()) and bool(cached_second.all())
    assert torch.equal(first > 0, second > 0)
    assert (first - second).abs().max().item() <= 1e-6
    other_query = episode(8)[0]  # a new query on the cached support set
    _, cached_other = remote.infer(other_query, supports, masks)
    assert bool(cached_other.all())


def test_concurrent_load(server):
    from fssam.serving.client import RemoteFSSAM

    clients, requests = 4, 25
    episodes = [episode(100 + i) for i in range(clients)]
    with RemoteFSSAM(server.grpc_url) as single:
        references = [single.infer(*e)[0] for e in episodes]

    def work(i):
        results = []
        with RemoteFSSAM(server.grpc_url) as client:
            for _ in range(requests):
                results.append(client.infer(*episodes[i])[0])
        return results

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(work, i) for i in range(clients)]
        outcomes = [f.exception() or f.result() for f in futures]
    elapsed = time.perf_counter() - start
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert not failures, f"{len(failures)} clients failed: {failures[0]}"
    worst = 0.0
    for reference, results in zip(references, outcomes):
        assert len(results) == requests
        for logits in results:
            assert torch.equal(logits > 0, reference > 0)
            worst = max(worst, (logits - reference).abs().max().item())
    assert worst <= 1e-4, f"batched results differ from single requests by {worst:.2e}"
    print(f"{clients * requests} requests from {clients} clients in {elapsed:.1f} s; max abs vs single {worst:.1e}")


def _good():
    query, supports, masks = episode(9)
    return query.numpy(), supports.numpy(), masks.numpy()


def _bad_cases():
    q, s, m = _good()
    nan = q.copy()
    nan[0, 0, 3, 3] = np.nan
    empty = np.zeros_like(m)
    soft = m * 0.5
    return {
        "wrong shape": (dict(query=q[:, :, :32, :32]), "query"),
        "wrong dtype": (dict(query=q.astype(np.float64)), "FP64"),
        "NaN": (dict(query=nan), "NaN"),
        "empty mask": (dict(masks=empty), "empty"),
        "non-binary mask": (dict(masks=soft), "not a binary mask"),
        "mismatched support count": (dict(supports=np.concatenate([s, s], 1)), "support_images"),
        "mismatched mask count": (dict(masks=np.concatenate([m, m], 1)), "support_masks"),
        "oversized images": (
            dict(query=np.zeros((1, 3, 128, 128), np.float32), supports=np.zeros((1, 1, 3, 128, 128), np.float32),
                 masks=np.ones((1, 1, 128, 128), np.float32)), "shape"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_request_gets_error_and_server_stays_ready(server, remote, case):
    from fssam.serving import ServingError

    q, s, m = _good()
    changes, expected = _bad_cases()[case]
    arrays = {"query": q, "supports": s, "masks": m, **changes}
    with pytest.raises(ServingError) as info:
        remote.infer(arrays["query"], arrays["supports"], arrays["masks"], raw=True)
    assert expected.lower() in str(info.value).lower(), str(info.value)
    assert remote.ready() and server.ready()
    logits, _ = remote.infer(q, s, m)  # and still answers good requests
    assert logits.shape == (1, 1, SIZE, SIZE)


def test_unknown_model(server):
    from fssam.serving import ServingError
    from fssam.serving.client import RemoteFSSAM

    q, s, m = _good()
    with RemoteFSSAM(server.grpc_url, model="no_such_model") as client:
        with pytest.raises(ServingError, match="no_such_model"):
            client.infer(q, s, m)
    assert server.ready()


def test_unreachable_server_is_a_one_line_error():
    from fssam.serving import ServingError
    from fssam.serving.client import predict_remote
    from fssam.serving.server import free_port

    q, s, m = _good()
    with pytest.raises(ServingError):
        predict_remote(f"127.0.0.1:{free_port()}", q, s, m, protocol="http", timeout=5)


def test_cli_predict_url_matches_eager(server, tmp_path):
    """`fssam predict --url` writes the same mask PNG as in-process eager predict."""
    import subprocess
    import sys

    import cv2
    import numpy as np
    from PIL import Image

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
    for label, extra in (("eager", ["--config", "tiny"]), ("served", ["--url", server.grpc_url])):
        out = tmp_path / f"{label}.png"
        result = subprocess.run([sys.executable, "-m", "fssam.cli", "predict", *extra, *common, "--out", str(out)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        outputs[label] = np.asarray(Image.open(out))
        assert (tmp_path / f"{label}_overlay.png").exists()
    assert outputs["eager"].shape == outputs["served"].shape == (70, 90)
    assert (outputs["eager"] == outputs["served"]).mean() >= 0.999


def test_deploy_tiny_end_to_end(tmp_path):
    """The README's main job on the tiny config: export -> repository -> server -> check -> latency."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fssam.cli", "deploy", "--config", "tiny", "--out", str(tmp_path / "d"),
                             "--runs", "3", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "PASS" in out and "random-init seed 0" in out and "chosen: " in out and "fastest that passed its gate" in out
    for label in ("eager fp32", "eager bf16 autocast", "ONNX Runtime fp32", "OpenVINO fp32"):
        assert f"        {label} " in out, label  # a row of the in-process table
    assert "server overhead" in out and "same run: eager fp32" in out and "eager bf16 autocast" in out.split("same run:")[1]
    info = json.loads((tmp_path / "d" / "repository" / "fssam_repository.json").read_text())
    chosen = out.split("-> stage backend ")[1].split(":")[0]
    assert info["stage_backend"] == chosen in ("python-ort", "python-openvino")
    assert f"in-process {'ONNX Runtime' if chosen == 'python-ort' else 'OpenVINO'} {info['stage_precision']}:" in out


def test_deploy_choice_and_its_reason(monkeypatch, tmp_path, capsys):
    """The fastest exported runtime that passed its gate is chosen (never an eager baseline, never one
    that failed); without native bf16 the output says why OpenVINO bf16 was not a candidate."""
    from fssam.serving import deploy

    class Runner:
        def describe(self):
            return "OpenVINO fp32"

    rows = [deploy.Measured("eager fp32", None), deploy.Measured("ONNX Runtime fp32", None, "onnxruntime", passed=True),
            deploy.Measured("OpenVINO fp32", None, "openvino", runner=Runner(), passed=True),
            deploy.Measured("OpenVINO int8", None, "openvino", "int8", passed=False)]
    ms = {"eager fp32": 1.0, "ONNX Runtime fp32": 9.0, "OpenVINO fp32": 5.0, "OpenVINO int8": 2.0}
    results = {label: {"episode": {"median_ms": value}} for label, value in ms.items()}
    chosen = deploy.choose(rows, results)
    assert chosen.label == "OpenVINO fp32" and chosen.stage_backend == "python-openvino"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Test CPU\nflags\t\t: fpu avx2\n")
    monkeypatch.setenv("FSSAM_CPUINFO", str(cpuinfo))
    assert deploy.openvino_precisions(int8=False) == ("fp32",)
    assert deploy.openvino_precisions(int8=True) == ("fp32", "int8")
    deploy._print_choice(chosen, rows, results)
    out = capsys.readouterr().out
    assert "fastest that passed its gate (5.0 ms; next ONNX Runtime fp32 9.0 ms)" in out
    assert "OpenVINO bf16 was not a candidate" in out and "Test CPU; amx_bf16 no" in out


def test_bench_triton_mode_against_running_server(server, tiny_artifacts, tmp_path):
    """`fssam bench --modes triton --url`: client-measured figures and a concurrency sweep, no failures."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "-m", "fssam.cli", "bench", "--config", "tiny", "--shots", "1", "--modes", "onnxruntime,triton",
         "--iterations", "2", "--warmup", "1", "--artifacts", tiny_artifacts[0], "--url", server.grpc_url,
         "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    runs = json.loads((out / "results.json").read_text())["runs"]["1"]
    assert runs["modes"]["triton"]["episode"]["n"] == 2 and runs["modes"]["triton"]["stages"] == {}
    assert [row["concurrency"] for row in runs["concurrency"]] == [1, 2, 4, 8]
    assert all(row["failures"] == 0 and row["throughput"] > 0 for row in runs["concurrency"])
    assert (out / "throughput_1shot.png").is_file()
