"""`fssam predict` end to end on generated images, and one clear error line for bad input."""

import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image


def _write_pair(folder, name, height, width, seed, foreground=True):
    rng = np.random.default_rng(seed)
    image = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    if foreground:
        mask[height // 4 : height // 2, width // 3 : 2 * width // 3] = 1
    mask[:3] = 255
    cv2.imwrite(str(folder / f"{name}.jpg"), image)
    Image.fromarray(mask).save(folder / f"{name}.png")
    return str(folder / f"{name}.jpg"), str(folder / f"{name}.png")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fssam.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def episode(tmp_path_factory):
    folder = tmp_path_factory.mktemp("episode")
    pairs = [_write_pair(folder, f"support{i}", 90 + 10 * i, 120, seed=i) for i in range(5)]
    query, _ = _write_pair(folder, "query", 77, 101, seed=9)
    return folder, pairs, query


@pytest.mark.parametrize("shots", [1, 5])
def test_predict_writes_mask_and_overlay(episode, shots):
    folder, pairs, query = episode
    out = folder / f"pred{shots}.png"
    args = ["predict", "--config", "tiny", "--query", query, "--out", str(out)]
    for image, mask in pairs[:shots]:
        args += ["--support", image, "--support-mask", mask]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "RANDOM-INIT" in result.stderr
    mask = np.asarray(Image.open(out))
    overlay = np.asarray(Image.open(folder / f"pred{shots}_overlay.png"))
    assert mask.shape == (77, 101) and set(np.unique(mask)) <= {0, 255}
    assert overlay.shape == (77, 101, 3)
    assert f"{shots}-shot episode" in result.stdout


def _bad_case(folder, pairs, query, case):
    image, mask = pairs[0]
    if case == "values":
        bad = folder / "values.png"
        Image.fromarray(np.full((90, 120), 7, np.uint8)).save(bad)
        return ["--support", image, "--support-mask", str(bad)], "has values 7"
    if case == "empty":  # all background (a 0/255 mask is 0 = background, 255 = foreground)
        empty_image, _ = _write_pair(folder, "empty", 90, 120, seed=3, foreground=False)
        empty_mask = folder / "empty_zeros.png"
        Image.fromarray(np.zeros((90, 120), np.uint8)).save(empty_mask)
        return ["--support", empty_image, "--support-mask", str(empty_mask)], "is empty"
    if case == "ignore-only":
        ignore_mask = folder / "ignore_only.png"
        Image.fromarray(np.full((90, 120), 255, np.uint8)).save(ignore_mask)
        return ["--support", image, "--support-mask", str(ignore_mask)], "is empty"
    if case == "size":
        return ["--support", pairs[1][0], "--support-mask", mask], "but its image is"
    if case == "unreadable":
        broken = folder / "broken.jpg"
        broken.write_bytes(b"not an image at all")
        return ["--support", str(broken), "--support-mask", mask], "cannot be decoded"
    if case == "missing":
        return ["--support", str(folder / "nope.jpg"), "--support-mask", mask], "does not exist"
    if case == "unpaired":
        return ["--support", image, "--support", pairs[1][0], "--support-mask", mask], "give them in pairs"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["values", "empty", "ignore-only", "size", "unreadable", "missing", "unpaired"])
def test_bad_input_gives_one_error_line(episode, case):
    folder, pairs, query = episode
    args, message = _bad_case(folder, pairs, query, case)
    out = folder / f"bad_{case}.png"
    result = run_cli("predict", "--config", "tiny", "--query", query, "--out", str(out), *args)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fssam predict: error:") and message in lines[0], result.stderr
    assert not out.exists()


def test_unknown_config_is_one_error_line(episode):
    folder, pairs, query = episode
    result = run_cli("predict", "--config", "gigantic", "--query", query, "--out", str(folder / "x.png"),
                     "--support", pairs[0][0], "--support-mask", pairs[0][1])
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "fssam predict: error: unknown config 'gigantic': expected one of tiny, small, base_plus, large"
    )
