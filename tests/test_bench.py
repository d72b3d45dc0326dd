"""`fssam bench --quick`: the output files are well-formed (timings are reported, not tested)."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image


def test_quick_bench_writes_json_table_and_plots(tiny_artifacts, tmp_path):
    artifacts, _ = tiny_artifacts
    out = tmp_path / "quick"
    result = subprocess.run(
        [sys.executable, "-m", "fssam.cli", "bench", "--quick", "--artifacts", artifacts, "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
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
    assert "| eager_fp32 |" in table and "| onnxruntime |" in table and "speed-up vs eager fp32" in table
    for name in ("latency_stages_1shot.png", "throughput_1shot.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
    assert not (out / "artifacts-1shot").exists()  # the given artifacts were reused
    assert modes["onnxruntime"]["device"] == "cpu" and modes["eager_fp32"]["device"] == data["device"]


def test_unknown_mode_is_one_error_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fssam.cli", "bench", "--quick", "--modes", "warp_drive", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().endswith("unknown bench mode(s) warp_drive: expected some of eager_fp32, eager_bf16, compile, onnxruntime, tensorrt, triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
@pytest.mark.parametrize("argv,message", [
    (["--device", "cuda"], "--device cuda: this machine has no CUDA device"),
    (["--modes", "tensorrt"], "no CUDA device: TensorRT engines can only be built and run on a machine with an NVIDIA GPU"),
])
def test_gpu_only_requests_fail_clearly_without_a_gpu(tmp_path, argv, message):
    result = subprocess.run([sys.executable, "-m", "fssam.cli", "bench", "--quick", *argv, "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and message in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
