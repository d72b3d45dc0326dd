"""The torch backends of `fssam repository` on the AOTInductor packages of `fssam export --aoti`.

python-torch: the graph models run torch in the Python backend of the nvidia-pytriton wheel's real
tritonserver (CPU packages here). torch-aoti: native configs for Triton's PyTorch backend
(platform torch_aoti), which the wheel's server lacks: they are parsed with Triton's model-config
protobuf. One tiny export with CPU fp32 packages for the module (the tiny_artifacts export copied,
its packages compiled and gated: about 2 minutes on 2 CPUs).
"""

import concurrent.futures
import json
import os
import re
import shutil

import pytest
import torch

from conftest import shared_export
from fssam.model import get_config
from fssam.runtime.parity import FP32_MIN_IOU, fp32_limit, mask_iou, sample_episode

GRAPHS = ("support_encoder", "query_segmenter")
MODELS = ("fssam", "validate", *GRAPHS)
SIZE = 64


@pytest.fixture(scope="module")
def aoti_artifacts(tmp_path_factory, tiny_artifacts, tiny_model):
    """tiny_artifacts plus gated AOTInductor fp32 CPU packages (manifest["aoti"]["fp32"])."""
    from fssam.export.aoti import build_packages
    from fssam.runtime.manifest import load_manifest, write_manifest
    from fssam.runtime.parity import format_report

    def make(out):
        partial = out + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(tiny_artifacts[0], partial)
        manifest = load_manifest(partial)
        manifest["aoti"] = build_packages(partial, manifest, tiny_model, ("fp32",), "cpu")
        write_manifest(partial, manifest)
        entry = manifest["aoti"]["fp32"]
        assert entry["passed"], "AOTInductor fp32 gate: " + format_report(entry["parity"], manifest["graphs"])
        os.replace(partial, out)
        return manifest

    return shared_export(tmp_path_factory, "tiny-aoti", make)[0]


@pytest.fixture(scope="module")
def torch_repository(tmp_path_factory, aoti_artifacts):
    from fssam.serving.repository import write_repository

    out = tmp_path_factory.mktemp("torch-serving") / "repository"
    info = write_repository(aoti_artifacts, str(out), backend="python-torch")
    return out, info


@pytest.fixture(scope="module")
def server(torch_repository):
    from fssam.serving.server import TritonServer

    repository = torch_repository[0]
    triton = TritonServer(str(repository), http_port=0, grpc_port=0, cache_mb=64,
                          log_path=str(repository.parent / "tritonserver.log"))
    triton.start(timeout=240)
    yield triton
    assert triton.stop() == 0, f"tritonserver did not shut down cleanly; log {triton.log_path}"


@pytest.fixture(scope="module")
def runner(aoti_artifacts):
    from fssam.runtime import as_torch, open_runner

    return as_torch(open_runner("torch", aoti_artifacts, precision="fp32"))


def _parse(path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(open(path).read(), model_config_pb2.ModelConfig())


def _imports(path) -> set:
    from conftest import imported_modules

    return imported_modules(path)


def _with_manifest(tmp_path, artifacts, change) -> str:
    """A copy of an export folder whose manifest `change(manifest)` edited."""
    copy = tmp_path / "artifacts"
    shutil.copytree(artifacts, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return str(copy)


# ---------------------------------------------------------------- python-torch

def test_python_torch_repository_is_self_contained(torch_repository):
    """model.pt2 and model.py per graph; model.py holds only the torch runtime (no fssam, no other
    runtime); the configs parse and say where the packages load."""
    repository, info = torch_repository
    assert info["backend"] == "python-torch" and info["precision"] == "fp32"
    assert info["torch"] == {"torch": torch.__version__, "device": "cpu"}
    for name in MODELS:
        assert _parse(repository / name / "config.pbtxt").name == name
    for name in GRAPHS:
        assert info["graphs"][name] == {"backend": "python-torch", "precision": "fp32", "file": "model.pt2"}
        assert sorted(os.listdir(repository / name / "1")) == ["model.pt2", "model.py"]
        assert _imports(repository / name / "1" / "model.py") == {"json", "os", "numpy", "torch",
                                                                   "triton_python_backend_utils"}
        config = _parse(repository / name / "config.pbtxt")
        params = {key: value.string_value for key, value in config.parameters.items()}
        assert config.backend == "python" and config.max_batch_size == 8
        assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
        assert {key: params[key] for key in ("runtime", "model_file", "torch_version", "torch_device",
                                             "torch_buckets", "torch_float")} == {
            "runtime": "torch", "model_file": "model.pt2", "torch_version": torch.__version__,
            "torch_device": "cpu", "torch_buckets": "", "torch_float": "float32"}
    support = _parse(repository / "support_encoder" / "config.pbtxt")
    assert support.response_cache.enable and [t.name for t in support.input][-1] == "support_key"
    assert {key: value.string_value for key, value in support.parameters.items()}["cache_key_inputs"] == "support_key"


def test_python_torch_served_matches_the_runner_and_eager_and_caches_supports(server, runner, tiny_model):
    """The real tritonserver's answers equal the in-process torch runner's (1e-5), which is within
    the fp32 gate of eager; a repeated support set is a cache hit with the same logits; concurrent
    requests (gathered by the dynamic batcher) each get their own."""
    from fssam.serving.client import RemoteFSSAM

    config = get_config("tiny")
    with RemoteFSSAM(server.grpc_url) as remote:
        for batch, seed in ((1, 5), (2, 6)):
            query, supports, masks = sample_episode(config, 1, batch=batch, seed=seed)
            with torch.inference_mode():
                eager = tiny_model(query, supports, masks)
                inprocess = runner.run_graphs(query, supports, masks)
            before = remote.cache_stats()
            logits = remote.infer(query, supports, masks)
            middle = remote.cache_stats()
            again = remote.infer(query, supports, masks)
            after = remote.cache_stats()
            assert logits.shape == (batch, 1, SIZE, SIZE) and logits.dtype == torch.float32
            assert (logits - inprocess).abs().max().item() <= 1e-5
            assert (inprocess - eager).abs().max().item() <= fp32_limit(eager.abs().max().item())
            assert (logits - eager).abs().max().item() <= fp32_limit(eager.abs().max().item())
            assert mask_iou(logits, eager) >= FP32_MIN_IOU
            assert middle["misses"] == before["misses"] + 1 and middle["hits"] == before["hits"]
            assert after["hits"] == middle["hits"] + 1 and torch.equal(again, logits)

        episodes = [sample_episode(config, 1, batch=1, seed=20 + i) for i in range(6)]

        def ask(episode):
            with RemoteFSSAM(server.grpc_url) as client:
                return client.infer(*episode)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, episodes))
    for episode, logits in zip(episodes, answers):
        with torch.inference_mode():
            assert (logits - runner.run_graphs(*episode)).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- torch-aoti (native configs)

def test_torch_aoti_configs_parse_with_one_episode_per_request(tmp_path, aoti_artifacts):
    """Triton's PyTorch backend runs PT2 packages at batch size 1: every model has max_batch_size 0
    and a batch dimension of 1; the graph models are platform torch_aoti with model.pt2, tensors
    named by position (INPUT__<i>, OUTPUT__<i>), and the ensemble maps them."""
    from fssam.serving.repository import write_repository

    info = write_repository(aoti_artifacts, str(tmp_path / "repo"), backend="torch-aoti", max_batch=4)
    assert info["episodes_per_request"] == 1 and info["torch"] == {"torch": torch.__version__, "device": "cpu"}
    assert info["support_cache"] is None and "support_cache_note" in info
    for name in MODELS:
        config = _parse(tmp_path / "repo" / name / "config.pbtxt")
        assert config.name == name and config.max_batch_size == 0 and not config.HasField("dynamic_batching")
        assert all(list(t.dims)[0] == 1 for t in [*config.input, *config.output]), name
        assert "one episode per request" in (tmp_path / "repo" / name / "config.pbtxt").read_text()
    manifest = json.loads(open(os.path.join(aoti_artifacts, "manifest.json")).read())
    for name in GRAPHS:
        text = (tmp_path / "repo" / name / "config.pbtxt").read_text()
        config = _parse(tmp_path / "repo" / name / "config.pbtxt")
        assert config.backend == "pytorch" and config.platform == "torch_aoti" and not config.parameters
        assert f"torch {torch.__version__} on the CPU" in text
        assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
        assert os.listdir(tmp_path / "repo" / name / "1") == ["model.pt2"]
        spec = manifest["graphs"][name]
        assert [t.name for t in config.input] == [f"INPUT__{i}" for i in range(len(spec["inputs"]))]
        assert [t.name for t in config.output] == [f"OUTPUT__{i}" for i in range(len(spec["outputs"]))]
        assert [list(t.dims)[1:] for t in config.input] == [e["shape"][1:] for e in spec["inputs"]]
        assert sorted(config.model_warmup[0].inputs) == [t.name for t in config.input]
        assert info["tensor_names"][name] == {e["name"]: f"{kind}__{i}" for kind, entries in
                                              (("INPUT", spec["inputs"]), ("OUTPUT", spec["outputs"]))
                                              for i, e in enumerate(entries)}
    ensemble = _parse(tmp_path / "repo" / "fssam" / "config.pbtxt")
    steps = {step.model_name: step for step in ensemble.ensemble_scheduling.step}
    assert dict(steps["query_segmenter"].output_map) == {"OUTPUT__0": "logits"}
    assert dict(steps["query_segmenter"].input_map)["INPUT__4"] == "binary_masks"
    assert dict(steps["support_encoder"].input_map) == {"INPUT__0": "support_images", "INPUT__1": "binary_masks"}
    assert [t.name for t in ensemble.output] == ["logits"] and list(ensemble.output[0].dims) == [1, 1, SIZE, SIZE]


# ---------------------------------------------------------------- refusals

def test_packages_of_another_torch_are_refused_in_one_line(tmp_path, aoti_artifacts):
    from fssam.errors import ConfigError
    from fssam.runtime import open_runner
    from fssam.serving.repository import write_repository

    def other_torch(manifest):
        manifest["aoti"]["fp32"]["torch"] = "0.0.0"

    artifacts = _with_manifest(tmp_path, aoti_artifacts, other_torch)
    expected = re.escape(f"built with torch 0.0.0, this is torch {torch.__version__}")
    with pytest.raises(ConfigError, match=expected) as refused:
        open_runner("torch", artifacts, precision="fp32")
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match=expected) as refused:
        write_repository(artifacts, str(tmp_path / "repo"), backend="python-torch")
    assert "\n" not in str(refused.value) and not (tmp_path / "repo").exists()
    # torch-aoti is for another machine's server (a container's torch): written, saying which torch it needs
    info = write_repository(artifacts, str(tmp_path / "native"), backend="torch-aoti")
    assert info["torch"]["torch"] == "0.0.0"
    config = (tmp_path / "native" / "query_segmenter" / "config.pbtxt").read_text()
    assert "loads only with\n# torch 0.0.0 on the CPU" in config


def test_exports_without_gated_packages_are_refused_naming_fssam_export_aoti(tmp_path, tiny_artifacts, aoti_artifacts,
                                                                                capsys):
    from fssam.cli import main
    from fssam.errors import ConfigError
    from fssam.serving.repository import write_repository

    for backend in ("python-torch", "torch-aoti"):
        with pytest.raises(ConfigError, match=r"no AOTInductor fp32 packages.*`fssam export --aoti fp32`"):
            write_repository(tiny_artifacts[0], str(tmp_path / "repo"), backend=backend)
        with pytest.raises(ConfigError, match=r"no AOTInductor bf16 packages.*`fssam export --aoti bf16`"):
            write_repository(aoti_artifacts, str(tmp_path / "repo"), backend=backend, precision="bf16")
    assert main(["repository", "--artifacts", tiny_artifacts[0], "--out", str(tmp_path / "cli"),
                 "--backend", "python-torch"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "`fssam export --aoti fp32`" in error, error

    def failed_gate(manifest):  # as build_packages leaves a precision whose gate failed
        manifest["aoti"]["fp32"].update(passed=False, graphs={})

    artifacts = _with_manifest(tmp_path, aoti_artifacts, failed_gate)
    failed = r"fp32 packages of this export failed their gate.*`fssam export --aoti fp32`"
    for backend in ("python-torch", "torch-aoti"):
        with pytest.raises(ConfigError, match=failed):
            write_repository(artifacts, str(tmp_path / "repo"), backend=backend)

    def fp16_entry(manifest):
        manifest["aoti"]["fp16"] = dict(manifest["aoti"]["fp32"])

    artifacts = _with_manifest(tmp_path / "fp16", aoti_artifacts, fp16_entry)
    with pytest.raises(ConfigError, match="torch-aoti serves fp32 and bf16 packages"):
        write_repository(artifacts, str(tmp_path / "repo"), backend="torch-aoti", precision="fp16")
    assert not (tmp_path / "repo").exists()


# ---------------------------------------------------------------- fssam deploy --device

def test_deploy_device_auto_is_the_gpu_when_torch_sees_one_and_cuda_needs_one(monkeypatch):
    from fssam.device import resolve_device
    from fssam.errors import ConfigError

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="--device cuda: this machine has no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="device 'tpu'"):
        resolve_device("tpu")


def test_deploy_on_a_gpu_serves_the_fastest_package_precision_that_passed_its_gate(aoti_artifacts, tiny_model):
    """What `fssam deploy --device cuda` serves (fssam.export.aoti.choose_packages), here on the CPU
    packages: every gated precision timed on the packages' device, the fastest chosen; a precision
    that failed its gate is recorded and not timed; none passed is a ParityError."""
    import copy

    from fssam.export.aoti import choose_packages
    from fssam.runtime.manifest import load_manifest
    from fssam.runtime.parity import ParityError

    manifest = load_manifest(aoti_artifacts)
    plan = choose_packages(aoti_artifacts, manifest, tiny_model.config, budget_s=1.0)
    timed = plan["candidates"]["fp32"]
    assert plan["chosen"] == "fp32" and timed["passed"] and timed["ms"] > 0 and timed["runs"] >= 3
    assert timed["device"] == "cpu"
    failed = copy.deepcopy(manifest)
    failed["aoti"] = {"fp16": {**manifest["aoti"]["fp32"], "passed": False, "graphs": {}}, **failed["aoti"]}
    plan = choose_packages(aoti_artifacts, failed, tiny_model.config, budget_s=1.0)
    assert plan["chosen"] == "fp32" and plan["candidates"]["fp16"] == {
        "passed": False, "note": "failed its gate at export: not timed"}
    failed["aoti"]["fp32"]["passed"] = False
    with pytest.raises(ParityError, match=r"no precision passed its gate \(fp16, fp32\)"):
        choose_packages(aoti_artifacts, failed, tiny_model.config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA packages, CUDA graphs")
def test_cuda_packages_replayed_from_cuda_graphs_match_direct_calls_in_process_and_served(
        tmp_path, monkeypatch, tiny_artifacts, tiny_model):
    """CUDA packages of tiny at batch buckets 1 and 2 (gated); 3 episodes run as a call of 2 and a call
    of 1: the runner replaying CUDA graphs equals the runner calling the packages directly, says
    it replays, and the python-torch server (which replays too) gives the same logits."""
    from fssam.export.aoti import build_packages
    from fssam.runtime import as_torch
    from fssam.runtime.contract import run_graphs
    from fssam.runtime.manifest import load_manifest, write_manifest
    from fssam.runtime.runners.torch import TorchRunner
    from fssam.serving.client import RemoteFSSAM
    from fssam.serving.repository import write_repository
    from fssam.serving.server import TritonServer

    monkeypatch.setenv("FSSAM_AOTI_BUCKETS", "1,2")
    monkeypatch.setenv("FSSAM_AOTI_AUTOTUNE", "0")
    folder = tmp_path / "cuda"
    shutil.copytree(tiny_artifacts[0], folder)
    manifest = load_manifest(str(folder))
    manifest["aoti"] = build_packages(str(folder), manifest, tiny_model, ("fp32",), "cuda")
    write_manifest(str(folder), manifest)
    assert manifest["aoti"]["fp32"]["passed"], manifest["aoti"]["fp32"]["parity"]
    assert sorted(manifest["aoti"]["fp32"]["graphs"]["support_encoder"]["files"]) == ["1", "2"]
    episode = sample_episode(get_config("tiny"), 1, batch=3, seed=21)
    replayed = TorchRunner(str(folder), precision="fp32")
    direct = TorchRunner(str(folder), precision="fp32", cuda_graphs=False)
    with torch.inference_mode():
        first, again = (run_graphs(as_torch(replayed), *episode) for _ in range(2))  # capture, then replay
        plain = run_graphs(as_torch(direct), *episode)
    assert "replayed from CUDA graphs" in replayed.describe(), replayed.describe()
    for logits in (first, again):
        torch.testing.assert_close(logits.cpu(), plain.cpu(), rtol=0, atol=1e-6)
    repository = tmp_path / "repository"
    write_repository(str(folder), str(repository), backend="python-torch")
    triton = TritonServer(str(repository), http_port=0, grpc_port=0, log_path=str(tmp_path / "tritonserver.log"))
    triton.start(timeout=240)
    try:
        with RemoteFSSAM(triton.grpc_url) as remote:
            served = remote.infer(*episode)
    finally:
        assert triton.stop() == 0
    torch.testing.assert_close(torch.as_tensor(served), plain.cpu(), rtol=0, atol=1e-5)
    assert "CUDA graph capture failed" not in open(tmp_path / "tritonserver.log").read()
    assert {p.device.type for p in tiny_model.parameters()} == {"cpu"}  # the gate ran on its own copy


def test_reference_scma_traces_the_graphs_without_the_op(tiny_model):
    """Inside reference_scma() the exported graph holds SCMA as standard torch ops (what a package
    compiled there runs), outside it the custom op torch.ops.fssam.scma."""
    from fssam.export.aoti import graph_module
    from fssam.export.onnx_export import _examples
    from fssam.ops.scma import reference_scma
    from fssam.runtime.contract import GRAPH_ORDER

    module = graph_module(tiny_model, "query_segmenter", "fp32", "cpu")
    examples = _examples(tiny_model, 1, torch.float32, (GRAPH_ORDER,))["query_segmenter"]

    def targets():
        with torch.no_grad():
            program = torch.export.export(module, examples)
        return [str(node.target) for node in program.graph.nodes if node.op == "call_function"]

    assert targets().count("fssam.scma.default") == get_config("tiny").memory_attention_layers
    with reference_scma():
        decomposed = targets()
    assert not [t for t in decomposed if "fssam" in t] and [t for t in decomposed if "softmax" in t]


def test_a_tolerant_build_compiles_again_with_the_reference_then_records_the_failure(
        tmp_path, monkeypatch, tiny_artifacts, tiny_model):
    """`fssam deploy --device cuda` builds tolerantly: a precision whose compilation raises is compiled
    again with the reference SCMA; one that still fails is recorded (passed False, both errors, none
    of its files left) and no precision is chosen from it; a plain export raises the first error."""
    import fssam.export.aoti as aoti
    from fssam.ops.scma import _reference_only
    from fssam.runtime.manifest import load_manifest
    from fssam.runtime.parity import ParityError

    attempts = []

    def failing(module, examples, names, path, device, limit):
        attempts.append(_reference_only.get())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:  # what a compilation that breaks half-way leaves
            handle.write(b"partial")
        raise RuntimeError("the kernel did not compile" if not _reference_only.get() else "nor did the reference")

    monkeypatch.setattr(aoti, "compile_package", failing)
    folder = tmp_path / "export"
    shutil.copytree(tiny_artifacts[0], folder)
    manifest = load_manifest(str(folder))
    result = aoti.build_packages(str(folder), manifest, tiny_model, ("fp32",), "cpu", tolerant=True)
    entry = result["fp32"]
    assert attempts == [False, True]
    assert entry["passed"] is False and entry["graphs"] == {} and entry["scma"] == "reference"
    assert "the kernel did not compile" in entry["scma_error"] and "nor did the reference" in entry["error"]
    assert not list((folder / "aoti").rglob("*.pt2"))
    with pytest.raises(ParityError, match="no precision passed"):
        aoti.choose_packages(str(folder), {**manifest, "aoti": result}, tiny_model.config)
    with pytest.raises(RuntimeError, match="the kernel did not compile"):
        aoti.build_packages(str(folder), load_manifest(str(folder)), tiny_model, ("fp32",), "cpu")


def test_a_tolerant_build_whose_packages_fail_in_the_gate_is_built_again_with_the_reference(
        tmp_path, monkeypatch, aoti_artifacts, tiny_artifacts, tiny_model):
    """A package that compiles but raises when the gate runs it (a kernel launch that fails) is, in a
    tolerant build, built again with the reference SCMA and gated; that one passes and is recorded
    with the kernel's error. (The packages here are the module's gated CPU ones, copied in place of
    a compilation.)"""
    import fssam.export.aoti as aoti
    from fssam.ops.scma import _reference_only
    from fssam.runtime.manifest import load_manifest
    from fssam.runtime.runners.torch import TorchRunner

    def copied(module, examples, names, path, device, limit):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copy2(os.path.join(aoti_artifacts, os.path.relpath(path, folder)), path)

    run_stage = TorchRunner.run_stage

    def launch_fails_with_the_kernel(self, name, *tensors):
        if not _reference_only.get():
            raise RuntimeError("CUDA error: an illegal instruction was encountered")
        return run_stage(self, name, *tensors)

    monkeypatch.setattr(aoti, "compile_package", copied)
    monkeypatch.setattr(TorchRunner, "run_stage", launch_fails_with_the_kernel)
    folder = str(tmp_path / "export")
    shutil.copytree(tiny_artifacts[0], folder)
    entry = aoti.build_packages(folder, load_manifest(folder), tiny_model, ("fp32",), "cpu", tolerant=True)["fp32"]
    assert entry["passed"] is True and entry["scma"] == "reference" and "error" not in entry
    assert "illegal instruction" in entry["scma_error"]
    assert sorted(entry["graphs"]) == sorted(GRAPHS) and load_manifest(folder)["aoti"]["fp32"] == entry
    for graph in entry["graphs"].values():
        assert os.path.isfile(os.path.join(folder, graph["files"]["dynamic"]["file"]))
    with pytest.raises(RuntimeError, match="illegal instruction"):  # a plain export stops there
        aoti.build_packages(folder, load_manifest(folder), tiny_model, ("fp32",), "cpu")
    assert not os.path.exists(os.path.join(folder, "aoti", "fp32", "cpu"))
    assert load_manifest(folder)["aoti"]["fp32"]["graphs"] == {}  # the manifest lists none of the removed files


def test_cuda_batch_buckets_from_the_environment(monkeypatch):
    from fssam.errors import ConfigError
    from fssam.export.aoti import buckets

    assert buckets(8) == (1, 2, 4, 8) and buckets(3) == (1, 2)
    monkeypatch.setenv("FSSAM_AOTI_BUCKETS", " 8, 2 ")
    assert buckets(8) == (1, 2, 8) and buckets(4) == (1, 2)  # batch 1 always: latency, torch-aoti
    for bad in ("0,8", "x", "1,-2", ","):
        monkeypatch.setenv("FSSAM_AOTI_BUCKETS", bad)
        with pytest.raises(ConfigError, match="FSSAM_AOTI_BUCKETS"):
            buckets(8)
