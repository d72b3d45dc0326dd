"""The runtime layer and its OpenVINO runner on the tiny config: contract, registry, parity with
eager fp32, bf16 (where the CPU has it) and its refusal, int8 export and the gate's ladder."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fssam.errors import ConfigError, InputError
from fssam.export import ExportError, export, load_manifest
from fssam.model import build
from fssam.runtime import as_torch, cpu, open_runner, runtimes
from fssam.runtime.contract import run_episode
from fssam.runtime.parity import fp32_limit, parity_report, sample_episode

NO_BF16_CPUINFO = "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n\n"


@pytest.fixture(scope="module")
def int8_artifacts(tmp_path_factory):
    """tiny exported with OpenVINO fp32 and int8 plans (and bf16 where the CPU has it); int8 is forced
    wherever it passes its gate (on tiny, fp32 is usually faster, so the plan alone would not
    exercise the int8 IR). One export for all three: each plan is an export's slowest part."""
    import fssam.export.openvino as ov_export

    out = str(tmp_path_factory.mktemp("ov") / "tiny")
    patch = pytest.MonkeyPatch()
    real = ov_export._choose
    patch.setattr(ov_export, "_choose", lambda tried: "int8" if tried.get("int8", {}).get("passed") else real(tried))
    try:
        manifest = export("tiny", out=out, shots=1, progress=False,
                          openvino=("fp32", "int8") + (("bf16",) if cpu.native_bf16() else ()))
    finally:
        patch.undo()
    return out, manifest


def test_export_refuses_a_user_file_inside_its_openvino_folders(int8_artifacts, tmp_path):
    """An OpenVINO export's calibration/ and openvino/ folders are its own file by file
    (manifest["written_files"]): a file someone added there makes the export not replaceable (it
    was deleted with the folder before). Here, where OpenVINO is loaded anyway: tests/test_files.py
    sends itself signals, which OpenVINO's threads do not survive."""
    out = str(tmp_path / "copy")
    shutil.copytree(int8_artifacts[0], out)
    written = load_manifest(out)["written_files"]
    assert "manifest.json" not in written
    assert any(f.startswith("calibration" + os.sep) for f in written) and any(f.startswith("openvino" + os.sep) for f in written)
    for folder in ("calibration", "openvino"):
        with open(os.path.join(out, folder, "notes.txt"), "w") as handle:
            handle.write("mine")
        with pytest.raises(ExportError, match=rf"it also holds {folder}/notes\.txt"):
            export("tiny", out=out, progress=False)
        assert open(os.path.join(out, folder, "notes.txt")).read() == "mine"
        os.remove(os.path.join(out, folder, "notes.txt"))


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
    assert not first.compile("head").get_property("LOADED_FROM_CACHE")
    second = open_runner("openvino", tiny_artifacts[0], threads=1)
    assert second.compile("head").get_property("LOADED_FROM_CACHE")
    assert second.compile("head").get_property("INFERENCE_NUM_THREADS") == 1
    assert "float32" in str(second.compile("head").get_property("INFERENCE_PRECISION_HINT")).lower()


@pytest.mark.skipif(not cpu.native_bf16(), reason=f"OpenVINO bf16 needs amx_bf16 or avx512_bf16; "
                    f"this CPU has: {cpu.describe()}")
def test_openvino_bf16_runs_only_its_gated_plan(tiny_artifacts, int8_artifacts):
    """bf16 needs the plan `--openvino bf16` gated (refused without one); the runner runs that plan:
    the bf16 hint exactly where the plan says bf16, and the result passes the 2x autocast rule."""
    from fssam.export.openvino import QUANTIZED_STAGES

    with pytest.raises(ConfigError, match="no OpenVINO bf16 plan"):
        open_runner("openvino", tiny_artifacts[0], precision="bf16")
    out, manifest = int8_artifacts
    gated = manifest["openvino"]["bf16"]
    assert gated["parity"]["passed"] and gated["parity"]["baseline"] == "bf16_autocast"
    for name, stage in gated["stages"].items():  # reduced precision only where the compute is
        assert list(stage["tried"]) == (["bf16", "fp32"] if name in QUANTIZED_STAGES else ["fp32"]), name
    runner = open_runner("openvino", out, precision="bf16")
    for name, stage in gated["stages"].items():
        hint = str(runner.compile(name).get_property("INFERENCE_PRECISION_HINT")).lower()
        assert ("bfloat16" in hint) == (stage["precision"] == "bf16"), (name, hint)
    model = build("tiny", seed=0)
    # the plan as the runner loads it, on the gate's episode (export seed 0 + 7) and on episodes the
    # gate never saw (a plan that only fits its gate episode fails there)
    for seed in (7, 21, 22):
        report = parity_report(model, as_torch(runner), "bf16", sample_episode(model.config, 1, seed=seed))
        assert report["baseline"] == "bf16_autocast" and report["passed"], (seed, report["failures"])


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
    assert report["baseline"] == "bf16_autocast" and report["passed"], report["failures"]  # a fresh episode
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


def _ladder_files(folder: str, manifest: dict) -> dict:
    """files for plan_precision whatever this CPU's own int8 plan chose (the export deletes the IR its
    plan does not use, and bf16 is on the ladder only where the CPU has it): an int8 rung for head and
    prior_backbone on every CPU. Each is the stage's float IR under the int8 name (run at f32, as the
    float parts of int8 IR are), so that it passes its gate on any CPU unless the test fails it: real
    int8 accuracy depends on the CPU's int8 kernels (tiny's NNCF head is over its limits by itself, so
    a forced failure there would prove nothing about the fall-back)."""
    import openvino as ov

    import fssam.export.openvino as ov_export

    files = {"fp32": {n: {"file": s["file"], "sha256": s["sha256"]} for n, s in manifest["stages"].items()}}
    files["bf16"] = files["fp32"]
    files["int8"] = {}
    os.makedirs(os.path.join(folder, "openvino", "ladder"), exist_ok=True)
    for name in ("head", "prior_backbone"):
        xml = os.path.join("openvino", "ladder", f"{name}.xml")
        ov.save_model(ov.Core().read_model(os.path.join(folder, manifest["stages"][name]["file"])),
                      os.path.join(folder, xml), compress_to_fp16=False)
        files["int8"][name] = ov_export.file_entry(folder, xml)
    return files


def test_ladder_falls_back_and_steps_down(int8_artifacts, tmp_path, monkeypatch):
    """A stage whose reduced precision fails its gate runs fp32; a failing end-to-end check steps the
    worst stage down; failing with every stage at fp32 is a ParityError. The int8 rungs are the
    test's own (_ladder_files), not this CPU's plan: the ladder is the same on every CPU but bf16."""
    import fssam.export.openvino as ov_export
    from fssam.runtime.parity import ParityError

    out, manifest = str(tmp_path / "export"), int8_artifacts[1]
    shutil.copytree(int8_artifacts[0], out)
    model = build("tiny", seed=0)
    files = _ladder_files(out, manifest)
    real_check = ov_export.check_stage

    def head_fails_below_fp32(runner, name, calls, baseline):
        outputs, failures = real_check(runner, name, calls, baseline)
        if name == "head" and baseline.kind != "fp32":
            failures = failures + ["head forced to fail"]
        return outputs, failures

    monkeypatch.setattr(ov_export, "check_stage", head_fails_below_fp32)
    monkeypatch.setattr(ov_export, "_choose", lambda tried: next(o for o in tried if tried[o]["passed"]))
    episode = sample_episode(model.config, 1, seed=4)
    result = ov_export.plan_precision(out, manifest, model, "int8", files, [episode], None)
    head = result["stages"]["head"]  # every reduced rung tried in ladder order, each failed: fp32
    assert list(head["tried"]) == ["int8", *(["bf16"] if cpu.native_bf16() else []), "fp32"]
    assert head["precision"] == "fp32" and not any(head["tried"][o]["passed"] for o in list(head["tried"])[:-1])
    assert head["tried"]["int8"]["worst_error_over_limit"] <= ov_export.SELECTION_MARGIN  # only the forced failure
    assert result["stages"]["prior_backbone"]["precision"] == "int8"  # its first rung passes: taken
    first = {name: entry["precision"] for name, entry in result["stages"].items()}

    calls = []
    real_end = ov_export.check_end_to_end

    def fail_once(*args):
        end, failures = real_end(*args)
        calls.append(1)
        return end, failures + (["forced"] if len(calls) == 1 else [])

    monkeypatch.setattr(ov_export, "check_end_to_end", fail_once)
    result = ov_export.plan_precision(out, manifest, model, "int8", files, [episode], None)
    assert result["parity"]["passed"] and len(calls) == 2
    stepped = [name for name, entry in result["stages"].items() if "stepped_down" in entry]
    reduced = [name for name, precision in first.items() if precision != "fp32"]
    assert len(stepped) == 1 and stepped[0] in reduced, (stepped, first)

    def worst(name):
        return result["stages"][name]["tried"][first[name]]["worst_error_over_limit"]

    down = result["stages"][stepped[0]]  # the reduced stage furthest over its limits, one rung down
    assert worst(stepped[0]) == max(map(worst, reduced))
    assert list(down["tried"]).index(down["precision"]) > list(down["tried"]).index(first[stepped[0]])
    assert {n: e["precision"] for n, e in result["stages"].items() if n not in stepped} == \
        {n: p for n, p in first.items() if n not in stepped}

    # every gate episode counts: an end-to-end failure on the second episode only steps a stage down too
    calls.clear()

    def fail_second_episode_once(*args):
        end, failures = real_end(*args)
        calls.append(1)
        return end, failures + (["forced"] if len(calls) == 2 else [])

    monkeypatch.setattr(ov_export, "check_end_to_end", fail_second_episode_once)
    second = sample_episode(model.config, 1, seed=5)
    result = ov_export.plan_precision(out, manifest, model, "int8", files, [episode, second], None)
    assert len(calls) == 4 and any("stepped_down" in entry for entry in result["stages"].values())
    assert result["parity"]["passed"] and result["parity"]["end_to_end"]["episodes"] == 2

    monkeypatch.setattr(ov_export, "check_end_to_end", lambda *args: (real_end(*args)[0], ["forced"]))
    with pytest.raises(ParityError, match="OpenVINO"):
        ov_export.gate_openvino(out, manifest, model, ("fp32",))

    # a stage over its limits at every rung, fp32 included, fails the plan though the end to end passes
    monkeypatch.undo()  # the real _choose and end-to-end check

    def prior_fails_everywhere(runner, name, calls, baseline):
        outputs, failures = real_check(runner, name, calls, baseline)
        return outputs, failures + (["prior forced to fail"] if name == "prior" else [])

    monkeypatch.setattr(ov_export, "check_stage", prior_fails_everywhere)
    result = ov_export.plan_precision(out, manifest, model, "fp32", files, [episode], None)
    assert not result["parity"]["passed"]  # the only failure is the stage's: the end to end passed
    assert result["parity"]["failures"] == ["prior forced to fail [OpenVINO fp32]"]


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


def test_calibration_folder_of_user_files(tmp_path):
    """A calibration folder as users have one: JPEG photos of several sizes, masks 0/255 (one
    with an ignore border, 0/1/255), extra files ignored; read at the export's size, hashed, and
    cut into calibration episodes and the held-out gate episode (the last K+1 pairs)."""
    from PIL import Image

    from fssam.export import calibration

    folder = tmp_path / "mine"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    (folder / "images" / "notes.txt").write_text("not an image")
    rng = np.random.default_rng(3)
    sizes = [(120, 90), (64, 64), (75, 100), (90, 90), (200, 150)]
    for index, (width, height) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            folder / "images" / f"photo{index}.jpg", quality=90)
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
        if index == 1:
            mask = (mask // 255).astype(np.uint8)
            mask[:2] = 255  # ignore border
        Image.fromarray(mask).save(folder / "masks" / f"photo{index}.png")
    pairs = calibration.read_set(str(folder), 64, shots=1)
    assert len(pairs) == 5
    for image, mask in pairs:
        assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 255
        assert mask.shape == (64, 64) and set(mask.unique().tolist()) == {0.0, 1.0}  # ignore is background
    first = calibration.describe(str(folder), "user")
    assert first["source"] == "user" and first["folder"] == "mine" and first["pairs"] == 5
    assert calibration.describe(str(folder), "user") == first
    Image.fromarray(np.full((90, 90), 255, np.uint8)).save(folder / "masks" / "photo3.png")
    assert calibration.describe(str(folder), "user")["sha256"] != first["sha256"]
    episodes, held = calibration.episodes(pairs, shots=1)
    assert len(episodes) == 3 and all(q.shape == (1, 3, 64, 64) and s.shape == (1, 1, 3, 64, 64)
                                      and m.shape == (1, 1, 64, 64) for q, s, m in episodes)
    assert torch.equal(held[0][0], pairs[3][0]) and torch.equal(held[1][0, 0], pairs[4][0])
    assert torch.equal(held[2][0, 0], pairs[4][1])


# ---------------------------------------------------------------- ONNX Runtime: providers and bf16

def test_onnxruntime_providers_follow_the_device():
    """cpu: the CPU provider; cuda: TensorRT (where this onnxruntime has it), CUDA, then CPU for the
    rest; cuda without the CUDA provider: the CPU provider and a note saying why."""
    from fssam.runtime.runners.onnxruntime import select_providers

    cpu_only, gpu, gpu_trt = (["AzureExecutionProvider", "CPUExecutionProvider"],
                              ["CUDAExecutionProvider", "CPUExecutionProvider"],
                              ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert select_providers("cpu", gpu_trt) == (["CPUExecutionProvider"], None)
    assert select_providers("cuda", gpu) == (["CUDAExecutionProvider", "CPUExecutionProvider"], None)
    assert select_providers("cuda", gpu_trt) == (gpu_trt, None)
    providers, note = select_providers("cuda", cpu_only)
    assert providers == ["CPUExecutionProvider"] and "no CUDAExecutionProvider" in note and "onnxruntime-gpu" in note
    with pytest.raises(ConfigError, match="device 'tpu'"):
        select_providers("tpu", gpu)


def test_onnxruntime_runner_says_which_provider_ran(tiny_artifacts, monkeypatch):
    import onnxruntime as ort

    runner = open_runner("onnxruntime", tiny_artifacts[0])
    assert runner.providers == ["CPUExecutionProvider"] and not runner.io_binding and runner.tensors == "numpy"
    runner.prior_backbone(np.zeros((1, 3, 64, 64), np.float32))
    assert runner.providers_used() == ["CPUExecutionProvider"]
    assert runner.describe() == "ONNX Runtime fp32 (CPUExecutionProvider)"
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    asked_gpu = open_runner("onnxruntime", tiny_artifacts[0], device="cuda")
    assert asked_gpu.providers == ["CPUExecutionProvider"] and not asked_gpu.io_binding
    assert "no CUDAExecutionProvider" in asked_gpu.describe()


def test_onnxruntime_gpu_provider_options(tiny_artifacts, monkeypatch, tmp_path):
    """device cuda:N (an onnxruntime offering TensorRT and CUDA; no session is opened): device_id N for
    both GPU providers; the TensorRT provider gets the export's batch profile as its explicit shape
    range (no engine rebuilds mid-run) and an engine cache folder per export and precision."""
    import onnxruntime as ort

    from fssam.runtime.contract import profile_shapes

    trt, cuda, cpu = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
    monkeypatch.setattr(ort, "get_available_providers", lambda: [trt, cuda, cpu])
    monkeypatch.setenv("FSSAM_ORT_TENSORRT_CACHE", str(tmp_path))
    folder, manifest = tiny_artifacts
    runner = open_runner("onnxruntime", folder, device="cuda:1")
    assert runner.providers == [trt, cuda, cpu] and runner.io_binding and runner.device_id == 1
    assert runner.describe().startswith("ONNX Runtime fp32 (requested TensorrtExecutionProvider")
    trt_options, cuda_options, cpu_options = runner._provider_options("image_encoder")
    assert cuda_options == {"device_id": "1", "use_tf32": "0"} and cpu_options == {} and trt_options["device_id"] == "1"
    ranges = profile_shapes({"image_encoder": manifest["stages"]["image_encoder"]}, manifest["max_batch"],
                            manifest["shots"])["image_encoder"]
    for i, kind in enumerate(("min", "opt", "max")):
        assert trt_options[f"trt_profile_{kind}_shapes"] == ",".join(
            f"{name}:{'x'.join(map(str, shapes[i]))}" for name, shapes in ranges.items())
    high = trt_options["trt_profile_max_shapes"].split(":")[1].split("x")[0]
    assert int(high) == manifest["max_batch"] * 2  # 1 shot: the query's 2 memory encodings per episode
    cache = trt_options["trt_engine_cache_path"]
    assert os.path.dirname(cache) == str(tmp_path) and cache.endswith("-fp32")
    runner.manifest = dict(manifest, seed=manifest.get("seed", 0) + 1)  # another export: another folder
    assert runner.tensorrt_cache() != cache
    with pytest.raises(ConfigError, match="expected cpu, cuda or cuda:N"):
        open_runner("onnxruntime", folder, device="cuda:x")


def test_onnxruntime_cuda_provider_that_cannot_start_is_refused(tiny_artifacts):
    """ONNX Runtime drops a provider it cannot start (here: a CPU-only build asked for CUDA) and runs
    on what is left: the GPU path refuses that with the providers it got, instead of binding GPU
    memory to a CPU session."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider that may start: the refusal needs one that cannot")
    runner = open_runner("onnxruntime", tiny_artifacts[0],
                         providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert runner.io_binding
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="could not start its CUDAExecutionProvider"):
        runner.session("prior_backbone")


@pytest.mark.parametrize("onnxruntime_behaviour", ["raises", "falls_back_itself"])
def test_onnxruntime_tensorrt_provider_that_cannot_start_is_dropped_keeping_the_options(tiny_artifacts, tmp_path,
                                                                                      monkeypatch,
                                                                                      onnxruntime_behaviour):
    """onnxruntime-gpu lists the TensorRT provider even where TensorRT is not installed; when it cannot
    start, ONNX Runtime's own fallback would reopen the session on CUDA + CPU with no provider options
    (GPU 0, TF32 on). The runner turns that fallback off, drops TensorRT itself, reopens with the same
    device and TF32 options, runs a bf16 export as its fp32-arithmetic copy (the CUDA provider lacks
    bf16 kernels) and says so. onnxruntime >= 1.23 raises (enable_fallback=0); older versions ignore
    that switch and come back on CUDA + CPU with default options, which is treated the same. The
    session class is a stand-in (no GPU here); the real one is given enable_fallback=0 by every CPU
    test."""
    import onnxruntime as ort

    trt, cuda, cpu = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
    folder = tmp_path / "bf16"
    shutil.copytree(tiny_artifacts[0], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(dict(manifest, precision="bf16")))
    opened = []

    class Session:
        def __init__(self, model, sess_options=None, providers=None, provider_options=None, **kwargs):
            opened.append((model, list(providers), provider_options, kwargs))
            self.providers = list(providers)
            if trt in providers:
                if onnxruntime_behaviour == "raises":
                    raise RuntimeError("TensorRT EP could not be created: libnvinfer.so.10: cannot open shared "
                                       "object file")
                self.providers = [cuda, cpu]  # its own fallback: no provider options

        def get_providers(self):
            return self.providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: [trt, cuda, cpu])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    monkeypatch.setenv("FSSAM_ORT_TENSORRT_CACHE", str(tmp_path / "cache"))
    runner = open_runner("onnxruntime", str(folder), device="cuda:1", verify=False)
    assert runner.providers == [trt, cuda, cpu] and not runner.bf16_emulated
    runner.session("prior_backbone")
    (first, first_providers, _, first_kwargs), (second, providers, options, kwargs) = opened
    assert first_providers == [trt, cuda, cpu] and first_kwargs == kwargs == {"enable_fallback": 0}
    assert isinstance(first, str) and isinstance(second, bytes)  # the file, then its fp32-arithmetic copy
    assert providers == [cuda, cpu] and options == [{"device_id": "1", "use_tf32": "0"}, {}]
    assert runner.bf16_emulated and runner.providers_used() == [cuda, cpu]
    why = "TensorRT EP could not be created" if onnxruntime_behaviour == "raises" else "ONNX Runtime dropped it"
    assert f"TensorrtExecutionProvider could not start ({why}" in runner.describe()
    runner.session("image_encoder")  # later sessions go straight to what is left
    assert opened[2][1] == [cuda, cpu] and len(opened) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="IO binding on the GPU needs a CUDA device; this machine has none")
def test_onnxruntime_io_binding_keeps_tensors_on_the_gpu(tiny_artifacts):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
    model = build("tiny", seed=0)
    runner = open_runner("onnxruntime", tiny_artifacts[0], device="cuda")
    assert runner.io_binding and runner.tensors == "torch"
    query, supports, masks = sample_episode(model.config, 1, batch=2, seed=3)
    logits = as_torch(runner, "cuda")(query.cuda(), supports.cuda(), masks.cuda())
    assert logits.is_cuda and "CUDAExecutionProvider" in runner.providers_used()
    with torch.no_grad():
        expected = model(query, supports, masks)
    # the fp32 gate's limit: the runner turns the CUDA provider's TF32 off
    assert (logits.cpu() - expected).abs().max().item() <= fp32_limit(expected.abs().max().item())


def _bf16_graph(opset):
    """x (N, 4) bf16 -> Einsum with a bf16 weight -> Add -> Sin: one op without bf16 at opset 22."""
    import ml_dtypes
    import onnx
    from onnx import helper, numpy_helper

    bf16 = onnx.TensorProto.BFLOAT16
    weight = numpy_helper.from_array((np.arange(16, dtype=np.float32).reshape(4, 4) / 8).astype(ml_dtypes.bfloat16),
                                     "weight")  # exact in bf16, and so are the products below
    nodes = [helper.make_node("Einsum", ["x", "weight"], ["mixed"], equation="nc,cd->nd"),
             helper.make_node("Add", ["mixed", "x"], ["summed"]),
             helper.make_node("Sin", ["summed"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", bf16, ["n", 4])],
                              [helper.make_tensor_value_info("y", bf16, ["n", 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def test_bf16_casts_only_what_onnx_cannot_take_and_the_cpu_copy_rounds_like_bf16():
    """cast_ops_without_bf16: at opset 22 only Einsum (bf16 from opset 28) is cast; at 18 Sin too.
    fp32_arithmetic: ONNX Runtime's CPU provider (no bf16 kernels: the file itself does not load)
    runs the copy, and every operator's output is rounded to bf16, as numpy computes it here."""
    import ml_dtypes
    import onnx
    import onnxruntime as ort

    from fssam.runtime.bf16 import cast_ops_without_bf16, fp32_arithmetic

    legacy = _bf16_graph(18)
    assert cast_ops_without_bf16(legacy) == {"Einsum": 1, "Sin": 1}
    model = _bf16_graph(22)
    with pytest.raises(Exception, match="bfloat16"):
        onnx.checker.check_model(model, full_check=True)
    assert cast_ops_without_bf16(model) == {"Einsum": 1}
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    session = ort.InferenceSession(fp32_arithmetic(model).SerializeToString(), providers=["CPUExecutionProvider"])
    x = (np.arange(12, dtype=np.float32).reshape(3, 4) - 6) / 4  # exact in bf16: x @ weight is exact in fp32
    got = session.run(None, {"x": x})[0]

    def rounded(a):
        return a.astype(ml_dtypes.bfloat16).astype(np.float32)

    weight = np.arange(16, dtype=np.float32).reshape(4, 4) / 8
    expected = rounded(np.sin(rounded(rounded(x @ weight) + x)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert not np.allclose(got, np.sin(x @ weight + x), rtol=0, atol=1e-6)  # the rounding is there


def test_bf16_casts_from_uint8_go_through_fp32():
    """The deployable graphs take uint8 images and masks; TensorRT converts uint8 only to fp32 / fp16,
    so a bf16 export's Cast uint8 -> bf16 becomes uint8 -> fp32 -> bf16 (exact for 0..255), and the
    file still passes ONNX's full check and gives the same values."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from fssam.runtime.bf16 import cast_ops_without_bf16, fp32_arithmetic

    tp = onnx.TensorProto
    graph = helper.make_graph(
        [helper.make_node("Cast", ["image"], ["image_bf16"], to=tp.BFLOAT16),
         helper.make_node("Cast", ["image_bf16"], ["out"], to=tp.FLOAT)],
        "uint8_in", [helper.make_tensor_value_info("image", tp.UINT8, [2, 3])],
        [helper.make_tensor_value_info("out", tp.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    assert cast_ops_without_bf16(model) == {"Cast from uint8": 1}
    onnx.checker.check_model(model, full_check=True)
    first, second = model.graph.node[0], model.graph.node[1]
    assert (first.op_type, first.input[0], first.attribute[0].i) == ("Cast", "image", tp.FLOAT)
    assert (second.input[0], second.attribute[0].i) == (first.output[0], tp.BFLOAT16)
    assert cast_ops_without_bf16(model) == {}  # nothing left to change
    image = np.array([[0, 1, 127], [128, 254, 255]], np.uint8)
    session = ort.InferenceSession(fp32_arithmetic(model).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"image": image})[0], image.astype(np.float32))


def test_bf16_layer_norm_beside_fp32_weights_computes_in_fp32():
    """Autocast hands LayerNorm a bf16 activation with its fp32 weights (PyTorch computes it in
    fp32); ONNX wants one type for X and Scale, so the export casts X to fp32 and the result back
    to bf16: the file passes ONNX's full check and gives PyTorch's values."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from fssam.runtime.bf16 import cast_ops_without_bf16, fp32_arithmetic

    tp = onnx.TensorProto
    rng = np.random.default_rng(0)
    scale, bias = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["x_bf16"], to=tp.BFLOAT16),
         helper.make_node("LayerNormalization", ["x_bf16", "scale", "bias"], ["y"], axis=-1, epsilon=1e-6),
         helper.make_node("Cast", ["y"], ["out"], to=tp.FLOAT)],
        "mixed_ln", [helper.make_tensor_value_info("x", tp.FLOAT, [3, 8])],
        [helper.make_tensor_value_info("out", tp.FLOAT, [3, 8])],
        [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.checker.check_model(model, full_check=True)  # as torch.onnx writes it
    assert cast_ops_without_bf16(model) == {"LayerNormalization": 1}
    onnx.checker.check_model(model, full_check=True)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    session = ort.InferenceSession(fp32_arithmetic(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    expected = torch.nn.functional.layer_norm(torch.from_numpy(x).bfloat16(), (8,), torch.from_numpy(scale),
                                              torch.from_numpy(bias), 1e-6)
    assert expected.dtype == torch.bfloat16  # PyTorch's own mixed-type LayerNorm
    assert np.abs(got - expected.float().numpy()).max() <= np.abs(expected.float().numpy()).max() * 2 ** -8
