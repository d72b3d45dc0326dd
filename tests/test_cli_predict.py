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


def _predict_args(pairs, query, out, shots=1):
    args = ["predict", "--config", "tiny", "--query", query, "--out", str(out)]
    for image, mask in pairs[:shots]:
        args += ["--support", image, "--support-mask", mask]
    return args


def test_predict_bf16_writes_a_mask_close_to_fp32(episode, monkeypatch):
    import torch

    from fssam import cli
    from fssam.eval import precision as eager

    folder, pairs, query = episode
    logits = {}
    forward = eager.eager_forward

    def recording(model, query, supports, masks, device, precision):
        logits[precision] = forward(model, query, supports, masks, device, precision)
        return logits[precision]

    monkeypatch.setattr(eager, "eager_forward", recording)
    for precision in ("fp32", "bf16"):
        out = folder / f"prec_{precision}.png"
        code = cli.main([*_predict_args(pairs, query, out, shots=5), "--precision", precision, "--device", "cpu"])
        assert code == 0 and out.exists()
    assert logits["fp32"].dtype == logits["bf16"].dtype == torch.float32
    assert (logits["fp32"] - logits["bf16"]).abs().max() > 0  # autocast ran in bf16
    fp32 = np.asarray(Image.open(folder / "prec_fp32.png"))
    bf16 = np.asarray(Image.open(folder / "prec_bf16.png"))
    assert fp32.shape == bf16.shape == (77, 101) and set(np.unique(bf16)) <= {0, 255}
    assert (fp32 == bf16).mean() >= 0.9


def test_predict_where_names_device_and_precision(episode):
    folder, pairs, query = episode
    result = run_cli(*_predict_args(pairs, query, folder / "where.png"), "--precision", "bf16", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "(eager, tiny, CPU, bf16)" in result.stdout
    result = run_cli(*_predict_args(pairs, query, folder / "where32.png"))
    assert result.returncode == 0, result.stderr
    assert "(eager, tiny, CPU, fp32)" in result.stdout or "(eager, tiny, CUDA, fp32)" in result.stdout


@pytest.mark.parametrize("flag, value, message", [
    ("--precision", "fp16", "--precision 'fp16' for eager PyTorch: expected one of fp32, bf16"),
    ("--device", "tpu", "device 'tpu': expected one of auto, cpu, cuda"),
])
def test_predict_bad_precision_or_device_is_one_line(episode, flag, value, message):
    folder, pairs, query = episode
    out = folder / "bad_flag.png"
    result = run_cli(*_predict_args(pairs, query, out), flag, value)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"fssam predict: error: {message}"]
    assert not out.exists()


def test_predict_cuda_without_gpu_is_one_line(episode):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    folder, pairs, query = episode
    result = run_cli(*_predict_args(pairs, query, folder / "cuda.png"), "--device", "cuda")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["fssam predict: error: --device cuda: this machine has no CUDA device"]


@pytest.mark.parametrize("flag, value", [("--precision", "bf16"), ("--device", "cpu")])
def test_predict_url_refuses_precision_and_device(episode, capsys, flag, value):
    from fssam import cli

    folder, pairs, query = episode
    out = folder / "remote.png"
    code = cli.main([*_predict_args(pairs, query, out), "--url", "127.0.0.1:1", flag, value])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and flag in lines[0] and "cannot be used with --url" in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("url", [None, "http://127.0.0.1:1"])
def test_predict_cacert_needs_an_https_url(episode, capsys, url):
    from fssam import cli

    folder, pairs, query = episode
    out = folder / "cacert.png"
    args = [*_predict_args(pairs, query, out), "--cacert", str(folder / "ca.pem")]
    code = cli.main(args + (["--url", url] if url else []))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "https://" in lines[0], lines
    assert not out.exists()


def test_predict_replaces_only_its_own_pngs(episode, tmp_path):
    """--out may be a new file or a PNG predict wrote (tagged), never an input or a user's file: those
    are refused with one line before any work, and left as they were."""
    folder, pairs, query = episode
    image, mask = pairs[0]
    base = ["predict", "--config", "tiny", "--support", image, "--support-mask", mask, "--query", query]
    out = tmp_path / "pred.png"
    assert run_cli(*base, "--out", str(out)).returncode == 0
    again = run_cli(*base, "--out", str(out))  # its own output: replaced
    assert again.returncode == 0, again.stderr
    query_bytes = open(query, "rb").read()
    user = tmp_path / "mine.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(user)
    user_bytes = user.read_bytes()
    for target, expected in ((query, "is not a file fssam wrote"), (str(user), "is not a file fssam wrote"),
                             (str(tmp_path), "is a folder"), (str(tmp_path / "no" / "p.png"), "does not exist")):
        result = run_cli(*base, "--out", target)
        assert result.returncode == 1 and expected in result.stderr, result.stderr
        assert result.stderr.strip().count("\n") == 0 and "RANDOM-INIT" not in result.stderr  # before any work
    assert open(query, "rb").read() == query_bytes and user.read_bytes() == user_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.png", "pred.png", "pred_overlay.png"]
