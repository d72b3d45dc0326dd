"""Support masks as users have them (0/255, 16-bit, LA, RGBA, palette), header size checks,
the predict -> support mask round trip, scripts/make_episode.py errors and `predict --url` errors.
Every test writes its own files."""

import os
import socket
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from fssam.cli import main
from fssam.data.preprocess import MAX_IMAGE_SIDE, check_mask, load_episode, read_image, read_mask
from fssam.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 40, 50


def _labels():
    """(H, W) 0/1 with a foreground rectangle."""
    mask = np.zeros((H, W), np.uint8)
    mask[10:30, 15:35] = 1
    return mask


def _read_checked(path):
    return check_mask(read_mask(str(path)), str(path), (H, W, 3))


def _expect_fg(mask):
    np.testing.assert_array_equal(mask, _labels())


def test_zero_one_with_ignore_as_before(tmp_path):
    labels = _labels()
    labels[:2] = 255
    Image.fromarray(labels).save(tmp_path / "m.png")
    np.testing.assert_array_equal(_read_checked(tmp_path / "m.png"), labels)


def test_zero_255_png_is_background_foreground(tmp_path):
    Image.fromarray(_labels() * 255).save(tmp_path / "m.png")
    _expect_fg(_read_checked(tmp_path / "m.png"))


def test_zero_k_is_background_foreground(tmp_path):
    Image.fromarray(_labels() * 7).save(tmp_path / "m.png")
    _expect_fg(_read_checked(tmp_path / "m.png"))


def test_16bit_zero_65535(tmp_path):
    path = str(tmp_path / "m16.png")
    assert cv2.imwrite(path, _labels().astype(np.uint16) * 65535)
    assert Image.open(path).mode.startswith("I")
    _expect_fg(_read_checked(path))


def test_la_uses_l_when_two_valued(tmp_path):
    la = np.stack([_labels() * 255, np.full((H, W), 255, np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "m.png")
    _expect_fg(_read_checked(tmp_path / "m.png"))


def test_la_uses_alpha_when_l_is_not_a_mask(tmp_path):
    grey = np.tile(np.arange(W, dtype=np.uint8) * 5, (H, 1))  # a ramp, not a mask
    la = np.stack([grey, _labels() * 255], -1)
    Image.fromarray(la, "LA").save(tmp_path / "m.png")
    _expect_fg(_read_checked(tmp_path / "m.png"))


def test_rgba_alpha_only(tmp_path):
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 3] = _labels() * 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    _expect_fg(_read_checked(tmp_path / "m.png"))


def test_grey_rgba(tmp_path):
    rgba = np.repeat((_labels() * 255)[..., None], 4, -1)
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    _expect_fg(_read_checked(tmp_path / "m.png"))


def test_colour_rgba_is_still_an_error(tmp_path):
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 0] = _labels() * 255
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    with pytest.raises(InputError, match="is a colour image"):
        _read_checked(tmp_path / "m.png")


def test_palette_by_indices(tmp_path):
    labels = _labels()
    labels[:2] = 255  # VOC-style boundary index
    image = Image.fromarray(labels, "P")
    palette = [0, 0, 0, 128, 0, 0] + [0, 0, 0] * 253 + [224, 224, 192]
    image.putpalette(palette)
    image.save(tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").mode == "P"
    np.testing.assert_array_equal(_read_checked(tmp_path / "m.png"), labels)


def test_ambiguous_values_are_named(tmp_path):
    labels = _labels() * 7
    labels[:3] = 200
    Image.fromarray(labels).save(tmp_path / "m.png")
    with pytest.raises(InputError) as info:
        _read_checked(tmp_path / "m.png")
    message = str(info.value)
    assert "has values 0, 7, 200" in message and "0/255" in message and "\n" not in message


def test_empty_and_ignore_only(tmp_path):
    for name, value in (("zeros", 0), ("ignore", 255)):
        Image.fromarray(np.full((H, W), value, np.uint8)).save(tmp_path / f"{name}.png")
        with pytest.raises(InputError, match="is empty"):
            _read_checked(tmp_path / f"{name}.png")


def _png_claiming(path, width, height):
    """A valid 4x4 PNG whose IHDR then claims width x height (CRC fixed up)."""
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    data = bytearray(open(path, "rb").read())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    open(path, "wb").write(bytes(data))
    return str(path)


@pytest.mark.parametrize("width,height", [(20000, 20000), (9000, 10)])
def test_header_size_checked_before_decoding(tmp_path, width, height, monkeypatch):
    import cv2
    from PIL import Image

    from fssam.data import preprocess

    def decoded(*args, **kwargs):
        raise AssertionError("the pixels were read or decoded before the size check")

    path = _png_claiming(tmp_path / "huge.png", width, height)
    monkeypatch.setattr(preprocess.np, "fromfile", decoded)
    monkeypatch.setattr(cv2, "imdecode", decoded)
    monkeypatch.setattr(Image.Image, "load", decoded)
    for reader, kind in ((read_image, "image"), (read_mask, "mask")):
        with pytest.raises(InputError) as info:
            reader(path)
        message = str(info.value)
        assert message.startswith(f"{kind} ") and f"{width}x{height}" in message
        assert f"larger than {MAX_IMAGE_SIDE} px a side" in message and "\n" not in message


def _episode(folder):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import make_episode
    finally:
        sys.path.pop(0)
    make_episode.main(str(folder))
    return {name: str(folder / name) for name in ("support.jpg", "support.png", "query.jpg")}


def test_cli_huge_header_is_one_error_line(tmp_path, capsys):
    files = _episode(tmp_path)
    huge = _png_claiming(tmp_path / "huge.png", 20000, 20000)
    for args in (["--support", files["support.jpg"], "--support-mask", huge, "--query", files["query.jpg"]],
                 ["--support", files["support.jpg"], "--support-mask", files["support.png"], "--query", huge]):
        code = main(["predict", "--config", "tiny", *args, "--out", str(tmp_path / "out.png")])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1 and len(lines) == 1, err
        assert lines[0].startswith("fssam predict: error:") and "20000x20000" in lines[0]
    assert not (tmp_path / "out.png").exists()


def test_predict_output_round_trips_as_support_mask(tmp_path, capsys):
    files = _episode(tmp_path)
    first = str(tmp_path / "pred.png")
    assert main(["predict", "--config", "tiny", "--support", files["support.jpg"], "--support-mask",
                 files["support.png"], "--query", files["query.jpg"], "--out", first]) == 0
    pred = np.asarray(Image.open(first))
    assert set(np.unique(pred)) == {0, 255}  # a 0/255 mask with some foreground
    second = str(tmp_path / "pred2.png")
    code = main(["predict", "--config", "tiny", "--support", files["query.jpg"], "--support-mask", first,
                 "--query", files["support.jpg"], "--out", second])
    assert code == 0, capsys.readouterr().err
    assert np.asarray(Image.open(second)).shape == (375, 500)
    # the 0/255 mask reads as the same foreground as the 0/1 one
    query = read_image(files["query.jpg"])
    _, _, masks, _ = load_episode([files["query.jpg"]], [first], files["query.jpg"], 64)
    assert masks.shape == (1, 1, 64, 64) and 0 < masks.mean() < 1 and query.shape[:2] == pred.shape


def _script(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_episode.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_make_episode_writes_and_fails_clearly(tmp_path):
    ok = _script(str(tmp_path))
    assert ok.returncode == 0 and sorted(os.listdir(tmp_path)) == ["query.jpg", "support.jpg", "support.png"]
    for name in os.listdir(tmp_path):
        os.remove(tmp_path / name)
    made = _script(str(tmp_path / "new"))  # a new folder is made
    assert made.returncode == 0 and sorted(os.listdir(tmp_path / "new")) == ["query.jpg", "support.jpg", "support.png"]
    missing = _script(str(tmp_path / "nope" / "deeper"))
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0
    assert "does not exist" in missing.stderr and "nope" in missing.stderr
    blocked = tmp_path / "blocked"
    (blocked / "support.jpg").mkdir(parents=True)  # imwrite cannot write a file where a folder is
    failed = _script(str(blocked))
    assert failed.returncode == 1 and failed.stderr.strip().count("\n") == 0, failed.stderr
    assert "cannot write" in failed.stderr and "support.jpg" in failed.stderr


def _closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _predict_cli(tmp_path, *extra):
    files = _episode(tmp_path)
    return subprocess.run(
        [sys.executable, "-m", "fssam.cli", "predict", "--support", files["support.jpg"], "--support-mask",
         files["support.png"], "--query", files["query.jpg"], "--out", str(tmp_path / "out.png"), *extra],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_predict_url_server_down_is_one_line(tmp_path, protocol):
    port = _closed_port()
    result = _predict_cli(tmp_path, "--url", f"127.0.0.1:{port}", "--protocol", protocol)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("fssam predict: error: cannot reach the Triton server")
    assert f"127.0.0.1:{port}" in lines[0] and f"({protocol})" in lines[0]
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("extra,flag", [(["--num-refine", "2"], "--num-refine"),
                                        (["--checkpoint", "x.pth"], "--checkpoint"),
                                        (["--refine-version", "v2"], "--refine-version"),
                                        (["--scma-mode", "official"], "--scma-mode")])
def test_predict_url_refuses_model_options_before_connecting(tmp_path, capsys, monkeypatch, extra, flag):
    import fssam.serving.client as client

    def no_connection(*args, **kwargs):
        raise AssertionError("connected although the options must be refused first")

    monkeypatch.setattr(client, "RemoteFSSAM", no_connection)
    files = _episode(tmp_path)
    code = main(["predict", "--support", files["support.jpg"], "--support-mask", files["support.png"],
                 "--query", files["query.jpg"], "--out", str(tmp_path / "out.png"),
                 "--url", f"127.0.0.1:{_closed_port()}", *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err
    assert flag in lines[0] and "cannot be used with --url" in lines[0] and "fixed when it is exported" in lines[0]
