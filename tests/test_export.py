"""Per-stage ONNX export of the tiny config: files, manifest, parity gate, dynamic batch, failures."""

import json
import os
import subprocess
import sys

import onnx
import pytest
import torch

from fssam.errors import CheckpointError, InputError
from fssam.export import ParityError, export, load_manifest
from fssam.runtime import as_torch, open_runner
from fssam.runtime.parity import fp32_limit, sample_episode
from fssam.runtime.contract import GRAPH_ORDER, STAGE_ORDER
from fssam.model import build


@pytest.fixture(scope="module")
def artifacts(tiny_artifacts):
    return tiny_artifacts


def test_stage_and_graph_onnx_files_and_manifest(artifacts):
    out, manifest = artifacts
    assert sorted(os.listdir(out)) == sorted([f"{name}.onnx" for name in (*STAGE_ORDER, *GRAPH_ORDER)] + ["manifest.json"])
    for name in (*STAGE_ORDER, *GRAPH_ORDER):
        entry = manifest["stages"].get(name) or manifest["graphs"][name]
        model = onnx.load(os.path.join(out, f"{name}.onnx"))
        onnx.checker.check_model(model)
        first = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert first.dim_param, f"{name}: batch dimension is not dynamic"
        assert [i.name for i in model.graph.input] == [t["name"] for t in entry["inputs"]]
    assert manifest["weights"]["source"] == "random-init seed 0"
    assert manifest["parity"]["onnxruntime"]["passed"] and manifest["graph_parity"]["onnxruntime"]["passed"]
    uint8 = onnx.TensorProto.UINT8
    encoder = onnx.load(os.path.join(out, "support_encoder.onnx"))
    assert [i.type.tensor_type.elem_type for i in encoder.graph.input] == [uint8, uint8]


def test_graphs_match_eager_and_compose_as_the_stages(artifacts, tiny_model):
    """The deployable graphs, per graph and end to end, within the fp32 gate; through ONNX Runtime
    they give the stage composition's logits (query memory encodings batched or not)."""
    out, manifest = artifacts
    report = manifest["graph_parity"]["onnxruntime"]
    assert report["units"] == "graphs" and set(report["stages"]) == set(GRAPH_ORDER)
    assert report["end_to_end"]["max_abs"] <= fp32_limit(report["end_to_end"]["reference_max_abs"])
    assert report["end_to_end"]["mask_iou"] >= 0.999
    runner = as_torch(open_runner("onnxruntime", out))
    query, supports, masks = sample_episode(tiny_model.config, 1, batch=3, seed=21)
    with torch.inference_mode():
        eager = tiny_model(query, supports, masks)
        graphs = runner.run_graphs(query, supports, masks)
        stages = runner(query, supports, masks)
    assert (graphs - eager).abs().max().item() <= fp32_limit(eager.abs().max().item())
    assert (graphs - stages).abs().max().item() <= fp32_limit(stages.abs().max().item())


def test_each_stage_matches_eager_within_gate(artifacts):
    _, manifest = artifacts
    report = manifest["parity"]["onnxruntime"]
    assert set(report["stages"]) == set(STAGE_ORDER)
    for stage, outputs in report["stages"].items():
        for key, stats in outputs.items():
            assert stats["max_abs"] <= stats["limit"] == fp32_limit(stats["reference_max_abs"]), (stage, key, stats)
    assert report["end_to_end"]["max_abs"] <= fp32_limit(report["end_to_end"]["reference_max_abs"])
    assert report["end_to_end"]["mask_iou"] >= 0.999


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch_end_to_end(artifacts, batch):
    out, _ = artifacts
    model = build("tiny", seed=0)
    stages = as_torch(open_runner("onnxruntime", out))
    query, supports, masks = sample_episode(model.config, 1, batch=batch, seed=batch)
    with torch.no_grad():
        expected = model(query, supports, masks)
    got = stages(query, supports, masks)
    assert got.shape == (batch, 1, 64, 64)
    assert (got - expected).abs().max().item() <= fp32_limit(expected.abs().max().item())


def test_manifest_round_trip_and_tampering(artifacts, tmp_path):
    out, manifest = artifacts
    loaded = load_manifest(out)
    assert loaded == json.loads(json.dumps(manifest))
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(out):
        (copy / name).write_bytes((open(os.path.join(out, name), "rb")).read())
    with open(copy / "prior.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(InputError, match="does not match its sha256"):
        load_manifest(str(copy))
    os.remove(copy / "manifest.json")
    with pytest.raises(InputError, match="not an fssam export folder"):
        load_manifest(str(copy))


def test_wrong_shot_count_is_a_clear_error(artifacts):
    out, _ = artifacts
    stages = as_torch(open_runner("onnxruntime", out))
    query, supports, masks = sample_episode(build("tiny").config, 2, batch=1)
    with pytest.raises(InputError, match=r"support_features: shape \(1, 2, "):
        stages(query, supports, masks)


def test_compare_command_passes(artifacts, tmp_path):
    """The six stages and the two deployable graphs, both gated; the JSON report holds both."""
    out, _ = artifacts
    report_path = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "fssam.cli", "compare", "--artifacts", out, "--batch", "2",
                             "--json", str(report_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("PASSED") == 2 and "end_to_end.logits" in result.stdout
    assert "deployable graphs" in result.stdout and "query_segmenter" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["passed"] and set(report["stages"]) == set(STAGE_ORDER)
    assert report["runtime"].startswith("ONNX Runtime fp32 (CPUExecutionProvider")
    assert report["graphs"]["passed"] and set(report["graphs"]["stages"]) == set(GRAPH_ORDER)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs an onnxruntime without its CUDA provider")
def test_compare_on_a_gpu_provider_this_onnxruntime_lacks_is_refused(artifacts):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has its CUDA provider")
    out, _ = artifacts
    for argv, message in ((["--device", "cuda"], "--device cuda: this onnxruntime has no CUDAExecutionProvider"),
                          (["--backend", "openvino", "--device", "cuda"], "OpenVINO runs on the CPU here")):
        result = subprocess.run([sys.executable, "-m", "fssam.cli", "compare", "--artifacts", out, *argv],
                                capture_output=True, text=True, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr
        assert "PASSED" not in result.stdout


def test_fp16_five_shot_gate(tmp_path):
    """fp16: each error vs fp32 eager at most 2x eager PyTorch fp16's own; 5 shots in the graphs
    (the graphs only: the stage files' gate is the same code, tested at fp32 and bf16)."""
    manifest = export("tiny", out=str(tmp_path / "fp16"), shots=5, precision="fp16", progress=False, stages=False)
    report = manifest["graph_parity"]["onnxruntime"]
    assert report["passed"], report["failures"]
    end = report["end_to_end"]
    assert end["max_abs"] <= 2 * end["baseline_max_abs"] + 1e-6
    assert manifest["stages"] == {} and manifest["graphs"]["support_encoder"]["inputs"][0]["shape"][1] == 5
    assert manifest["dtype"] == "float16"


def test_failing_gate_fails_the_export_and_writes_nothing(tmp_path, monkeypatch):
    import fssam.runtime.parity as parity

    monkeypatch.setattr(parity, "FP32_RTOL", 0.0)  # any real error now fails the gate
    monkeypatch.setattr(parity, "FP32_ATOL", 0.0)
    out = tmp_path / "gated"
    with pytest.raises(ParityError, match="FAILED") as info:
        export("tiny", out=str(out), progress=False, stages=False)  # the graphs' gate; the stages' is the same code
    assert info.value.report["failures"]
    assert not out.exists() and os.listdir(tmp_path) == []


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    import fssam.export.onnx_export as onnx_export

    real = onnx_export.export_stage
    calls = []

    def interrupt(model, name, *args):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(model, name, *args)

    monkeypatch.setattr(onnx_export, "export_stage", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export("tiny", out=str(tmp_path / "out"), progress=False)
    assert os.listdir(tmp_path) == []


def test_bad_checkpoints_and_options(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(CheckpointError, match="cannot be read"):
        export("tiny", out=str(tmp_path / "a"), checkpoint=str(corrupt), progress=False)
    unknown = tmp_path / "unknown.pth"
    torch.save({"something": {"x": torch.zeros(1)}}, unknown)
    result = subprocess.run([sys.executable, "-m", "fssam.cli", "export", "--config", "tiny", "--checkpoint", str(unknown),
                             "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "unrecognised checkpoint layout" in result.stderr
    with pytest.raises(InputError, match="precision 'fp8'"):
        export("tiny", out=str(tmp_path / "c"), precision="fp8")
    assert sorted(os.listdir(tmp_path)) == ["corrupt.pth", "unknown.pth"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error; the GPU test below builds engines")
def test_tensorrt_without_gpu_says_so(tmp_path):
    from fssam.export.tensorrt import TensorRTUnavailable

    with pytest.raises(TensorRTUnavailable, match="no CUDA device"):
        export("tiny", out=str(tmp_path / "trt"), tensorrt=True)
    assert not (tmp_path / "trt").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA GPU; this machine has none")
def test_tensorrt_engines_pass_the_gate(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT engines need the tensorrt package (pip install 'fssam-deploy[gpu]')")
    for precision, scma_node in (("fp32", "decomposed"), ("fp16", "decomposed"), ("bf16", "decomposed"),
                                 ("fp16", "custom"), ("bf16", "custom")):
        out = tmp_path / f"{precision}-{scma_node}"
        manifest = export("tiny", out=str(out), precision=precision, tensorrt=True, scma_node=scma_node,
                          progress=False)
        assert manifest["tensorrt"]["parity"]["passed"], (precision, scma_node, manifest["tensorrt"]["parity"]["failures"])
        assert all(os.path.isfile(out / e["file"]) for e in manifest["tensorrt"]["engines"].values())


class _FakeTensorRT:
    """Records what serialize_network asks of TensorRT (enough of the TensorRT 10 API for it)."""

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class BuilderFlag:
        TF32 = "TF32"

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    def __init__(self, parse_ok=True, profile_index=0):
        self.calls = []
        fake = self

        class Input:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            num_inputs = 2

            def get_input(self, i):
                return [Input("image", (-1, 3, 64, 64)), Input("scale", (1,))][i]

        class Parser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                pass

            def parse(self, data, path=None):
                fake.calls.append(("parse", path))
                return parse_ok

            def get_error(self, i):
                return "In node 3 (Foo): unsupported op"

        class Profile:
            def set_shape(self, name, *shapes):
                fake.calls.append(("profile", name, shapes))

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("pool", pool, size))

            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag))

            def clear_flag(self, flag):
                fake.calls.append(("clear_flag", flag))

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_profile",))
                return profile_index

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("network_flags", flags))
                return Network()

            create_builder_config = staticmethod(Config)
            create_optimization_profile = staticmethod(Profile)

            def build_serialized_network(self, network, config):
                return b"engine"

        self.Builder, self.OnnxParser = Builder, Parser


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_tensorrt_network_is_strongly_typed_with_a_batch_profile(monkeypatch, precision):
    """serialize_network against a recording stand-in (the real build needs a GPU): strongly typed
    network (the ONNX carries the dtypes; no deprecated FP16/BF16 flags), TF32 off for fp32,
    one profile over batch 1..8 for the dynamic input only, parser errors named."""
    from fssam.errors import FSSAMError
    from fssam.export import tensorrt as trt_export

    fake = _FakeTensorRT()
    monkeypatch.setattr(trt_export, "require_tensorrt", lambda: fake)
    assert trt_export.serialize_network(b"onnx", precision) == b"engine"
    assert ("network_flags", 1 << 1) in fake.calls
    assert not [c for c in fake.calls if c[0] == "set_flag"]
    assert (("clear_flag", "TF32") in fake.calls) == (precision == "fp32")
    assert [c for c in fake.calls if c[0] == "profile"] == [("profile", "image", ([1, 3, 64, 64], [1, 3, 64, 64],
                                                                                  [8, 3, 64, 64]))]
    bad = _FakeTensorRT(parse_ok=False)
    monkeypatch.setattr(trt_export, "require_tensorrt", lambda: bad)
    with pytest.raises(FSSAMError, match="cannot parse the ONNX model: In node 3"):
        trt_export.serialize_network(b"onnx", precision)
    with pytest.raises(FSSAMError, match="precision 'int8'"):
        trt_export.serialize_network(b"onnx", "int8")
    rejected = _FakeTensorRT(profile_index=-1)  # TensorRT's answer to an invalid profile
    monkeypatch.setattr(trt_export, "require_tensorrt", lambda: rejected)
    with pytest.raises(FSSAMError, match="rejected the optimisation profile"):
        trt_export.serialize_network(b"onnx", precision)


def test_tensorrt_parser_gets_the_onnx_path(monkeypatch, tmp_path):
    """build_engine hands the parser the file's path, so ONNX files with external weights (> 2 GB) parse."""
    from fssam.export import tensorrt as trt_export

    fake = _FakeTensorRT()
    monkeypatch.setattr(trt_export, "require_tensorrt", lambda: fake)
    onnx_path = tmp_path / "stage.onnx"
    onnx_path.write_bytes(b"onnx")
    trt_export.build_engine(str(onnx_path), str(tmp_path / "stage.engine"), "fp16")
    assert ("parse", str(onnx_path)) in fake.calls


def test_head_exports_with_custom_scma_nodes(tmp_path):
    """The TensorRT variant of the head: one fssam::SCMA node per memory-attention layer, no decomposition."""
    from fssam.export.onnx_export import _examples, export_stage
    from fssam.runtime.contract import stage_specs
    from fssam.ops.scma import onnx_custom_node

    model = build("tiny")
    path = str(tmp_path / "head.onnx")
    with onnx_custom_node(True):
        export_stage(model, "head", _examples(model, 1, torch.float32)["head"], stage_specs(model.config, 1)["head"], path)
    graph = onnx.load(path).graph
    nodes = [n for n in graph.node if n.domain == "fssam"]
    functions = [n for f in onnx.load(path).functions for n in f.node if n.domain == "fssam"]
    assert len(nodes + functions) == model.config.memory_attention_layers
    assert all(n.op_type == "SCMA" for n in nodes + functions)
    with pytest.raises(InputError, match="together with --tensorrt"):
        export("tiny", out=str(tmp_path / "x"), scma_node="custom")


def test_custom_scma_export_keeps_decomposed_graphs_for_onnx_runtime(tmp_path, monkeypatch):
    """--scma-node custom: head.onnx and query_segmenter.onnx stay runnable in ONNX Runtime (gate,
    python-ort serving); head.scma.onnx and query_segmenter.scma.onnx (fssam::SCMA nodes with the AOT
    attribute, listed with their sha256) are what the head stage's and the served query graph's
    engines are built from, so Triton's TensorRT backend serves the fused kernel (#13 item 4).
    TensorRT itself is stubbed here (no GPU): the engine builder only records its sources."""
    import fssam.export.tensorrt as trt_export
    from fssam.export import load_manifest

    built = {}

    def fake_build_engines(folder, manifest, model, progress=None):
        for name, entry in {**manifest["stages"], **manifest["graphs"]}.items():
            built[name] = entry.get("tensorrt_onnx", entry)["file"]
        return {"engines": {}, "parity": {"passed": True}, "graph_parity": {"passed": True}}

    monkeypatch.setattr(trt_export, "require_tensorrt", lambda: None)
    monkeypatch.setattr(trt_export, "build_engines", fake_build_engines)
    out = tmp_path / "custom"
    manifest = export("tiny", out=str(out), tensorrt=True, scma_node="custom", progress=False)
    assert manifest["parity"]["onnxruntime"]["passed"] and manifest["graph_parity"]["onnxruntime"]["passed"]
    assert built == {**{name: f"{name}.onnx" for name in (*STAGE_ORDER, *GRAPH_ORDER)},
                     "head": "head.scma.onnx", "query_segmenter": "query_segmenter.scma.onnx"}
    for name, group in (("head", "stages"), ("query_segmenter", "graphs")):
        assert load_manifest(str(out))[group][name]["tensorrt_onnx"]["file"] == f"{name}.scma.onnx"
        decomposed = onnx.load(str(out / f"{name}.onnx"))
        custom = onnx.load(str(out / f"{name}.scma.onnx"))
        fssam_nodes = [[n for n in m.graph.node if n.domain == "fssam"]
                       + [n for f in m.functions for n in f.node if n.domain == "fssam"] for m in (decomposed, custom)]
        assert not fssam_nodes[0] and len(fssam_nodes[1]) == manifest["config"]["memory_attention_layers"], name
        assert trt_export.plugin_kind(str(out / f"{name}.scma.onnx")) == "aot", name
    assert trt_export.plugin_kind(str(out / "support_encoder.onnx")) is None
    (out / "query_segmenter.scma.onnx").write_bytes(b"tampered")
    with pytest.raises(InputError, match="query_segmenter.scma.onnx.*sha256"):
        load_manifest(str(out))


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    from fssam.export import ExportError

    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("do not delete")
    with pytest.raises(ExportError, match="not an fssam export folder"):
        export("tiny", out=str(tmp_path / "precious"), progress=False)
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "do not delete"


def _machine_roots():
    import site

    import fssam

    repo = os.path.dirname(os.path.dirname(os.path.abspath(fssam.__file__)))
    return [r for r in {repo, *site.getsitepackages(), sys.prefix} if r and r != "/"]


def test_onnx_files_carry_no_machine_path(artifacts):
    out, manifest = artifacts
    roots = _machine_roots()

    def strings(model):
        yield model.doc_string
        yield model.graph.doc_string
        yield from (p.value for p in model.metadata_props)
        graphs = [model.graph]
        nodes = [n for f in model.functions for n in f.node]
        while graphs:
            graph = graphs.pop()
            for item in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
                yield item.doc_string
                yield from (p.value for p in item.metadata_props)
            for node in graph.node:
                nodes.append(node)
                graphs += [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]
        for node in nodes:
            yield node.doc_string
            yield from (p.key + p.value for p in node.metadata_props)

    files = [name for name in os.listdir(out) if name.endswith(".onnx")]
    assert len(files) == len(STAGE_ORDER) + len(GRAPH_ORDER)
    for name in files:
        model = onnx.load(os.path.join(out, name))
        found = [s for s in strings(model) if any(root in s for root in roots) or "stack_trace" in s]
        assert not found, (name, found[:2])
        assert any(len(n.metadata_props) for n in model.graph.node)  # other exporter metadata is kept
        raw = open(os.path.join(out, name), "rb").read()
        assert not any(root.encode() in raw for root in roots), name
    text = open(os.path.join(out, "manifest.json")).read()
    assert not any(root in text for root in roots)


def test_checkpoint_export_records_name_and_hash_and_compare_needs_it(tmp_path, capsys):
    from fssam.cli import main
    from fssam.model.checkpoint import file_sha256, save_fssam_checkpoint

    checkpoint = tmp_path / "weights" / "fssam_tiny.pth"
    checkpoint.parent.mkdir()
    save_fssam_checkpoint(build("tiny", seed=3), str(checkpoint))
    out = tmp_path / "exp"
    manifest = export("tiny", out=str(out), checkpoint=str(checkpoint), progress=False, stages=False)  # lean: faster
    entries = load_manifest(str(out))["weights"]["checkpoints"]
    assert entries == [{"file": "fssam_tiny.pth", "format": "fssam", "sha256": file_sha256(str(checkpoint))}]
    assert manifest["weights"]["source"] == "checkpoint"
    assert str(tmp_path) not in (out / "manifest.json").read_text()
    capsys.readouterr()
    assert main(["compare", "--artifacts", str(out)]) == 1
    assert "made from checkpoint(s) fssam_tiny.pth" in capsys.readouterr().err
    other = tmp_path / "other.pth"
    save_fssam_checkpoint(build("tiny", seed=4), str(other))
    assert main(["compare", "--artifacts", str(out), "--checkpoint", str(other)]) == 1
    assert "not among the checkpoints" in capsys.readouterr().err
    assert main(["compare", "--artifacts", str(out), "--checkpoint", str(checkpoint)]) == 0
    assert "PASSED" in capsys.readouterr().out


# ---------------------------------------------------------------- batch limits (--max-batch)

def test_tensorrt_profiles_come_from_the_export_limit(monkeypatch):
    """A 5-shot export with --max-batch 4: the per-image stages admit 4 x 5 = 20 images (and the
    query's 2B memory encodings), the per-episode stages and the graphs 4 episodes. Checked on the
    profile shapes serialize_network is given (runners.tensorrt.profile_shapes); TensorRT itself
    is a recording stand-in (no GPU here)."""
    from fssam.export import tensorrt as trt_export
    from fssam.model import get_config
    from fssam.runtime.contract import PER_IMAGE_STAGES, graph_specs, stage_specs
    from fssam.runtime.runners.tensorrt import batch_profile, profile_shapes

    config = get_config("tiny")
    specs = {**stage_specs(config, 5), **graph_specs(config, 5)}
    profiles = profile_shapes({name: spec.to_dict() for name, spec in specs.items()}, max_batch=4, shots=5)
    assert set(profiles) == set(STAGE_ORDER) | set(GRAPH_ORDER)
    for name, inputs in profiles.items():
        assert [t["name"] for t in specs[name].to_dict()["inputs"]] == list(inputs)
        for low, opt, high in inputs.values():
            assert low[0] == 1 and low[1:] == opt[1:] == high[1:]
            assert (opt[0], high[0]) == ((5, 20) if name in PER_IMAGE_STAGES else (1, 4)), name
    assert profiles["prior_backbone"]["images"][2] == [20, 3, 64, 64]
    assert profiles["support_encoder"]["support_images"][2] == [4, 5, 3, 64, 64]
    assert batch_profile("memory_encoder", 4, 1) == (1, 2, 8)  # 1-shot: the query's 2B encodings set the limit
    fake = _FakeTensorRT()
    monkeypatch.setattr(trt_export, "require_tensorrt", lambda: fake)
    trt_export.serialize_network(b"onnx", "fp16", batch_profile("image_encoder", 4, 5))
    assert [c for c in fake.calls if c[0] == "profile"] == [("profile", "image", ([1, 3, 64, 64], [5, 3, 64, 64],
                                                                                  [20, 3, 64, 64]))]


def test_build_engines_takes_each_profile_from_the_manifest_limit(tmp_path, monkeypatch):
    """What build_engines itself asks for, from a 5-shot manifest with max_batch 4: (1, 5, 20) images
    for the per-image stages, (1, 1, 4) episodes for the others and the graphs. The per-engine builder
    is a recorder (no GPU here); the run stops where build_engines next needs TensorRT."""
    from fssam.export import tensorrt as trt_export
    from fssam.model import get_config
    from fssam.runtime.contract import PER_IMAGE_STAGES, graph_specs, stage_specs

    class Stop(Exception):
        pass

    config = get_config("tiny")
    empty = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    entries = {}
    for name, spec in {**stage_specs(config, 5), **graph_specs(config, 5)}.items():
        onnx.save(empty, str(tmp_path / f"{name}.onnx"))
        entries[name] = {"file": f"{name}.onnx", **spec.to_dict()}
    manifest = {"stages": {name: entries[name] for name in STAGE_ORDER},
                "graphs": {name: entries[name] for name in GRAPH_ORDER},
                "shots": 5, "max_batch": 4, "precision": "fp16", "scma_node": "decomposed"}
    built = {}

    def record(onnx_path, engine_path, precision, batch):
        built[os.path.basename(onnx_path)] = (precision, batch)
        return {"seconds": 0.0, "bytes": 0}

    def stop():
        raise Stop

    monkeypatch.setattr(trt_export, "build_engine", record)
    monkeypatch.setattr(trt_export, "require_tensorrt", stop)
    with pytest.raises(Stop):
        trt_export.build_engines(str(tmp_path), manifest, model=None)
    assert built == {f"{name}.onnx": ("fp16", (1, 5, 20) if name in PER_IMAGE_STAGES else (1, 1, 4))
                     for name in (*STAGE_ORDER, *GRAPH_ORDER)}
    assert built["prior_backbone.onnx"][1][2] == 20


def test_the_limit_is_recorded_and_runners_refuse_a_batch_over_it(artifacts):
    """Default --max-batch 8 (1-shot): 8 episodes, 16 images for the per-image stages; a larger
    batch is a clear error before anything runs."""
    out, manifest = artifacts
    assert manifest["max_batch"] == 8
    assert manifest["stages"]["image_encoder"]["max_batch"] == 16 and manifest["stages"]["prior"]["max_batch"] == 8
    assert {manifest["graphs"][name]["max_batch"] for name in GRAPH_ORDER} == {8}
    runner = as_torch(open_runner("onnxruntime", out))
    with pytest.raises(InputError, match=r"stage image_encoder: batch 17 is over this export's limit of 16 "
                                         r"\(--max-batch 8 episodes, 1-shot\)"):
        runner.image_encoder(torch.zeros(17, 3, 64, 64))
    support = torch.zeros(9, 1, 3, 64, 64, dtype=torch.uint8), torch.zeros(9, 1, 64, 64, dtype=torch.uint8)
    with pytest.raises(InputError, match="stage support_encoder: batch 9 is over"):
        runner.support_encoder(*support)
    with pytest.raises(InputError, match="max_batch must be in 1..64"):
        export("tiny", out="unused", max_batch=0)


# ---------------------------------------------------------------- bf16

def test_bf16_export_passes_the_checker_and_its_gate_says_what_it_ran(tmp_path):
    """`fssam export --precision bf16` (5-shot, --max-batch 4): the fp32 model traced under bf16
    autocast (the official precision) at opset 22, fp32 tensors between stages, bf16 weights and
    matrix products inside; LayerNorm of a bf16 activation with fp32 weights (ONNX wants one type)
    cast to fp32; every file through ONNX's full check. ONNX Runtime's CPU provider has no bf16
    kernels, so the gate runs fp32 arithmetic with bf16 rounding after every operator, against
    2x eager bf16 autocast's error, and the manifest says so. The graphs keep uint8 inputs."""
    from fssam.runtime.bf16 import tensor_types
    from fssam.runtime.runners.tensorrt import profile_shapes

    out = tmp_path / "bf16"
    result = subprocess.run([sys.executable, "-m", "fssam.cli", "export", "--config", "tiny", "--precision", "bf16",
                             "--shots", "5", "--max-batch", "4", "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PASSED" in result.stdout and "bf16 at opset 22, traced under autocast" in result.stdout
    manifest = load_manifest(str(out))
    assert manifest["precision"] == "bf16" and manifest["dtype"] == "float32"  # the tensors between stages
    assert manifest["opset"] == 22 and manifest["max_batch"] == 4
    bf16 = manifest["bf16"]
    assert bf16["opset"] == 22 and "fp32 arithmetic per operator" in bf16["gate"]["onnxruntime"]
    assert {op for ops in bf16["fp32_ops"].values() for op in ops} <= {"Einsum", "LayerNormalization"}
    assert bf16["fp32_ops"]["image_encoder"]["LayerNormalization"] > 0
    for report in (manifest["parity"]["onnxruntime"], manifest["graph_parity"]["onnxruntime"]):
        assert report["passed"] and report["baseline"] == "bf16_autocast", report["failures"]
        assert "fp32 arithmetic per operator" in report["runtime"]
    bf16_type, fp32, uint8 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8
    for name in (*STAGE_ORDER, *GRAPH_ORDER):
        entry = manifest["stages"].get(name) or manifest["graphs"][name]
        assert entry["precision"] == "bf16"
        model = onnx.load(str(out / entry["file"]))
        onnx.checker.check_model(model, full_check=True)
        assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {22}
        inputs = [i.type.tensor_type.elem_type for i in model.graph.input]
        assert inputs == ([uint8, uint8] if name == "support_encoder" else [uint8] + [fp32] * 3 + [uint8]
                          if name == "query_segmenter" else [fp32] * len(inputs)), name
        assert {o.type.tensor_type.elem_type for o in model.graph.output} == {fp32}, name
        types = tensor_types(model)
        bf16_matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")
                        and any(types.get(i) == bf16_type for i in n.input if i)]
        # prior, refine: cosines and weighted sums, no convolution or matrix product for autocast to lower
        assert bool(bf16_matmuls) == (name not in ("prior", "refine")), name
        has_bf16 = bf16_type in types.values()
        assert entry["onnxruntime_cpu"].startswith("does not load: " if has_bf16 else "loads"), name
        assert entry["computes"] == ("bf16" if has_bf16 else "fp32"), name  # the manifest says which are not bf16
        assert (name in bf16["bf16_units"], name in bf16["fp32_units"]) == (has_bf16, not has_bf16), name
        for tensor in (i.name for i in model.graph.input if i.type.tensor_type.elem_type == uint8):
            casts = [n for n in model.graph.node if tensor in n.input and n.op_type == "Cast"]
            assert [n.attribute[0].i for n in casts] == [fp32], tensor
    profiles = profile_shapes({**manifest["stages"], **manifest["graphs"]}, manifest["max_batch"], manifest["shots"])
    assert profiles["image_encoder"]["images"][2][0] == 20 and profiles["head"]["feat_s0"][2][0] == 4


# ---------------------------------------------------------------- position embeddings as constants

def _constant_subgraph_ops(model) -> set:
    """Op types of the nodes computed from initializers and constants alone (what a runtime folds)."""
    constant = {i.name for i in model.graph.initializer}
    ops = set()
    for node in model.graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type == "Constant" or (inputs and all(i in constant for i in inputs)):
            constant.update(node.output)
            if node.op_type != "Constant":
                ops.add(node.op_type)
    return ops


def test_position_embeddings_are_constants_of_the_graphs(artifacts):
    """Hiera's position embedding (a bicubic resize of its pos_embed plus the tiled window embedding)
    and the prompt encoder's dense one (sin, cos of a projection) are computed at export time: no
    graph holds a subgraph making them, which OpenVINO folded with reference kernels at every
    compile (about 27 s a small graph on two cores)."""
    out, manifest = artifacts
    for name in ("image_encoder", "head", *GRAPH_ORDER):
        model = onnx.load(os.path.join(out, f"{name}.onnx"))
        assert not _constant_subgraph_ops(model) & {"Resize", "Sin", "Cos"}, name


def test_folded_position_embeddings_are_the_modules_own_values_and_are_undone(tiny_model):
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.sam.prompt_encoder import PromptEncoder

    from fssam.export.constants import folded_position_embeddings

    hiera = next(m for m in tiny_model.modules() if isinstance(m, Hiera))
    prompt = next(m for m in tiny_model.modules() if isinstance(m, PromptEncoder))
    grid = tiny_model.config.image_size // hiera.patch_embed.proj.stride[0]
    with torch.no_grad():
        expected, dense = hiera._get_pos_embed((grid, grid)), prompt.get_dense_pe()
        other = hiera._get_pos_embed((grid // 2, grid // 2))
    buffers = {name for name, _ in tiny_model.named_buffers()}
    with folded_position_embeddings(tiny_model, tiny_model.config.image_size):
        assert torch.equal(hiera._get_pos_embed((grid, grid)), expected)
        assert torch.equal(hiera._get_pos_embed((grid // 2, grid // 2)), other)  # another size: computed
        assert torch.equal(prompt.get_dense_pe(), dense)
    assert "_get_pos_embed" not in vars(hiera) and "get_dense_pe" not in vars(prompt)
    assert {name for name, _ in tiny_model.named_buffers()} == buffers
    with pytest.raises(RuntimeError, match="inside"):
        with folded_position_embeddings(tiny_model, tiny_model.config.image_size):
            raise RuntimeError("inside")
    assert "_get_pos_embed" not in vars(hiera) and {name for name, _ in tiny_model.named_buffers()} == buffers
