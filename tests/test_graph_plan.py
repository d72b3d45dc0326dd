"""The graph plan (fssam.export.graph_plan): every candidate of this machine gated and timed per
deployable graph, int8 with its fall-backs, the choice, and the plan served by the real tritonserver.

Nothing here assumes this machine's plan: which candidates pass and which is fastest differ
between CPUs (VNNI, native bf16 or neither); the tests check the rules that hold everywhere."""

import json
import os
import shutil

import pytest
import torch

from fssam.export import graph_plan


def _entry(ms, passed, runtime="onnxruntime", precision="fp32", worst=0.1):
    return {"ms": ms, "passed": passed, "runtime": runtime, "precision": precision, "worst": worst}


# ---------------------------------------------------------------- the choice, from gate results and times

def test_choose_takes_the_fastest_candidate_that_passed():
    tried = {"onnxruntime fp32": _entry(10.0, True), "onnxruntime int8": _entry(4.0, False, precision="int8"),
             "openvino fp32": _entry(7.0, True, "openvino")}
    assert graph_plan.choose(tried) == "openvino fp32"  # int8 is faster but failed its gate
    tried["openvino int8"] = _entry(5.0, True, "openvino", "int8")
    assert graph_plan.choose(tried) == "openvino int8"
    tied = {"onnxruntime fp32": _entry(3.0, True), "openvino fp32": _entry(3.0, True, "openvino")}
    assert graph_plan.choose(tied) == "onnxruntime fp32"  # a tie: the earlier candidate
    assert graph_plan.choose({key: {**value, "passed": False} for key, value in tried.items()}) is None


def test_each_graph_chooses_alone_so_an_ensemble_may_mix_runtimes():
    tried = {
        "support_encoder": {"onnxruntime fp32": _entry(30.0, True), "onnxruntime int8": _entry(12.0, True, precision="int8"),
                            "openvino int8": _entry(15.0, True, "openvino", "int8")},
        "query_segmenter": {"onnxruntime fp32": _entry(40.0, True), "onnxruntime int8": _entry(20.0, False, precision="int8"),
                            "openvino bf16": _entry(25.0, True, "openvino", "bf16")},
    }
    chosen = {name: graph_plan.choose(entries) for name, entries in tried.items()}
    assert chosen == {"support_encoder": "onnxruntime int8", "query_segmenter": "openvino bf16"}


def test_an_end_to_end_failure_steps_the_worst_reduced_graph_up_one_precision():
    tried = {
        "support_encoder": {"onnxruntime fp32": _entry(30.0, True), "openvino bf16": _entry(20.0, True, "openvino", "bf16", 0.4),
                            "openvino int8": _entry(10.0, True, "openvino", "int8", 0.5)},
        "query_segmenter": {"onnxruntime fp32": _entry(40.0, True), "onnxruntime int8": _entry(20.0, True, precision="int8",
                                                                                            worst=0.7)},
    }
    chosen = {"support_encoder": "openvino int8", "query_segmenter": "onnxruntime int8"}
    assert graph_plan.step_down(chosen, tried) == ("query_segmenter", "onnxruntime fp32")  # 0.7 > 0.5 of its limits
    chosen["query_segmenter"] = "onnxruntime fp32"
    assert graph_plan.step_down(chosen, tried) == ("support_encoder", "openvino bf16")  # int8 -> the faster float left
    assert graph_plan.step_down({"support_encoder": "onnxruntime fp32", "query_segmenter": "onnxruntime fp32"},
                                tried) is None  # nothing reduced: the failure is the export's, not the plan's


def test_fall_back_levels_keep_fewer_parts_quantized(tiny_artifacts):
    """The parts kept in float come from the exporter's module scopes: every level keeps more of
    the graph in float than the one before, and the last quantizes DINOv2 only."""
    import onnx

    out, _ = tiny_artifacts
    model = onnx.load(os.path.join(out, "query_segmenter.onnx"), load_external_data=False)
    parts = graph_plan.node_parts(model)
    assert {"model.dino", "model.sam2.image_encoder", "model.sam2.memory_attention"} <= set(parts.values())
    excluded = [set(graph_plan.excluded_nodes(model, level, graph_plan.ORT_OPS)) for level in range(len(graph_plan.FALLBACK))]
    assert excluded[0] == set() and all(a < b for a, b in zip(excluded, excluded[1:]))
    quantized_last = [n.name for n in model.graph.node if n.op_type in graph_plan.ORT_OPS and n.name not in excluded[-1]]
    assert quantized_last and all(parts[name] == "model.dino" for name in quantized_last)


# ---------------------------------------------------------------- a real plan on the tiny config

# tiny_plan (tests/conftest.py): tiny's graphs with a plan in which every candidate is gated


def test_plan_records_every_candidate_its_gate_and_time_and_the_choice(tiny_plan):
    out, manifest = tiny_plan
    plan = manifest["graph_plan"]
    available, skipped = graph_plan.candidates()
    assert "stages" in manifest and manifest["stages"] == {}  # lean: only the deployable graphs
    assert set(plan["skipped"]) == set(skipped) and "torch aoti" in plan["skipped"]
    for name in ("support_encoder", "query_segmenter"):
        entries = plan["candidates"][name]
        assert list(entries) == [graph_plan.label(*c) for c in available]
        for key, entry in entries.items():
            assert entry["gated"] and entry["ms"] > 0 and entry["timed_runs"] >= 3, (name, key)
            assert isinstance(entry["passed"], bool) and entry["worst"] >= 0
            if entry["precision"] != "fp32":  # the rule: within 2x autocast's error (margin 1.0 here)
                assert entry["passed"] == (entry["within_limits"] and entry["worst"] <= 1.0)
            if graph_plan.is_int8(entry["precision"]):
                assert entry["attempts"] and entry["attempts"][-1]["fallback"] == entry["fallback"]
                assert entry["method"]
                # each int8 candidate's own file, kept only where it passed its gate (and listed with its hash)
                assert (entry["file"] is not None) == entry["passed"], (name, key)
                if entry["passed"]:
                    assert entry["file"].startswith(os.path.join(entry["runtime"], entry["precision"]) + os.sep)
        static = entries["onnxruntime int8-static"]
        assert "quantize_static, QDQ" in static["method"] and static["calibration_items"] >= 2
        assert entries["onnxruntime fp32"]["passed"]  # the exported graph itself: fp32 always passes
        chosen = plan["chosen"][name]
        key = graph_plan.choose(entries)
        assert (chosen["runtime"], chosen["precision"]) == (entries[key]["runtime"], entries[key]["precision"])
        assert chosen["backend"] == {"onnxruntime": "python-ort", "openvino": "python-openvino"}[chosen["runtime"]]
    assert plan["end_to_end"]["passed"] and plan["end_to_end"]["limit"] > plan["end_to_end"]["max_abs"]
    for key, entry in plan["int8_files"].items():  # every int8 file kept passed its gate and is in the manifest
        runtime, name = key.split("/")
        assert plan["candidates"][name][f"{runtime} int8"]["passed"]
        assert os.path.isfile(os.path.join(out, entry["file"]))
    kept = {e["file"] for e in plan["int8_files"].values()}
    kept |= {e["file"] for entries in plan["candidates"].values() for e in entries.values()
             if e["precision"] == "int8-static" and e["passed"]}
    for folder in ("onnxruntime/int8", "onnxruntime/int8-static", "openvino/int8"):
        for file in os.listdir(os.path.join(out, folder)) if os.path.isdir(os.path.join(out, folder)) else []:
            assert os.path.join(folder, file) in kept or os.path.join(folder, file[:-4] + ".xml") in kept, file


def test_a_failing_int8_gate_falls_back_part_by_part_and_the_manifest_says_so(tiny_plan, tmp_path, tiny_model,
                                                                             monkeypatch):
    """With no room for any error (margin 0), int8 cannot pass: every fall-back level is tried and
    recorded, the file is removed, and the graph stays on the fp32 candidate. The first level of
    both graphs is quantized ahead in worker processes (as for graphs of real size; tiny's are
    below the threshold), the fall-backs here."""
    from fssam.runtime.manifest import load_manifest

    made = []
    real = graph_plan.Planner.quantize_ahead

    def ahead(planner, int8):
        real(planner, int8)
        made.extend(sorted(planner.ahead))

    monkeypatch.setattr(graph_plan, "AHEAD_MIN_BYTES", 0)
    monkeypatch.setattr(graph_plan.Planner, "quantize_ahead", ahead)

    out = str(tmp_path / "copy")
    shutil.copytree(tiny_plan[0], out)
    manifest = load_manifest(out)
    manifest.pop("graph_plan")
    plan = graph_plan.plan_graphs(out, manifest, tiny_model, only=["onnxruntime fp32", "onnxruntime int8"],
                                  margin=0.0, prune=False)
    for name in ("support_encoder", "query_segmenter"):
        int8 = plan["candidates"][name]["onnxruntime int8"]
        assert not int8["passed"] and int8["file"] is None
        assert [a["fallback"] for a in int8["attempts"]] == [label for label, _ in graph_plan.FALLBACK]
        assert all(not a["passed"] and a["worst"] > 0 for a in int8["attempts"])  # each attempt gated, none passed
        assert plan["chosen"][name]["precision"] == "fp32"
    assert plan["int8_files"] == {} and not os.listdir(os.path.join(out, "onnxruntime", "int8"))
    assert made == [("onnxruntime", "int8", "query_segmenter"), ("onnxruntime", "int8", "support_encoder")]


def test_candidates_are_gated_fastest_first_and_the_slower_ones_say_why_not(tiny_plan, tmp_path, tiny_model):
    """By default every candidate is timed, then gated fastest first until one passes: the slower
    ones could not be chosen, are not gated, and say so."""
    from fssam.runtime.manifest import load_manifest

    out = str(tmp_path / "copy")
    shutil.copytree(tiny_plan[0], out)
    manifest = load_manifest(out)
    manifest.pop("graph_plan")
    plan = graph_plan.plan_graphs(out, manifest, tiny_model, only=["onnxruntime fp32", "openvino fp32"])
    for name, entries in plan["candidates"].items():
        fast, slow = sorted(entries, key=lambda key: entries[key]["ms"])
        assert entries[fast]["gated"] and entries[fast]["passed"]  # fp32 on either runtime passes
        assert not entries[slow]["gated"] and not entries[slow]["passed"]
        assert f"no faster than {fast}" in entries[slow]["note"]
        assert (plan["chosen"][name]["runtime"], plan["chosen"][name]["precision"]) == (
            entries[fast]["runtime"], entries[fast]["precision"])


# ---------------------------------------------------------------- served

def _serve(folder, repository):
    from fssam.serving.server import TritonServer

    triton = TritonServer(str(repository), http_port=0, grpc_port=0, log_path=str(folder / "tritonserver.log"),
                          cache_mb=16)
    triton.start(timeout=300)
    return triton


def _episode(seed):
    from fssam.runtime.parity import sample_episode
    from fssam.model import get_config

    return sample_episode(get_config("tiny"), 1, batch=1, seed=seed)


def _served_matches(tmp_path, repository, pair, tiny_model, reduced: bool):
    """Served logits equal the same graphs in process (fp32 limit) and keep the gate's rule vs eager."""
    from fssam.runtime.contract import run_graphs
    from fssam.runtime.parity import Baseline, check_end_to_end, fp32_limit
    from fssam.serving.client import RemoteFSSAM

    triton = _serve(tmp_path, repository)
    try:
        with RemoteFSSAM(triton.grpc_url) as remote:
            for seed in (7, 31):
                query, supports, masks = _episode(seed)
                logits = remote.infer(query, supports, masks)
                with torch.inference_mode():
                    inprocess = run_graphs(pair, query, supports, masks).float()
                    eager = tiny_model(query, supports, masks)
                assert (logits - inprocess).abs().max().item() <= fp32_limit(inprocess.abs().max().item())
                if seed == 7:  # the gate's episode
                    low = Baseline(tiny_model, "fp32", "bf16_autocast").episode(query, supports, masks) if reduced else None
                    end, failures = check_end_to_end(logits, eager, low, "bf16_autocast" if reduced else "fp32")
                    assert not failures, failures
    finally:
        triton.stop()


def test_int8_graphs_of_both_runtimes_served_by_tritonserver(tiny_plan, tmp_path, tiny_model):
    """`fssam repository --precision int8` on python-ort and python-openvino serves the gated int8
    graphs (the native configs point at the same files); a runtime whose int8 failed its gate for a
    graph is refused, naming the graph."""
    from fssam.errors import ConfigError
    from fssam.serving.repository import write_repository

    out, manifest = tiny_plan
    files = manifest["graph_plan"]["int8_files"]
    for runtime, backend, native, model_file in (("onnxruntime", "python-ort", "onnxruntime", "model.onnx"),
                                                 ("openvino", "python-openvino", "openvino", "model.xml")):
        have = {name for name in ("support_encoder", "query_segmenter") if f"{runtime}/{name}" in files}
        repository = tmp_path / f"repo-{runtime}"
        if have != {"support_encoder", "query_segmenter"}:
            with pytest.raises(ConfigError, match=f"{runtime} int8 of .* failed its gate"):
                write_repository(out, str(repository), backend=backend, precision="int8")
            continue
        info = write_repository(out, str(repository), backend=backend, precision="int8")
        assert {g["precision"] for g in info["graphs"].values()} == {"int8"}
        for name in ("support_encoder", "query_segmenter"):
            served = repository / name / "1" / model_file
            with open(os.path.join(out, files[f"{runtime}/{name}"]["file"]), "rb") as source:
                assert served.read_bytes() == source.read()
        native_info = write_repository(out, str(tmp_path / f"native-{runtime}"), backend=native, precision="int8")
        assert {g["precision"] for g in native_info["graphs"].values()} == {"int8"}
        from fssam.export.graph_plan import GraphPair, open_candidate

        pair = GraphPair({name: open_candidate(out, runtime, "int8", {name: files[f"{runtime}/{name}"]["file"]})
                          for name in ("support_encoder", "query_segmenter")})
        _served_matches(tmp_path, repository, pair, tiny_model, reduced=True)


def test_the_plan_served_as_one_ensemble_even_when_its_graphs_mix_runtimes(tiny_plan, tmp_path, tiny_model):
    """--backend plan: each graph on its own backend. A plan whose graphs run on different runtimes
    (both candidates passed their gates; the plan's choice edited to mix them) serves as one ensemble."""
    from fssam.export.graph_plan import open_plan
    from fssam.runtime.manifest import MANIFEST, load_manifest
    from fssam.serving.repository import write_repository

    out = tmp_path / "mixed"
    shutil.copytree(tiny_plan[0], out)
    manifest = load_manifest(str(out))
    chosen = manifest["graph_plan"]["chosen"]
    candidates = manifest["graph_plan"]["candidates"]
    assert candidates["support_encoder"]["onnxruntime fp32"]["passed"]
    assert candidates["query_segmenter"]["openvino fp32"]["passed"]
    chosen["support_encoder"] = {"runtime": "onnxruntime", "precision": "fp32", "backend": "python-ort",
                                 "file": manifest["graphs"]["support_encoder"]["file"], "ms": 1.0}
    chosen["query_segmenter"] = {"runtime": "openvino", "precision": "fp32", "backend": "python-openvino",
                                 "file": manifest["graphs"]["query_segmenter"]["file"], "ms": 1.0}
    (out / MANIFEST).write_text(json.dumps(manifest))
    info = write_repository(str(out), str(tmp_path / "repo"), backend="plan")
    assert {name: g["backend"] for name, g in info["graphs"].items()} == {"support_encoder": "python-ort",
                                                                        "query_segmenter": "python-openvino"}
    config = (tmp_path / "repo" / "query_segmenter" / "config.pbtxt").read_text()
    assert '"openvino"' in config and "model.onnx" in config
    _served_matches(tmp_path, tmp_path / "repo", open_plan(str(out), manifest), tiny_model, reduced=False)


def test_a_candidate_left_out_is_skipped_with_its_reason_and_an_unknown_one_refused(tiny_artifacts, tiny_model):
    """`leave_out` (what `fssam deploy` passes to bound its time) before any work: an unknown label
    is one ConfigError naming it."""
    from fssam.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot leave out 'onnxruntime int4': not a candidate"):
        graph_plan.plan_graphs(tiny_artifacts[0], tiny_artifacts[1], tiny_model, leave_out={"onnxruntime int4": "x"})
