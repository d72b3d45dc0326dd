"""`fssam export --aoti`: the options refused before any work, and where a package may load
(fssam.runtime.runners.torch.check_where). The packages themselves are built, gated, run and
served in tests/test_torch_backend.py."""

import subprocess
import sys

import pytest
import torch

from fssam.errors import ConfigError
from fssam.runtime.runners.torch import build_record, check_where


def _export(tmp_path, *argv):
    result = subprocess.run([sys.executable, "-m", "fssam.cli", "export", "--config", "tiny", "--out",
                             str(tmp_path / "out"), "--no-progress", *argv], capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return result.returncode, lines


@pytest.mark.parametrize("argv,message", [
    (["--aoti", "fp16"], "--aoti fp16 is for --device cuda"),
    (["--aoti", "fp64"], "--aoti fp64: expected a comma list of fp32, bf16, fp16"),
    (["--aoti", "fp32", "--precision", "fp16"], "--aoti packages are compiled from the fp32 model"),
    *([(["--aoti", "fp32", "--device", "cuda"], "--device cuda: this machine has no CUDA GPU")]
      if not torch.cuda.is_available() else []),
])
def test_aoti_options_refused_in_one_line_before_any_work(tmp_path, argv, message):
    code, lines = _export(tmp_path, *argv)
    assert code == 1 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_package_loads_only_with_the_torch_and_device_that_built_it():
    here = build_record("cpu")
    assert check_where(here, "fp32") == "cpu"
    with pytest.raises(ConfigError, match=r"built with torch 0\.0\.0, this is torch .*export again here$"):
        check_where({**here, "torch": "0.0.0"}, "fp32")
    with pytest.raises(ConfigError, match=r"built for cpu, not cuda: export them again with `fssam export --aoti "
                                          r"fp32 --device cuda`$"):
        check_where(here, "fp32", device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"built for CUDA \(NVIDIA H100\) and this machine has no CUDA GPU$"):
            check_where({"device": "cuda", "torch": torch.__version__, "gpu": "NVIDIA H100"}, "bf16")
