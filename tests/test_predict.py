"""`fssam predict` input errors that are about the files rather than their content (a folder, a
file the system will not read) and the model --seed range, each one line from the real command.
Image content errors are in test_cli_predict.py."""

import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

# root reads a chmod 000 file anyway: run the command without the capabilities that allow it
UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def run_cli(*args, prefix=()):
    return subprocess.run([*prefix, sys.executable, "-m", "fssam.cli", *args], capture_output=True, text=True,
                          timeout=300)


def one_error_line(result, command="predict") -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"fssam {command}: error:"), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def episode(tmp_path_factory):
    """support.jpg / support.png / query.jpg, and unreadable (mode 000) copies of each."""
    folder = tmp_path_factory.mktemp("episode")
    rng = np.random.default_rng(0)
    for name in ("support", "query"):
        cv2.imwrite(str(folder / f"{name}.jpg"), (rng.random((60, 80, 3)) * 255).astype(np.uint8))
    mask = np.zeros((60, 80), np.uint8)
    mask[10:40, 20:60] = 1
    Image.fromarray(mask).save(folder / "support.png")
    for name in ("support.jpg", "support.png", "query.jpg"):
        shutil.copy(folder / name, folder / f"locked_{name}")
        os.chmod(folder / f"locked_{name}", 0)
    return folder


def _files(folder, **given) -> list[str]:
    """predict's input options, each the episode's own file unless `given` names another."""
    files = {"query": "query.jpg", "support": "support.jpg", "support_mask": "support.png", **given}
    return ["--query", str(folder / files["query"]), "--support", str(folder / files["support"]),
            "--support-mask", str(folder / files["support_mask"])]


def _unprivileged_prefix(folder) -> list[str]:
    """How to run a command that a mode-000 file refuses: as is for a user, under setpriv for root."""
    if os.geteuid() != 0:
        return []
    locked = str(folder / "locked_query.jpg")
    if shutil.which("setpriv") is None or subprocess.run([*UNPRIVILEGED, "cat", locked], capture_output=True).returncode == 0:
        pytest.skip("running as root without a way to drop the capabilities that read a mode-000 file")
    return UNPRIVILEGED


@pytest.mark.parametrize("option,kind", [("query", "image"), ("support", "image"), ("support_mask", "mask")])
def test_an_unreadable_input_is_one_permission_error(episode, tmp_path, option, kind):
    locked = {"query": "locked_query.jpg", "support": "locked_support.jpg", "support_mask": "locked_support.png"}[option]
    out = tmp_path / "pred.png"
    result = run_cli("predict", "--config", "tiny", *_files(episode, **{option: locked}), "--out", str(out),
                     prefix=_unprivileged_prefix(episode))
    line = one_error_line(result)
    assert line.endswith(f"{kind} {str(episode / locked)!r} cannot be read: permission denied"), line
    assert not out.exists()


@pytest.mark.parametrize("option,kind", [("query", "image"), ("support", "image"), ("support_mask", "mask")])
def test_a_folder_given_as_an_input_is_named_a_folder(episode, tmp_path, option, kind):
    out = tmp_path / "pred.png"
    result = run_cli("predict", "--config", "tiny", *_files(episode, **{option: "."}), "--out", str(out))
    line = one_error_line(result)
    assert line.endswith(f"{kind} {str(episode / '.')!r} is a folder, not an image file"), line
    assert not out.exists()


@pytest.mark.parametrize("seed", [str(2**63), str(2**70), "-1", "seven"])
def test_a_seed_out_of_range_is_one_usage_line(episode, tmp_path, seed):
    result = run_cli("predict", "--config", "tiny", *_files(episode), "--seed", seed, "--out", str(tmp_path / "p.png"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"argument --seed: {seed if seed != 'seven' else repr(seed)}: expected a seed, 0 <= seed < 2**63")


def test_the_largest_seed_builds_the_model(episode, tmp_path):
    out = tmp_path / "p.png"
    result = run_cli("predict", "--config", "tiny", *_files(episode), "--seed", str(2**63 - 1), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"RANDOM-INIT model (seed {2**63 - 1})" in result.stderr and out.exists()


@pytest.mark.parametrize("command", ["export", "bench", "eval"])
def test_every_model_seed_option_has_the_range(tmp_path, command):
    """--seed is the shared model option: the commands that build a model refuse it alike."""
    result = run_cli(command, "--seed", str(2**64), "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"argument --seed: {2**64}: expected a seed, 0 <= seed < 2**63" in result.stderr
