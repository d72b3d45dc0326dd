"""`fssam bench`: the output files are well-formed, every mode is a ratio to both eager baselines,
the CPU is recorded, and modes this machine cannot run are skipped with the reason (timings are
reported, not tested). Real OpenVINO throughout; a CPU without bf16 is a fake cpuinfo file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fssam.bench.report import speedups
from fssam.runtime import cpu

FAKE_CPUINFO = "processor\t: 0\nmodel name\t: Fake CPU without bf16\nflags\t\t: fpu sse2 avx2 avx512f\n\n"
KINDS = ("episode", "cached_support")
BASELINE_KEYS = {"vs_eager_fp32": "eager_fp32", "vs_eager_bf16": "eager_bf16"}


def bench(tmp_path, *argv, env=None, timeout=300):
    """`fssam bench --quick ... --no-progress` in a subprocess, OpenVINO's compile cache under tmp_path."""
    environ = {**os.environ, "FSSAM_OPENVINO_CACHE": str(tmp_path / "openvino-cache"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "fssam.cli", "bench", "--quick", "--no-progress", *argv],
                          capture_output=True, text=True, timeout=timeout, env=environ)


@pytest.fixture
def cpu_without_bf16(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(FAKE_CPUINFO)
    return {"FSSAM_CPUINFO": str(path)}


def test_quick_bench_writes_json_table_and_plots(tiny_artifacts, tmp_path):
    artifacts, _ = tiny_artifacts
    out = tmp_path / "quick"
    result = bench(tmp_path, "--artifacts", artifacts, "--out", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "results.json").read_text())
    assert data["config"] == "tiny" and "RANDOM-INIT" in data["weights"]
    assert data["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    assert data["machine"]["cores"] >= 1 and data["machine"]["packages"]["torch"]
    modes = data["runs"]["1"]["modes"]
    assert set(modes) == {"eager_fp32", "eager_bf16", "onnxruntime"}
    for mode in modes.values():
        assert mode["episode"]["n"] == 3 and mode["episode"]["median_ms"] > 0
        assert mode["episode"]["median_ms"] <= mode["episode"]["p90_ms"] <= mode["episode"]["p99_ms"]
        assert mode["cached_support"]["median_ms"] > 0 and mode["peak_rss_mb"] > 0
        assert mode["device"] in ("cpu", "cuda")
        assert set(mode["stages"]) == {"prior_backbone", "image_encoder", "prior", "memory_encoder", "refine", "head"}
    table = (out / "results.md").read_text()
    assert "| eager_fp32 |" in table and "| onnxruntime |" in table
    assert "episode vs eager fp32" in table and "cached vs eager bf16 autocast" in table
    for name in ("latency_stages_1shot.png", "throughput_1shot.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
    assert not (out / "artifacts-1shot").exists()  # the given artifacts were reused
    assert modes["eager_fp32"]["device"] == data["device"]
    assert modes["onnxruntime"]["device"] == ("cuda" if modes["onnxruntime"]["io_binding"] else "cpu")
    assert modes["onnxruntime"]["providers"] and modes["onnxruntime"]["providers"][0] in modes["onnxruntime"]["runtime"]
    check = modes["onnxruntime"]["check"]  # the mode's output on the bench episode, fp32 rule
    assert check["passed"] is True and check["baseline"] == "fp32" and check["max_abs"] <= check["limit"] < 1e-3
    assert "check" not in modes["eager_fp32"] and "check" not in modes["eager_bf16"]
    assert "Output check on the bench episode against eager fp32" in table and "onnxruntime passed" in table


def test_openvino_modes_are_ratios_to_both_baselines_with_the_cpu_recorded(tiny_artifacts, tmp_path):
    """With native bf16 the bench exports the gated OpenVINO bf16 plan itself (the shared export has
    none, and bf16 runs no other way) and runs it."""
    bf16 = cpu.native_bf16()
    asked = ["eager_fp32", "eager_bf16", "openvino_fp32"] + (["openvino_bf16"] if bf16 else [])
    out = tmp_path / "ov"
    artifacts = [] if bf16 else ["--artifacts", tiny_artifacts[0]]
    result = bench(tmp_path, "--modes", ",".join(asked), "--threads", "1", *artifacts, "--out", str(out))
    bf16_check = json.loads((out / "results.json").read_text())["runs"]["1"]["modes"].get("openvino_bf16", {}).get("check")
    # every mode passes its output check on the bench episode, one the export's gates never saw (a failing
    # check exits 1 with the results written and the row marked)
    assert result.returncode == 0 and (bf16_check is None or bf16_check["passed"]), (result.stderr, bf16_check)
    if bf16:
        assert "exporting tiny 1-shot" in result.stderr
        manifest = json.loads((out / "artifacts-1shot" / "manifest.json").read_text())
        assert manifest["openvino"]["bf16"]["parity"]["passed"]
        runtime = json.loads((out / "results.json").read_text())["runs"]["1"]["modes"]["openvino_bf16"]["runtime"]
        chosen = {name: entry["precision"] for name, entry in manifest["openvino"]["bf16"]["stages"].items()}
        assert runtime.startswith("OpenVINO bf16") and all(f"{name} {p}" in runtime for name, p in chosen.items()
                                                           if len(set(chosen.values())) > 1), runtime
    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]["1"]
    assert list(runs["modes"]) == asked and runs["skipped"] == {} and data["threads"] == 1
    assert runs["modes"]["openvino_fp32"]["runtime"] == "OpenVINO fp32" and runs["modes"]["openvino_fp32"]["device"] == "cpu"
    assert runs["modes"]["openvino_fp32"]["check"]["passed"] is True
    if bf16:  # the check's limit is the 2x autocast rule on the bench episode
        from fssam.model import build
        from fssam.runtime.parity import ieee_fp32, sample_episode

        model = build("tiny", seed=0)
        episode = sample_episode(model.config, 1, seed=100)  # the bench's: --seed 0 + 100
        with torch.inference_mode():
            with ieee_fp32():
                exact = model(*episode)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                autocast = model(*episode).float()
        assert bf16_check["baseline"] == "bf16_autocast"
        assert bf16_check["limit"] == pytest.approx(2 * (autocast - exact).abs().max().item() + 1e-6, rel=1e-6)
        assert "(output check FAILED)" not in (out / "results.md").read_text()
    assert set(runs["speedups"]) == set(asked)
    for name, ratios in runs["speedups"].items():
        assert set(ratios) == set(BASELINE_KEYS)
        for key, baseline in BASELINE_KEYS.items():
            assert set(ratios[key]) == set(KINDS)
            for kind in KINDS:  # baseline median / mode median, the same kind on both sides
                expected = runs["modes"][baseline][kind]["median_ms"] / runs["modes"][name][kind]["median_ms"]
                assert ratios[key][kind] == pytest.approx(expected, rel=1e-3)
    assert runs["speedups"]["eager_fp32"]["vs_eager_fp32"] == {"episode": 1.0, "cached_support": 1.0}
    assert runs["speedups"]["eager_bf16"]["vs_eager_bf16"] == {"episode": 1.0, "cached_support": 1.0}

    machine, info = data["machine"], cpu.cpu_info()
    assert machine["cpu_model"] == info["model"] and machine["cpu_flags"] == info["reported"]
    assert {"amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni"} <= set(machine["cpu_flags"])
    assert all(isinstance(present, bool) for present in machine["cpu_flags"].values())
    assert machine["packages"]["openvino"] and machine["packages"]["nncf"]

    table = (out / "results.md").read_text()
    for header in ("episode vs eager fp32", "episode vs eager bf16 autocast", "cached vs eager fp32",
                   "cached vs eager bf16 autocast"):
        assert f"| {header} |" in table
    assert "| openvino_fp32 |" in table and "Skipped" not in table
    machine_line = table.strip().splitlines()[-1]
    assert machine_line.startswith(f"Machine: {info['model']};") and "avx512_bf16" in machine_line and "amx_int8" in machine_line


@pytest.mark.skipif(not cpu.native_bf16(), reason="without native bf16 the openvino_bf16 mode is skipped, not refused")
def test_openvino_bf16_mode_needs_a_gated_plan(tiny_artifacts, tmp_path):
    result = bench(tmp_path, "--modes", "openvino_bf16", "--artifacts", tiny_artifacts[0], "--out", str(tmp_path / "x"))
    assert result.returncode == 1 and not (tmp_path / "x").exists()
    last = result.stderr.strip().splitlines()[-1]
    assert last.endswith("has no OpenVINO bf16 plan, which the openvino_bf16 mode needs: export it with "
                         "`fssam export --openvino bf16`, or leave --artifacts out"), result.stderr


def test_missing_baselines_are_added(tiny_artifacts, tmp_path):
    out = tmp_path / "added"
    result = bench(tmp_path, "--modes", "openvino_fp32", "--iterations", "1", "--warmup", "0",
                   "--artifacts", tiny_artifacts[0], "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "adding the baseline mode(s) eager_fp32, eager_bf16" in result.stderr
    runs = json.loads((out / "results.json").read_text())["runs"]["1"]
    assert list(runs["modes"]) == ["eager_fp32", "eager_bf16", "openvino_fp32"]
    assert runs["speedups"]["openvino_fp32"]["vs_eager_bf16"]["cached_support"] > 0


def test_openvino_bf16_is_skipped_on_a_cpu_without_bf16(tiny_artifacts, tmp_path, cpu_without_bf16):
    out = tmp_path / "skipped"
    result = bench(tmp_path, "--modes", "eager_fp32,eager_bf16,openvino_fp32,openvino_bf16", "--iterations", "1",
                   "--warmup", "0", "--artifacts", tiny_artifacts[0], "--out", str(out), env=cpu_without_bf16)
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]["1"]
    assert list(runs["modes"]) == ["eager_fp32", "eager_bf16", "openvino_fp32"]
    reason = runs["skipped"]["openvino_bf16"]
    assert "amx_bf16" in reason and "avx512_bf16" in reason and "Fake CPU without bf16" in reason
    assert f"skipping openvino_bf16: {reason}" in result.stderr
    assert f"- openvino_bf16: {reason}" in (out / "results.md").read_text()
    assert data["machine"]["cpu_model"] == "Fake CPU without bf16"
    assert data["machine"]["cpu_flags"] == {flag: flag == "avx512f" for flag in cpu.REPORTED_FLAGS}


def test_a_run_whose_every_asked_mode_is_skipped_fails_with_the_reason(tmp_path, cpu_without_bf16):
    result = bench(tmp_path, "--modes", "openvino_bf16", "--out", str(tmp_path / "x"), env=cpu_without_bf16)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "no asked bench mode can run on this machine: openvino_bf16:" in last and "avx512_bf16" in last


def test_speedups_divide_the_baseline_median_by_the_mode_median_of_the_same_kind():
    def mode(episode, cached):
        return {"episode": {"median_ms": episode}, "cached_support": {"median_ms": cached}}

    modes = {"eager_fp32": mode(10.0, 5.0), "eager_bf16": mode(20.0, 8.0), "fast": mode(5.0, 4.0)}
    assert speedups(modes)["fast"] == {"vs_eager_fp32": {"episode": 2.0, "cached_support": 1.25},
                                       "vs_eager_bf16": {"episode": 4.0, "cached_support": 2.0}}
    assert speedups({"fast": mode(5.0, 4.0)})["fast"]["vs_eager_bf16"] == {"episode": None, "cached_support": None}


def test_unknown_mode_is_one_error_line(tmp_path):
    result = bench(tmp_path, "--modes", "warp_drive", "--out", str(tmp_path / "x"))
    assert result.returncode == 1
    assert result.stderr.strip().endswith(
        "unknown bench mode(s) warp_drive: expected some of eager_fp32, eager_bf16, compile, onnxruntime, "
        "openvino_fp32, openvino_bf16, openvino_int8, tensorrt, triton, plan, onnxruntime_int8, onnxruntime_int8_static, "
        "openvino_int8_graphs")


def test_an_empty_modes_list_is_its_own_error_line(tmp_path):
    out = tmp_path / "x"
    result = bench(tmp_path, "--modes", ",", "--out", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "fssam bench: error: --modes ',' names no mode: expected a comma list of some of eager_fp32, eager_bf16, "
        "compile, onnxruntime, openvino_fp32, openvino_bf16, openvino_int8, tensorrt, triton, plan, onnxruntime_int8, "
        "onnxruntime_int8_static, openvino_int8_graphs")
    assert not out.exists()


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("case", ["config", "shots", "url"])
def test_a_failed_run_leaves_no_out_folder(tiny_artifacts, tmp_path, case):
    """A bad --config, an export of other shots, or a server that does not answer: one error line,
    and neither --out nor the parent folders the run made are left behind (empty)."""
    argv = {"config": ["--config", "nope"], "shots": ["--artifacts", tiny_artifacts[0], "--shots", "5"],
            "url": ["--modes", "triton", "--url", f"127.0.0.1:{_closed_port()}", "--iterations", "1", "--warmup", "0"]}
    result = bench(tmp_path, *argv[case], "--out", str(tmp_path / "made" / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("fssam bench: error: ")
    assert not (tmp_path / "made").exists()


def test_a_rerun_with_other_shots_removes_the_earlier_runs_plots_only(tmp_path):
    out = tmp_path / "rerun"
    minimal = ("--modes", "eager_fp32", "--iterations", "1", "--warmup", "0", "--out", str(out))
    assert bench(tmp_path, *minimal).returncode == 0
    first = json.loads((out / "results.json").read_text())["written_files"]
    assert set(first) == {"results.json", "results.md", "latency_stages_1shot.png", "throughput_1shot.png"}
    (out / "notes.txt").write_text("mine")  # files the earlier run did not write stay, whatever their name
    (out / "throughput_9shot.png").write_bytes(b"mine too")
    result = bench(tmp_path, *minimal, "--shots", "2")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["latency_stages_2shot.png", "notes.txt", "results.json", "results.md",
                                       "throughput_2shot.png", "throughput_9shot.png"]
    assert list(json.loads((out / "results.json").read_text())["runs"]) == ["2"]


def test_openvino_int8_needs_an_export_with_an_int8_plan(tiny_artifacts, tmp_path):
    result = bench(tmp_path, "--modes", "openvino_int8", "--artifacts", tiny_artifacts[0], "--out", str(tmp_path / "x"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        "has no OpenVINO int8 plan, which the openvino_int8 mode needs: export it with `fssam export --openvino int8`, "
        "or leave --artifacts out")


def test_calibration_without_an_int8_mode_is_one_error_line(tmp_path):
    result = bench(tmp_path, "--calibration", str(tmp_path), "--out", str(tmp_path / "x"))
    assert result.returncode == 1
    assert result.stderr.strip().endswith("--calibration is for the int8 export of the openvino_int8, plan, "
                                          "onnxruntime_int8, onnxruntime_int8_static, openvino_int8_graphs modes: add "
                                          "one of them to --modes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
@pytest.mark.parametrize("argv,message", [
    (["--device", "cuda"], "--device cuda: this machine has no CUDA device"),
    (["--modes", "tensorrt"], "no CUDA device: TensorRT engines can only be built and run on a machine with an NVIDIA GPU"),
])
def test_gpu_only_requests_fail_clearly_without_a_gpu(tmp_path, argv, message):
    result = bench(tmp_path, *argv, "--out", str(tmp_path / "x"))
    assert result.returncode == 1 and message in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without a GPU")
def test_tensorrt_is_skipped_without_a_gpu_when_other_modes_run(tiny_artifacts, tmp_path):
    out = tmp_path / "trt"
    result = bench(tmp_path, "--modes", "eager_fp32,eager_bf16,tensorrt", "--iterations", "1", "--warmup", "0",
                   "--artifacts", tiny_artifacts[0], "--out", str(out))
    assert result.returncode == 0, result.stderr
    runs = json.loads((out / "results.json").read_text())["runs"]["1"]
    assert "no CUDA device" in runs["skipped"]["tensorrt"] and "tensorrt" not in runs["modes"]


def _ort_mode_args(artifacts, device):
    from types import SimpleNamespace

    return SimpleNamespace(artifacts=artifacts, shot_list=[1], config="tiny", threads=None, out="unused",
                           mode_list=["onnxruntime"], device_resolved=torch.device(device),
                           num_refine=None, refine_version=None, scma_mode=None)


def test_onnxruntime_mode_reports_its_providers(tiny_artifacts, monkeypatch):
    """The onnxruntime mode records the providers that ran: on the CPU the CPU provider; asked for
    a GPU by an onnxruntime without the CUDA provider, the CPU provider and why (no GPU needed)."""
    import onnxruntime as ort

    from fssam.bench.run import _runtime_mode
    from fssam.model import get_config
    from fssam.runtime.parity import sample_episode

    mode = _runtime_mode(_ort_mode_args(tiny_artifacts[0], "cpu"), "onnxruntime", "onnxruntime", None, 1, False)
    mode.episode(*sample_episode(get_config("tiny"), 1))
    report = mode.report()
    assert report["providers"] == ["CPUExecutionProvider"] and report["io_binding"] is False
    assert report["runtime"] == "ONNX Runtime fp32 (CPUExecutionProvider)" and mode.device.type == "cpu"
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", "CPUExecutionProvider"])
    mode = _runtime_mode(_ort_mode_args(tiny_artifacts[0], "cuda"), "onnxruntime", "onnxruntime", None, 1, False)
    assert mode.device.type == "cpu" and mode.report()["providers"] == ["CPUExecutionProvider"]
    assert "no CUDAExecutionProvider" in mode.report()["runtime"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA provider with IO binding needs a CUDA device; "
                                                          "this machine has none")
def test_onnxruntime_mode_runs_on_the_gpu_with_io_binding(tiny_artifacts):
    import onnxruntime as ort

    from fssam.bench.run import _runtime_mode
    from fssam.model import get_config
    from fssam.runtime.parity import sample_episode

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
    mode = _runtime_mode(_ort_mode_args(tiny_artifacts[0], "cuda"), "onnxruntime", "onnxruntime", None, 1, False)
    seconds, stages = mode.episode(*sample_episode(get_config("tiny"), 1))
    report = mode.report()
    assert mode.device.type == "cuda" and report["io_binding"] and "CUDAExecutionProvider" in report["providers"]
    assert seconds > 0 and set(stages) == {"prior_backbone", "image_encoder", "prior", "memory_encoder", "refine", "head"}


def test_output_check_fails_a_wrong_mode_and_names_its_rule():
    """fssam.bench.checks on the real tiny model: a mode off by more than its rule's limit fails, the
    same output within it passes; a bf16 mode is held to 2x eager autocast's error; a mode without a
    rule is reported as not checked, with the reason."""
    from fssam.bench.checks import check_modes, describe
    from fssam.model import build
    from fssam.runtime.parity import sample_episode

    model = build("tiny", seed=0)
    inputs = sample_episode(model.config, 1, seed=3)

    class Mode:
        def __init__(self, name, baseline, offset=0.0, autocast=False):
            self.name, self.baseline, self.offset, self.autocast = name, baseline, offset, autocast

        def logits(self, query, supports, masks):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                return model(query, supports, masks).float() + self.offset

    unchecked = Mode("triton", None)
    unchecked.unchecked = "a server given by --url"
    with torch.inference_mode():
        exact = model(*inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_error = (model(*inputs).float() - exact).abs().max().item()
    over = Mode("openvino_int8", "bf16_autocast", offset=3 * autocast_error + 1e-5, autocast=True)
    result = check_modes([Mode("eager_fp32", None), Mode("compile", "fp32"), Mode("onnxruntime", "fp32", 0.01),
                          Mode("openvino_bf16", "bf16_autocast", autocast=True), over, unchecked], model, inputs)
    assert set(result) == {"compile", "onnxruntime", "openvino_bf16", "openvino_int8", "triton"}
    assert result["openvino_int8"]["passed"] is False  # error >= 2x autocast's + 1e-5: over the limit
    assert result["openvino_int8"]["limit"] == pytest.approx(2 * autocast_error + 1e-6, rel=1e-6)
    assert result["compile"]["passed"] is True and result["compile"]["max_abs"] == 0.0
    assert result["onnxruntime"]["passed"] is False and result["onnxruntime"]["max_abs"] > result["onnxruntime"]["limit"]
    assert result["openvino_bf16"]["passed"] is True and result["openvino_bf16"]["max_abs"] > 0
    assert result["triton"] == {"passed": None, "reason": "a server given by --url"}
    text = describe(result)
    assert "onnxruntime FAILED" in text and "compile passed" in text and "bf16 autocast rule" in text
    assert "triton not checked (a server given by --url)" in text


# ---------------------------------------------------------------- the graph modes (the export's graph plan)

GRAPH_MODES = ("onnxruntime_int8", "onnxruntime_int8_static", "plan", "openvino_int8_graphs")
GRAPHS = {"support_encoder", "query_segmenter"}


@pytest.fixture(scope="module")
def graph_bench(tmp_path_factory, tiny_plan):
    """One bench of the graph modes on tiny's graphs with a graph plan (tests/conftest.py: the plan is
    what costs, ~2-3 minutes, made once for the suite): (out folder, completed process)."""
    root = tmp_path_factory.mktemp("graph-bench")
    out = root / "out"
    result = bench(root, "--modes", ",".join(("eager_fp32", "eager_bf16", *GRAPH_MODES)), "--artifacts", tiny_plan[0],
                   "--iterations", "1", "--warmup", "0", "--threads", "1", "--out", str(out), timeout=1200)
    return out, result


def _autocast_limit(shots=1, seed=100):
    """The 2x eager bf16 autocast rule's max abs limit on the bench episode (--seed 0 + 100), on the CPU."""
    from fssam.model import build
    from fssam.runtime.parity import ieee_fp32, sample_episode

    model = build("tiny", seed=0)
    episode = sample_episode(model.config, shots, seed=seed)
    with torch.inference_mode():
        with ieee_fp32():
            exact = model(*episode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(*episode).float()
    return 2 * (autocast - exact).abs().max().item() + 1e-6


def test_graph_modes_run_with_ratios_to_both_baselines_and_an_output_check(graph_bench, tiny_plan):
    """plan runs the graphs the export's plan chose, onnxruntime_int8 / onnxruntime_int8_static /
    openvino_int8_graphs its int8 graphs of one runtime and method where both passed the plan's
    gate, else they are skipped with the gate's
    reason; every mode that ran is a ratio to both eager baselines, timed per graph, and checked
    on the bench episode with eager bf16 autocast's rule as soon as a graph runs below fp32."""
    out, result = graph_bench
    assert "exporting" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (out / "artifacts-1shot").exists()  # the given export was reused
    manifest = json.loads((Path(tiny_plan[0]) / "manifest.json").read_text())
    plan = manifest["graph_plan"]
    assert manifest["stages"] == {}  # no asked mode runs the stage files: the graphs only
    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]["1"]
    table = (out / "results.md").read_text()

    ran = {"plan": True}
    for name, runtime, precision in (("onnxruntime_int8", "onnxruntime", "int8"),
                                     ("onnxruntime_int8_static", "onnxruntime", "int8-static"),
                                     ("openvino_int8_graphs", "openvino", "int8")):
        missing = [g for g in ("support_encoder", "query_segmenter")
                   if not plan["candidates"][g][f"{runtime} {precision}"]["passed"]]
        if precision == "int8":  # the int8 files the plan keeps, which `--precision int8` serves
            assert missing == [g for g in ("support_encoder", "query_segmenter")
                               if f"{runtime}/{g}" not in plan["int8_files"]]
        ran[name] = not missing
        if missing:  # skipped, with the graph plan's reason, everywhere a skip is reported
            reason = runs["skipped"][name]
            assert f"kept no {runtime} {precision} {' or '.join(missing)} (it keeps the int8 graphs that passed" in reason
            assert all(f"{g}: " in reason for g in missing)
            assert f"skipping {name}: {reason}" in result.stderr and f"- {name}: {reason}" in table
            assert name not in runs["modes"] and name not in runs["speedups"]
    assert list(runs["modes"]) == ["eager_fp32", "eager_bf16", *(m for m in GRAPH_MODES if ran[m])]
    assert set(runs["skipped"]) == {m for m in GRAPH_MODES if not ran[m]}

    limit = _autocast_limit()
    failed = []
    for name in (m for m in GRAPH_MODES if ran[m]):
        mode = runs["modes"][name]
        assert set(mode["stages"]) == GRAPHS and mode["device"] == "cpu" and mode["episode"]["n"] == 1
        for kind in KINDS:
            assert mode[kind]["median_ms"] > 0
        for key, baseline in BASELINE_KEYS.items():  # baseline median / mode median, the same kind
            for kind in KINDS:
                expected = runs["modes"][baseline][kind]["median_ms"] / mode[kind]["median_ms"]
                assert runs["speedups"][name][key][kind] == pytest.approx(expected, rel=1e-3, abs=5e-5)  # 4 places
        precisions = ([e["precision"] for e in plan["chosen"].values()] if name == "plan" else ["int8", "int8"])
        check = mode["check"]
        if all(p == "fp32" for p in precisions):
            assert check["baseline"] == "fp32" and check["limit"] < 1e-3
        else:
            assert check["baseline"] == "bf16_autocast"
            assert check["limit"] == pytest.approx(limit, rel=1e-6)
        assert check["passed"] == (check["max_abs"] <= check["limit"] and check["mask_iou"] >= check["min_iou"])
        assert f"{name} {'passed' if check['passed'] else 'FAILED'} (max abs" in table
        if not check["passed"]:
            failed.append(name)
            assert f"| {name} (output check FAILED) |" in table
        else:
            assert f"| {name} |" in table
    assert runs["modes"]["plan"]["runtime"] == "graph plan: " + "; ".join(
        f"{g} {e['runtime']} {e['precision']}" for g, e in plan["chosen"].items())
    # a failing check is reported and exits 1, with the results written
    assert result.returncode == (1 if failed else 0), result.stderr
    assert data.get("failed_checks", []) == [f"{name} (1-shot)" for name in failed]

    graph_table = table.split("Per deployable graph (the graph modes), median ms per episode:")[1]
    header = "| graph | " + " | ".join(m for m in GRAPH_MODES if ran[m]) + " |"
    assert header in graph_table and "| support_encoder |" in graph_table and "| query_segmenter |" in graph_table
    assert "| stage | eager_fp32 | eager_bf16 |" in table  # the per-stage table: the stage modes only
    for name in ("latency_stages_1shot.png", "throughput_1shot.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100


def test_graph_modes_reuse_an_export_with_a_graph_plan_and_refuse_one_without(graph_bench, tiny_plan, tiny_artifacts,
                                                                             tmp_path):
    planned = tiny_plan[0]
    result = bench(tmp_path, "--modes", "plan", "--artifacts", planned, "--iterations", "1", "--warmup", "0",
                   "--out", str(tmp_path / "reuse"))
    assert "exporting" not in result.stderr and not (tmp_path / "reuse" / "artifacts-1shot").exists()
    runs = json.loads((tmp_path / "reuse" / "results.json").read_text())["runs"]["1"]
    assert list(runs["modes"]) == ["eager_fp32", "eager_bf16", "plan"]
    # the same graphs on the same episode as the first run (whose test holds the check to passing)
    assert result.returncode == (0 if runs["modes"]["plan"]["check"]["passed"] else 1), result.stderr

    for artifacts, modes, lack in (
        (tiny_artifacts[0], "onnxruntime_int8", "has no graph plan, which the onnxruntime_int8 mode needs: export it "
                                                "with `fssam export --plan` (or `fssam deploy`)"),
        (planned, "onnxruntime", "has no stage files (only the deployable graphs, as `fssam deploy` exports them), "
                                 "which the onnxruntime mode needs: export it with `fssam export`"),
    ):
        result = bench(tmp_path, "--modes", modes, "--artifacts", artifacts, "--out", str(tmp_path / "x"))
        assert result.returncode == 1 and "Traceback" not in result.stderr and not (tmp_path / "x").exists()
        assert result.stderr.strip().splitlines()[-1].endswith(f"{lack}, or leave --artifacts out"), result.stderr


def _graph_args(artifacts, modes, asked=None, calibration=None, threads=None):
    from types import SimpleNamespace

    return SimpleNamespace(artifacts=artifacts, shot_list=[1], config="tiny", threads=threads, out="unused",
                           mode_list=list(modes), asked=list(asked or modes), skipped={}, calibration=calibration,
                           device_resolved=torch.device("cpu"), num_refine=None, refine_version=None, scma_mode=None)


def test_an_int8_graph_that_failed_the_plans_gate_skips_its_mode_with_the_reason(monkeypatch):
    """Whatever this machine's plan passes: an export whose graph plan has no passing ONNX Runtime
    int8 query_segmenter skips onnxruntime_int8, saying why (its gate record), before anything is
    opened; a run left with no asked mode fails with the reasons."""
    import fssam.export
    from fssam.bench.run import Unavailable, _graph_mode, _modes
    from fssam.errors import ConfigError
    from fssam.model import build

    attempts = [{"fallback": "whole graph", "passed": False}, {"fallback": "int8: DINOv2 only", "passed": False}]
    manifest = {"shots": 1, "config": {"name": "tiny"}, "graph_plan": {
        "int8_files": {"onnxruntime/support_encoder": {"file": "onnxruntime/int8/support_encoder.onnx"}},
        "candidates": {"support_encoder": {}, "query_segmenter": {"onnxruntime int8": {
            "passed": False, "within_limits": False, "worst": 3.1, "attempts": attempts,
            "failures": ["gate episode 1: end_to_end.logits: max abs 9 > 1", "gate episode 2: ..."]},
            "openvino int8": {"passed": False, "gated": False, "within_limits": None, "worst": None, "failures": [],
                              "note": "not gated: 9.0 ms, no faster than onnxruntime int8 (3.0 ms), which passed"}}}}}
    monkeypatch.setattr(fssam.export, "load_manifest", lambda *args, **kwargs: manifest)
    with pytest.raises(Unavailable) as caught:
        _graph_mode(_graph_args("planned", ["onnxruntime_int8"]), "onnxruntime_int8", 1, False)
    assert str(caught.value) == ("the graph plan of planned kept no onnxruntime int8 query_segmenter (it keeps the "
                                 "int8 graphs that passed their gate): query_segmenter: over its limits: gate episode 1: end_to_end.logits: max abs "
                                 "9 > 1 (tried: whole graph, int8: DINOv2 only)")
    with pytest.raises(Unavailable) as caught_openvino:
        _graph_mode(_graph_args("planned", ["openvino_int8_graphs"]), "openvino_int8_graphs", 1, False)
    assert str(caught_openvino.value) == (
        "the graph plan of planned kept no openvino int8 support_encoder or query_segmenter (it keeps the int8 "
        "graphs that passed their gate): support_encoder: not a candidate of this export's graph plan; query_segmenter: not gated: 9.0 ms, no faster "
        "than onnxruntime int8 (3.0 ms), which passed")
    args = _graph_args("planned", ["eager_fp32", "eager_bf16", "onnxruntime_int8"], asked=["onnxruntime_int8"])
    with pytest.raises(ConfigError, match=r"^no asked bench mode can run 1-shot: onnxruntime_int8: the graph plan"):
        _modes(args, build("tiny", seed=0), 1, False)
    args.asked = ["eager_fp32", "onnxruntime_int8"]  # an asked mode is left: the skip is recorded, with the reason
    modes, skipped = _modes(args, build("tiny", seed=0), 1, False)
    assert [m.name for m in modes] == ["eager_fp32", "eager_bf16"] and skipped == {"onnxruntime_int8": str(caught.value)}


def test_graph_modes_export_a_graph_plan_with_the_calibration_and_only_what_they_run():
    from fssam.bench.run import _export_options, plan_modes

    options = _export_options(_graph_args(None, ["eager_fp32", "onnxruntime_int8"], calibration="cal", threads=2))
    assert options == {"tensorrt": False, "plan": True, "threads": 2, "calibration": "cal", "stages": False}
    options = _export_options(_graph_args(None, ["plan", "openvino_int8"], calibration="cal"))
    assert options == {"tensorrt": False, "openvino": ("int8",), "plan": True, "threads": None, "calibration": "cal"}
    assert "plan" not in _export_options(_graph_args(None, ["onnxruntime", "openvino_fp32"]))
    for mode in GRAPH_MODES:  # --calibration is accepted: it goes to the plan's int8 quantization
        args = _graph_args(None, [mode], calibration="cal")
        args.modes = mode
        plan_modes(args)
        assert args.mode_list == ["eager_fp32", "eager_bf16", mode]


def test_adaptive_timing_skips_the_warm_up_of_modes_that_already_ran():
    """fssam deploy's latency: a mode named in `warm` ran the episode in this process already
    (its checks), so it takes no warm-up run; `once` modes run one timed episode; the others
    one warm-up and then at least `min_runs`. Every entry says how many runs it timed."""
    from fssam.bench.harness import EpisodeMode, run_adaptive

    calls = {"cold": 0, "warm": 0, "once": 0}

    def mode(name):
        def call(query, supports, masks, cache):
            calls[name] += 1

        return EpisodeMode(name, call)

    inputs = (torch.zeros(1), torch.zeros(1), torch.zeros(1))
    result = run_adaptive([mode("cold"), mode("warm"), mode("once")], inputs, min_runs=3, budget_s=1e-9,
                          once=("once",), warm=("warm",))
    assert {name: entry["runs"] for name, entry in result.items()} == {"cold": 3, "warm": 3, "once": 1}
    assert calls == {"cold": 2 * 4, "warm": 2 * 3, "once": 2 * 1}  # an episode and a cached call per run


def test_default_client_levels_stop_at_the_cores():
    from fssam.bench.served import CONCURRENCY, default_levels

    assert default_levels(1) == default_levels(2) == default_levels(3) == (1, 2)
    assert default_levels(4) == (1, 2, 4)
    assert default_levels(8) == default_levels(64) == CONCURRENCY == (1, 2, 4, 8)
