"""The Triton serving path, against a real tritonserver on loopback (tiny config).

The module exports the tiny config once, writes a python-ort repository and starts the server
(the nvidia-pytriton wheel's tritonserver, or one on PATH). If the server cannot be started the
tests fail: they do not skip.
"""

import concurrent.futures
import os
import time

import numpy as np
import pytest
import torch

from fssam.runtime.parity import FP32_LOGITS_ATOL, FP32_MIN_IOU, mask_iou, sample_episode
from fssam.model import get_config

SIZE = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_artifacts):
    from fssam.serving.repository import write_repository
    from fssam.serving.server import TritonServer

    tmp = tmp_path_factory.mktemp("serving")
    write_repository(tiny_artifacts[0], str(tmp / "repository"), stage_backend="python-ort")
    triton = TritonServer(str(tmp / "repository"), http_port=0, grpc_port=0, log_path=str(tmp / "tritonserver.log"))
    triton.start(timeout=240)  # raises ServingError with the log tail: a broken server fails the tests
    yield triton
    code = triton.stop()
    assert code == 0, f"tritonserver did not shut down cleanly (exit code {code}); log {triton.log_path}"


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
        assert os.path.isfile(os.path.join(repo, name, "1", "model.onnx"))
    pipeline = open(os.path.join(repo, "fssam_pipeline", "config.pbtxt")).read()
    assert "support_cache_size" in pipeline and "instance_group" in pipeline and "input_data_file" in pipeline


def test_native_backend_configs(tmp_path, server, tiny_artifacts):
    """onnxruntime configs for NGC containers: native backend, GPU instances, same tensors."""
    from fssam.errors import InputError
    from fssam.serving.repository import write_repository

    artifacts = tiny_artifacts[0]
    write_repository(artifacts, str(tmp_path / "ort"), stage_backend="onnxruntime")
    config = open(tmp_path / "ort" / "head" / "config.pbtxt").read()
    assert 'backend: "onnxruntime"' in config and "KIND_GPU" in config and 'name: "logits"' in config
    assert (tmp_path / "ort" / "head" / "1" / "model.onnx").is_file()
    with pytest.raises(InputError, match="no TensorRT engines"):
        write_repository(artifacts, str(tmp_path / "trt"), stage_backend="tensorrt")


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
    assert "PASS" in result.stdout and "random-init seed 0" in result.stdout
    assert "in-process ONNX Runtime" in result.stdout and "server overhead" in result.stdout
    assert (tmp_path / "d" / "repository" / "fssam_pipeline" / "config.pbtxt").is_file()


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
