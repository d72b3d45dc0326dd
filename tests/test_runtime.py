"""The runtime layer and its OpenVINO runner on the tiny config: contract, registry, parity with
eager fp32, bf16 (where the CPU has it) and its refusal, int8 export and the gate's ladder."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fssam.errors import ConfigError, InputError
from fssam.export import export, load_manifest
from fssam.model import build
from fssam.runtime import as_torch, cpu, open_runner, runtimes
from fssam.runtime.contract import run_episode
from fssam.runtime.parity import parity_report, sample_episode

NO_BF16_CPUINFO = "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n\n"


@pytest.fixture(scope="module")
def int8_artifacts(tmp_path_factory):
    """tiny exported with OpenVINO fp32 and int8 plans; int8 is forced wherever it passes its gate
    (on tiny, fp32 is usually faster, so the plan alone would not exercise the int8 IR)."""
    import fssam.export.openvino as ov_export

    out = str(tmp_path_factory.mktemp("ov") / "tiny")
    patch = pytest.MonkeyPatch()
    real = ov_export._choose
    patch.setattr(ov_export, "_choose", lambda tried: "int8" if tried.get("int8", {}).get("passed") else real(tried))
    try:
        manifest = export("tiny", out=out, shots=1, progress=False, openvino=("fp32", "int8"))
    finally:
        patch.undo()
    return out, manifest


def test_contract_imports_no_heavy_module():
    code = ("import sys, fssam.runtime.contract; "
            "print(sorted(m for m in ('torch', 'sam2', 'timm', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_registry_lists_the_runtimes_and_refuses_unknown(tiny_artifacts):
    assert {"onnxruntime", "openvino", "tensorrt"} <= set(runtimes())
    with pytest.raises(ConfigError, match="runtime 'nope'"):
        open_runner("nope", tiny_artifacts[0])
    with pytest.raises(ConfigError, match="precision 'int4'"):
        open_runner("openvino", tiny_artifacts[0], precision="int4")


def test_a_new_runtime_is_one_file(tiny_artifacts, tmp_path, monkeypatch):
    """A runner module dropped on the runners package path is found by name and gated."""
    import fssam.runtime.runners as runners

    (tmp_path / "numpy_copy.py").write_text(textwrap.dedent('''
        from fssam.runtime.runners.onnxruntime import OnnxRuntimeRunner, PRECISIONS

        class CopyRunner(OnnxRuntimeRunner):
            name = "numpy_copy"

            def run_stage(self, name, *arrays):
                out = super().run_stage(name, *(a.copy() for a in arrays))
                return tuple(o.copy() for o in out) if isinstance(out, tuple) else out.copy()

        RUNNER = CopyRunner
    '''))
    monkeypatch.setattr(runners, "__path__", [*runners.__path__, str(tmp_path)])
    assert "numpy_copy" in runtimes()
    model = build("tiny", seed=0)
    report = parity_report(model, as_torch(open_runner("numpy_copy", tiny_artifacts[0])), "fp32",
                           sample_episode(model.config, 1, seed=5))
    assert report["passed"], report["failures"]


def test_composition_runs_on_numpy_and_torch_alike(tiny_artifacts):
    model = build("tiny", seed=0)
    query, supports, masks = sample_episode(model.config, 1, batch=2, seed=9)
    runner = open_runner("onnxruntime", tiny_artifacts[0])
    from_numpy = run_episode(runner, query.numpy(), supports.numpy(), masks.numpy())
    from_torch = as_torch(runner)(query, supports, masks)
    assert isinstance(from_numpy, np.ndarray)
    np.testing.assert_array_equal(from_numpy, from_torch.numpy())


@pytest.mark.parametrize("batch", [1, 3])
def test_openvino_fp32_matches_eager(tiny_artifacts, batch):
    model = build("tiny", seed=0)
    runner = as_torch(open_runner("openvino", tiny_artifacts[0], precision="fp32"))
    report = parity_report(model, runner, "fp32", sample_episode(model.config, 1, batch=batch, seed=batch))
    assert report["passed"], report["failures"]
    assert report["end_to_end"]["max_abs"] < 1e-4


def test_openvino_compiled_model_cache_and_threads(tiny_artifacts, tmp_path, monkeypatch):
    monkeypatch.setenv("FSSAM_OPENVINO_CACHE", str(tmp_path / "cache"))
    first = open_runner("openvino", tiny_artifacts[0], threads=1)
    assert not first.compiled["head"].get_property("LOADED_FROM_CACHE")
    second = open_runner("openvino", tiny_artifacts[0], threads=1)
    assert second.compiled["head"].get_property("LOADED_FROM_CACHE")
    assert second.compiled["head"].get_property("INFERENCE_NUM_THREADS") == 1
    assert "float32" in str(second.compiled["head"].get_property("INFERENCE_PRECISION_HINT")).lower()


@pytest.mark.skipif(not cpu.native_bf16(), reason=f"OpenVINO bf16 needs amx_bf16 or avx512_bf16; "
                    f"this CPU has: {cpu.describe()}")
def test_openvino_bf16_runs_and_its_gated_plan_passes(tiny_artifacts, tmp_path):
    runner = open_runner("openvino", tiny_artifacts[0], precision="bf16")
    assert "bfloat16" in str(runner.compiled["head"].get_property("INFERENCE_PRECISION_HINT")).lower()
    model = build("tiny", seed=0)
    query, supports, masks = sample_episode(model.config, 1, seed=3)
    assert torch.isfinite(as_torch(runner)(query, supports, masks)).all()
    manifest = export("tiny", out=str(tmp_path / "bf16"), progress=False, openvino=("bf16",))
    gated = manifest["openvino"]["bf16"]
    assert gated["parity"]["passed"] and gated["parity"]["baseline"] == "bf16_autocast"
    assert all("bf16" in stage["tried"] for stage in gated["stages"].values())


def test_bf16_refused_on_a_cpu_without_it(tiny_artifacts, tmp_path, monkeypatch):
    fake = tmp_path / "cpuinfo"
    fake.write_text(NO_BF16_CPUINFO)
    monkeypatch.setenv("FSSAM_CPUINFO", str(fake))
    with pytest.raises(ConfigError) as info:
        open_runner("openvino", tiny_artifacts[0], precision="bf16")
    message = str(info.value)
    assert "Test CPU 9000" in message and "amx_bf16 no" in message and "avx512_bf16 no" in message
    assert "avx512_vnni yes" in message
    result = subprocess.run([sys.executable, "-m", "fssam.cli", "compare", "--artifacts", tiny_artifacts[0],
                             "--backend", "openvino", "--precision", "bf16"],
                            capture_output=True, text=True, env={**os.environ, "FSSAM_CPUINFO": str(fake)})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "avx512_bf16 no" in lines[0], result.stderr


def test_int8_export_records_ir_calibration_and_plan(int8_artifacts):
    out, manifest = int8_artifacts
    openvino = manifest["openvino"]
    assert openvino["calibration"]["source"] == "synthetic" and openvino["calibration"]["pairs"] >= 4
    assert len(os.listdir(os.path.join(out, "calibration", "images"))) == openvino["calibration"]["pairs"]
    plan = openvino["int8"]["stages"]
    assert openvino["int8"]["parity"]["passed"] and openvino["int8"]["parity"]["baseline"] == "bf16_autocast"
    int8_stages = [name for name, entry in plan.items() if entry["precision"] == "int8"]
    assert int8_stages, plan
    for name in int8_stages:
        assert plan[name]["file"].endswith(".xml") and os.path.isfile(os.path.join(out, plan[name]["weights"]["file"]))
    for name, entry in plan.items():
        assert entry["tried"][entry["precision"]]["passed"]
        if name in ("prior", "refine"):
            assert "int8" not in entry["tried"]  # not quantized: no compute worth it


def test_int8_runner_runs_the_plan_and_hashes_are_checked(int8_artifacts, tmp_path):
    import shutil

    out, manifest = int8_artifacts
    runner = open_runner("openvino", out, precision="int8")
    assert runner.describe().startswith("OpenVINO int8")
    model = build("tiny", seed=0)
    report = parity_report(model, as_torch(runner), "int8", sample_episode(model.config, 1, seed=21))
    assert report["baseline"] == "bf16_autocast"
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    weights = next(e["weights"]["file"] for e in manifest["openvino"]["int8"]["stages"].values() if "weights" in e)
    with open(copy / weights, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(InputError, match="sha256"):
        load_manifest(str(copy))


def test_int8_without_a_plan_is_refused(tiny_artifacts):
    with pytest.raises(ConfigError, match="--openvino int8"):
        open_runner("openvino", tiny_artifacts[0], precision="int8")


def test_ladder_falls_back_and_steps_down(int8_artifacts, monkeypatch):
    """A stage whose reduced precision fails its gate runs fp32; a failing end-to-end check steps the
    worst stage down; failing with every stage at fp32 is a ParityError."""
    import fssam.export.openvino as ov_export
    from fssam.runtime.parity import ParityError

    out, manifest = int8_artifacts
    model = build("tiny", seed=0)
    real_check = ov_export.check_stage

    def head_fails_below_fp32(runner, name, calls, baseline):
        outputs, failures = real_check(runner, name, calls, baseline)
        if name == "head" and baseline.kind != "fp32":
            failures = failures + ["head forced to fail"]
        return outputs, failures

    monkeypatch.setattr(ov_export, "check_stage", head_fails_below_fp32)
    monkeypatch.setattr(ov_export, "_choose", lambda tried: next(o for o in tried if tried[o]["passed"]))
    files = {"fp32": {n: {"file": s["file"], "sha256": s["sha256"]} for n, s in manifest["stages"].items()}}
    files["bf16"] = files["fp32"]
    files["int8"] = {n: e for n, e in manifest["openvino"]["int8"]["stages"].items() if e["precision"] == "int8"}
    episode = sample_episode(model.config, 1, seed=4)
    result = ov_export.plan_precision(out, manifest, model, "int8", files, episode, None)
    assert result["stages"]["head"]["precision"] == "fp32"
    assert not result["stages"]["head"]["tried"][next(iter(result["stages"]["head"]["tried"]))]["passed"]

    calls = []
    real_end = ov_export.check_end_to_end

    def fail_once(*args):
        end, failures = real_end(*args)
        calls.append(1)
        return end, failures + (["forced"] if len(calls) == 1 else [])

    monkeypatch.setattr(ov_export, "check_end_to_end", fail_once)
    result = ov_export.plan_precision(out, manifest, model, "int8", files, episode, None)
    assert any("stepped_down" in entry for entry in result["stages"].values()) and result["parity"]["passed"]

    monkeypatch.setattr(ov_export, "check_end_to_end", lambda *args: (real_end(*args)[0], ["forced"]))
    with pytest.raises(ParityError, match="OpenVINO"):
        ov_export.gate_openvino(out, manifest, model, ("fp32",))


def test_calibration_folder_errors(tmp_path):
    from fssam.export import calibration

    with pytest.raises(InputError, match="--openvino int8"):
        export("tiny", out=str(tmp_path / "a"), progress=False, calibration=str(tmp_path))
    with pytest.raises(InputError, match="does not exist"):
        export("tiny", out=str(tmp_path / "a"), progress=False, openvino="int8", calibration=str(tmp_path / "none"))
    folder = tmp_path / "cal"
    (folder / "images").mkdir(parents=True)
    with pytest.raises(InputError, match="no masks/"):
        calibration.read_set(str(folder), 64, 1)
    calibration.write_synthetic(str(tmp_path / "syn"), 64, pairs=3)
    with pytest.raises(InputError, match="needs at least 4"):
        calibration.read_set(str(tmp_path / "syn"), 64, 1)
    os.remove(tmp_path / "syn" / "masks" / "0001.png")
    with pytest.raises(InputError, match="without a mask"):
        calibration.read_set(str(tmp_path / "syn"), 64, 1)
