"""`fssam eval` on a tiny synthetic PASCAL-5i fold: eager vs ONNX on the same episodes, mask agreement,
result JSON, clear errors for missing data, mismatched artifacts and unavailable backends."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fssam import eval as evaluation
from fssam.commands import eval as eval_command
from fssam.data import load_fold, sample_episodes
from fssam.errors import ConfigError, DataError, FSSAMError

from conftest import H, W  # noqa: E402,F401  the synthetic PASCAL fold (conftest.pascal)

EPISODES = 10


@pytest.fixture(scope="module")
def artifacts(tiny_artifacts):
    return tiny_artifacts[0]  # the session's tiny 1-shot fp32 export (conftest)


def parse(*argv):
    parser = argparse.ArgumentParser(prog="fssam")
    eval_command.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def eval_args(pascal, out, *extra):
    root, lists = pascal
    return parse("--dataset", "pascal", "--root", root, "--list-root", lists, "--fold", "0", "--shots", "1",
                 "--config", "tiny", "--episodes", str(EPISODES), "--out", str(out), "--no-progress", *extra)


@pytest.fixture(scope="module")
def runs(pascal, artifacts, tmp_path_factory):
    """Eager with saved masks, then ONNX compared with it."""
    folder = tmp_path_factory.mktemp("runs")
    eager, onnx = folder / "eager.json", folder / "onnx.json"
    assert eval_command.handle(eval_args(pascal, eager, "--backend", "eager", "--device", "cpu", "--save-masks", str(folder))) == 0
    assert eval_command.handle(eval_args(pascal, onnx, "--backend", "onnx", "--artifacts", artifacts,
                                         "--save-masks", str(folder), "--compare-with", str(eager))) == 0
    return json.loads(eager.read_text()), json.loads(onnx.read_text()), folder


def _specs(result):
    return [(e["index"], e["query"], e["class"], e["supports"]) for e in result["per_episode"]]


def test_eager_and_onnx_run_the_official_episodes(runs, pascal):
    eager, onnx, _ = runs
    root, lists = pascal
    expected = sample_episodes(load_fold("pascal", root, lists, 0), shot=1, episodes=EPISODES, seed=321, workers=32)
    as_listed = [
        (s.index, os.path.relpath(s.query[0], root), s.class_id, [os.path.relpath(p[0], root) for p in s.supports])
        for s in expected
    ]
    assert _specs(eager) == _specs(onnx) == as_listed
    assert eager["episodes_sha256"] == onnx["episodes_sha256"]
    assert len({e[2] for e in as_listed}) > 1  # several classes drawn


def test_masks_agree_between_eager_and_onnx(runs):
    eager, onnx, folder = runs
    agreement = onnx["agreement"]
    assert agreement["other_backend"] == "eager" and agreement["episodes"] == EPISODES
    assert agreement["mask_iou"]["min"] >= 0.999, agreement["mask_iou"]["worst"]
    assert len(agreement["mask_iou"]["per_episode"]) == EPISODES
    assert agreement["identical_fraction"] >= 0.9
    assert abs(agreement["miou_delta"]) < 1e-3
    # the saved masks round-trip and match the hashes in the JSON
    masks, fingerprint = evaluation.load_masks(eager["masks_file"])
    assert fingerprint == eager["episodes_sha256"] and len(masks) == EPISODES
    for mask, entry in zip(masks, eager["per_episode"]):
        assert list(mask.shape) == entry["size"] == [H, W]
        assert evaluation.mask_digest(mask) == entry["mask_sha256"] and int(mask.sum()) == entry["foreground"]


def test_result_json_is_well_formed(runs, artifacts):
    eager, onnx, _ = runs
    for result, backend in ((eager, "eager"), (onnx, "onnx")):
        assert result["format"] == "fssam-eval/1" and result["backend"] == backend
        assert (result["dataset"], result["fold"], result["shots"], result["seed"]) == ("pascal", 0, 1, 321)
        assert result["episodes"] == EPISODES == len(result["per_episode"])
        assert result["config"]["name"] == "tiny" and result["config"]["image_size"] == 64
        assert result["random_init"] is True and "RANDOM-INIT" in result["weights"]
        assert sorted(result["classes"]) == ["1", "2", "3", "4", "5"]
        assert result["classes"]["1"]["name"] == "aeroplane"
        assert sum(c["episodes"] for c in result["classes"].values()) == EPISODES
        assert 0 <= result["miou"] <= 1 and 0 <= result["fbiou"] <= 1
        # the figures follow from the per-episode counts (official class-wise mIoU and FB-IoU)
        inter = np.sum([e["intersection"] for e in result["per_episode"]], axis=0)
        union = np.sum([e["union"] for e in result["per_episode"]], axis=0)
        assert result["fbiou"] == pytest.approx(float(np.mean(inter / (union + 1e-10))))
        class_iou = []
        for c in range(1, 6):
            if not result["classes"][str(c)]["episodes"]:  # not drawn in these episodes: no IoU, not in mIoU
                assert result["classes"][str(c)]["iou"] is None
                continue
            ci = sum(e["intersection"][1] for e in result["per_episode"] if e["class"] == c)
            cu = sum(e["union"][1] for e in result["per_episode"] if e["class"] == c)
            class_iou.append(ci / (cu + 1e-10))
            assert result["classes"][str(c)]["iou"] == pytest.approx(class_iou[-1])
        assert result["miou"] == pytest.approx(float(np.mean(class_iou)))
    assert onnx["backend_details"]["artifacts"] == os.path.abspath(artifacts)
    assert "onnx artifacts" in onnx["weights"]


def test_compare_without_saved_masks_uses_hashes(runs, pascal, tmp_path):
    eager, _, folder = runs
    plain = dict(eager, masks_file=None)
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    out = tmp_path / "again.json"
    assert eval_command.handle(eval_args(pascal, out, "--compare-with", str(tmp_path / "plain.json"))) == 0
    agreement = json.loads(out.read_text())["agreement"]
    assert agreement["mask_iou"] is None and "--save-masks" in agreement["note"]
    assert agreement["identical_fraction"] == 1.0  # eager twice: bit-identical


def test_compare_with_other_episodes_is_refused(runs, pascal, tmp_path):
    _, _, folder = runs
    with pytest.raises(DataError, match="other episodes.*seed 321 vs 5"):
        eval_command.handle(eval_args(pascal, tmp_path / "x.json", "--episode-seed", "5", "--compare-with",
                                      str(folder / "eager.json")))
    with pytest.raises(DataError, match="not found"):
        eval_command.handle(eval_args(pascal, tmp_path / "x.json", "--compare-with", str(tmp_path / "none.json")))


def test_missing_root_and_lists_name_the_path(pascal, tmp_path, monkeypatch):
    root, lists = pascal
    missing = str(tmp_path / "VOC2012")
    args = parse("--dataset", "pascal", "--root", missing, "--list-root", lists, "--config", "tiny")
    with pytest.raises(DataError, match=f"data root not found: {missing}"):
        eval_command.handle(args)
    args = parse("--dataset", "pascal", "--root", root, "--list-root", str(tmp_path / "lists"), "--config", "tiny")
    with pytest.raises(DataError, match=str(tmp_path / "lists")):
        eval_command.handle(args)
    monkeypatch.chdir(tmp_path)  # default list root: lists/pascal under the current folder
    with pytest.raises(DataError, match="list root not found: lists/pascal"):
        eval_command.handle(parse("--dataset", "pascal", "--root", root, "--config", "tiny"))
    with pytest.raises(DataError, match="sub_class_file_list_1.txt|data_list_1.txt"):
        eval_command.handle(parse("--dataset", "pascal", "--root", root, "--list-root", lists, "--fold", "1"))


def test_artifacts_must_match_the_request(pascal, artifacts, tmp_path):
    out = tmp_path / "x.json"
    with pytest.raises(ConfigError, match="1-shot.*--shots 2"):
        eval_command.handle(eval_args(pascal, out, "--backend", "onnx", "--artifacts", artifacts, "--shots", "2"))
    with pytest.raises(ConfigError, match="config 'tiny' but --config small"):
        eval_command.handle(eval_args(pascal, out, "--backend", "onnx", "--artifacts", artifacts, "--config", "small"))
    with pytest.raises(ConfigError, match="--scma-mode: eager only"):
        eval_command.handle(eval_args(pascal, out, "--backend", "onnx", "--artifacts", artifacts,
                                      "--scma-mode", "official"))
    with pytest.raises(ConfigError, match="needs --artifacts"):
        eval_command.handle(eval_args(pascal, out, "--backend", "onnx"))
    with pytest.raises(FSSAMError, match="manifest.json"):
        eval_command.handle(eval_args(pascal, out, "--backend", "onnx", "--artifacts", str(tmp_path)))


def test_tensorrt_without_gpu_says_so(pascal, artifacts, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(FSSAMError, match="CUDA"):
        eval_command.handle(eval_args(pascal, tmp_path / "x.json", "--backend", "tensorrt", "--artifacts", artifacts))


def test_triton_backend_needs_the_client(pascal, tmp_path, monkeypatch):
    """Without tritonclient the triton backend is one error naming what is missing (the backend
    through a real server: tests/test_serving.py)."""
    monkeypatch.setitem(sys.modules, "fssam.serving.client", None)  # not importable
    with pytest.raises(ConfigError, match="predict_remote"):
        eval_command.handle(eval_args(pascal, tmp_path / "t.json", "--backend", "triton", "--url", "localhost:8000"))


def test_cli_end_to_end_and_one_line_errors(pascal, tmp_path):
    root, lists = pascal
    out = tmp_path / "cli.json"
    base = [sys.executable, "-m", "fssam.cli", "eval", "--dataset", "pascal", "--list-root", lists, "--fold", "0",
            "--shots", "1", "--backend", "eager", "--config", "tiny", "--episodes", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([*base, "--root", root, "--out", str(out), "--save-masks", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "mIoU" in done.stdout and "aeroplane" in done.stdout and "RANDOM-INIT" in done.stderr
    assert "backend eager fp32 on cpu, config tiny" in done.stdout  # the summary names the precision
    result = json.loads(out.read_text())
    assert result["episodes"] == 3 and os.path.isfile(result["masks_file"])
    done = subprocess.run([*base, "--root", str(tmp_path / "nowhere"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"fssam eval: error: data root not found: {tmp_path / 'nowhere'}"]


def test_openvino_backend_runs_the_same_episodes_and_agrees(runs, pascal, artifacts, tmp_path):
    eager, _, folder = runs
    out = tmp_path / "openvino.json"
    assert eval_command.handle(eval_args(pascal, out, "--backend", "openvino", "--precision", "fp32",
                                         "--artifacts", artifacts, "--compare-with", str(folder / "eager.json"))) == 0
    result = json.loads(out.read_text())
    assert result["backend"] == "openvino" and result["backend_details"]["runtime"] == "OpenVINO fp32"
    assert result["episodes_sha256"] == eager["episodes_sha256"]
    assert result["agreement"]["mask_iou"]["min"] >= 0.999
    with pytest.raises(ConfigError, match="--precision is for"):
        eval_command.handle(eval_args(pascal, out, "--backend", "triton", "--url", "localhost:8000",
                                      "--precision", "bf16"))


def test_eager_bf16_runs_and_is_recorded(runs, pascal, tmp_path):
    eager, _, folder = runs
    assert eager["backend_details"]["precision"] == "fp32"  # the default
    out = tmp_path / "bf16.json"
    assert eval_command.handle(eval_args(pascal, out, "--backend", "eager", "--device", "cpu", "--precision", "bf16",
                                         "--compare-with", str(folder / "eager.json"))) == 0
    result = json.loads(out.read_text())
    assert result["backend"] == "eager" and result["backend_details"]["precision"] == "bf16"
    assert result["episodes"] == EPISODES and result["episodes_sha256"] == eager["episodes_sha256"]
    assert 0 <= result["miou"] <= 1
    # the random-init tiny model's logits sit near the threshold, so bf16 rounding flips many pixels (~0.74
    # agree); fp32 would agree on every pixel (1.0), so this also fails an eval that recorded bf16 but ran fp32
    agreement = result["agreement"]["mask_iou"]["pixel_agreement_mean"]
    assert 0.6 <= agreement < 0.99


def test_eager_and_triton_precisions_are_checked(pascal, tmp_path):
    out = tmp_path / "x.json"
    with pytest.raises(ConfigError, match="--precision is for .* not triton"):
        eval_command.handle(eval_args(pascal, out, "--backend", "triton", "--url", "localhost:8000",
                                      "--precision", "bf16"))
    with pytest.raises(ConfigError, match="--device is for .* not triton"):
        eval_command.handle(eval_args(pascal, out, "--backend", "triton", "--url", "localhost:8000",
                                      "--device", "cuda"))
    with pytest.raises(ConfigError, match="'fp16' for eager PyTorch: expected one of fp32, bf16"):
        eval_command.handle(eval_args(pascal, out, "--backend", "eager", "--precision", "fp16"))
    assert not out.exists()


def test_default_scma_mode_is_official():
    from fssam.model import get_config

    assert get_config("tiny").scma_mode == "official"


# ---------------------------------------------------------------- --save-masks, classes without episodes, errors


def _no_backend(monkeypatch):
    """Any model work fails the test: the checks must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the run started before the arguments were checked")

    monkeypatch.setattr(evaluation, "make_backend", refuse)


def test_save_masks_replaces_only_its_own_file(pascal, tmp_path, monkeypatch):
    """The masks path is checked before the run, as --out: a user's file or a folder of that name, or a
    folder eval cannot write, is one ConfigError naming it; a re-run over its own npz is allowed."""
    out = tmp_path / "r.json"
    assert eval_command.handle(eval_args(pascal, out, "--episodes", "3", "--save-masks", str(tmp_path))) == 0
    mine = tmp_path / "r_masks.npz"
    assert evaluation.load_masks(str(mine))[1] == json.loads(out.read_text())["episodes_sha256"]
    assert eval_command.handle(eval_args(pascal, out, "--episodes", "3", "--save-masks", str(tmp_path))) == 0
    assert sorted(os.listdir(tmp_path)) == ["r.json", "r_masks.npz"]  # replaced, no temporary file left
    _no_backend(monkeypatch)
    users = tmp_path / "user"
    users.mkdir()
    (users / "r_masks.npz").write_bytes(b"my own data")
    with pytest.raises(ConfigError, match=f"--save-masks '{users}/r_masks.npz' exists and is not a file fssam wrote"):
        eval_command.handle(eval_args(pascal, out, "--save-masks", str(users)))
    np.savez(users / "x_masks.npz", bits=np.zeros(3, np.uint8))  # an npz, but not one eval wrote
    with pytest.raises(ConfigError, match="x_masks.npz' exists and is not a file fssam wrote"):
        eval_command.handle(eval_args(pascal, tmp_path / "x.json", "--save-masks", str(users)))
    assert (users / "r_masks.npz").read_bytes() == b"my own data"
    (tmp_path / "dirs" / "r_masks.npz").mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"--save-masks '{tmp_path}/dirs/r_masks.npz' is a folder"):
        eval_command.handle(eval_args(pascal, out, "--save-masks", str(tmp_path / "dirs")))
    assert os.listdir(tmp_path / "dirs") == ["r_masks.npz"]


def test_save_masks_refuses_an_unwritable_folder(pascal, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: let os.access answer as it does for a user
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
            not (mode & os.W_OK and os.path.abspath(path) == str(locked))) and real(path, mode, **kw))
    _no_backend(monkeypatch)
    try:
        with pytest.raises(ConfigError, match=f"'{locked}/r_masks.npz': folder '{locked}' is not writable"):
            eval_command.handle(eval_args(pascal, tmp_path / "r.json", "--save-masks", str(locked)))
    finally:
        locked.chmod(0o755)
    assert os.listdir(locked) == [] and not (tmp_path / "r.json").exists()


def test_masks_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """An interrupted write (Ctrl-C; SIGTERM is turned into it) leaves no temporary file and no half
    npz; a finished one carries the format entry the --save-masks check reads."""
    from fssam.eval import agreement

    masks = [np.ones((4, 6), np.uint8), np.zeros((3, 5), np.uint8)]
    result = {"per_episode": [{"index": 0}, {"index": 1}], "episodes_sha256": "abc"}

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(agreement.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluation.save_masks(str(tmp_path), "r", masks, result)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    path = evaluation.save_masks(str(tmp_path), "r", masks, result)
    assert os.listdir(tmp_path) == ["r_masks.npz"] and agreement.is_masks_file(path)
    loaded, fingerprint = evaluation.load_masks(path)
    assert fingerprint == "abc" and [m.tolist() for m in loaded] == [m.tolist() for m in masks]


def test_classes_without_episodes_have_no_iou(pascal, tmp_path, capsys):
    """3 episodes draw class 1 only: the other classes have no IoU (null, "-"), mIoU is class 1's,
    a note says so; FB-IoU is over all episodes as before; --compare-with takes the nulls."""
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert eval_command.handle(eval_args(pascal, first, "--episodes", "3")) == 0
    printed = capsys.readouterr()
    result = json.loads(first.read_text())
    classes = result["classes"]
    assert [classes[c]["episodes"] for c in "12345"] == [3, 0, 0, 0, 0]
    assert [classes[c]["iou"] for c in "2345"] == [None] * 4
    assert result["miou"] == pytest.approx(classes["1"]["iou"]) and result["miou"] > 0
    inter = np.sum([e["intersection"] for e in result["per_episode"]], axis=0)
    union = np.sum([e["union"] for e in result["per_episode"]], axis=0)
    assert result["fbiou"] == pytest.approx(float(np.mean(inter / (union + 1e-10))))
    rows = {line.split()[1]: line.split()[-1] for line in printed.out.splitlines()[1:6]}
    assert rows["aeroplane"] == f"{100 * classes['1']['iou']:.2f}" and rows["bottle"] == "-"
    assert f"mIoU {100 * classes['1']['iou']:.2f} " in printed.out
    notes = [line for line in printed.err.splitlines() if "no episodes" in line]
    assert len(notes) == 1 and "2 bicycle, 3 bird, 4 boat, 5 bottle" in notes[0] and "mIoU covers only" in notes[0]
    assert eval_command.handle(eval_args(pascal, second, "--episodes", "3", "--compare-with", str(first))) == 0
    assert json.loads(second.read_text())["agreement"]["class_iou_delta_max"] == 0.0
    # a result written before (a class without episodes as IoU 0) still compares, over the measured classes
    old = dict(result, classes={c: dict(v, iou=v["iou"] or 0.0) for c, v in classes.items()})
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert eval_command.handle(eval_args(pascal, second, "--episodes", "3", "--compare-with",
                                         str(tmp_path / "old.json"))) == 0
    assert json.loads(second.read_text())["agreement"]["class_iou_delta_max"] == 0.0


def test_foreign_list_prefix_names_the_cli_flag(pascal, tmp_path):
    """Lists written with another prefix: the error names the flag that fixes it, and that flag does."""
    root, lists = pascal
    moved = tmp_path / "lists"
    shutil.copytree(lists, moved)
    for name in ("data_list_0.txt", "sub_class_file_list_0.txt"):
        listed = moved / "fss_list" / "val" / name
        listed.write_text(listed.read_text().replace("../data/VOCdevkit2012/VOC2012/", "voc2012/"))
    with pytest.raises(DataError, match="does not start with '../data/VOCdevkit2012/VOC2012/': give the prefix "
                                        "the list uses with --list-prefix PREFIX"):
        eval_command.handle(eval_args(pascal, tmp_path / "r.json", "--list-root", str(moved)))
    assert eval_command.handle(eval_args(pascal, tmp_path / "r.json", "--list-root", str(moved), "--episodes", "3",
                                         "--list-prefix", "voc2012")) == 0


@pytest.mark.parametrize("seed", [str(2**64), str(2**63), "-1"])
def test_episode_seed_out_of_range_is_one_line_at_parsing(seed, capsys):
    with pytest.raises(SystemExit) as stop:
        parse("--dataset", "pascal", "--root", "r", "--episode-seed", seed)
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fssam eval: error: argument --episode-seed: {seed}: "
        "expected a whole number 0 <= seed < 2**63")
    assert parse("--dataset", "pascal", "--root", "r", "--episode-seed", str(2**63 - 1)).episode_seed == 2**63 - 1
