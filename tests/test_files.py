"""Destinations: only complete fssam outputs are replaced; signals and killed runs leave nothing; umask kept."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fssam.errors import InputError
from fssam.export import ExportError, export, load_manifest
from fssam.files import OWNER, partial_folder, remove_leftovers, replace_folder
from fssam.serving.repository import MARKER, write_repository


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _snapshot(folder):
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


def _copy_export(tiny_artifacts, dest):
    shutil.copytree(tiny_artifacts[0], dest)
    return str(dest)


def test_export_refuses_an_empty_manifest_and_a_user_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError) as info:
        export("tiny", out=str(out), progress=False)
    message = str(info.value)
    assert str(out) in message and "not an fssam export folder" in message and "refusing" in message
    assert _snapshot(out) == {"manifest.json": b"{}", "notes.txt": b"mine"}
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_export_refuses_a_valid_export_with_an_extra_user_file(tiny_artifacts, tmp_path):
    out = _copy_export(tiny_artifacts, tmp_path / "out")
    with open(os.path.join(out, "results.csv"), "w") as handle:
        handle.write("precious")
    before = _snapshot(out)
    with pytest.raises(ExportError, match=r"not an fssam export folder: it also holds results\.csv") as info:
        export("tiny", out=out, progress=False)
    assert out in str(info.value)
    assert _snapshot(out) == before
    os.makedirs(os.path.join(out, "mine"))  # a user folder (even empty) is not the export's either
    os.remove(os.path.join(out, "results.csv"))
    with pytest.raises(ExportError, match="it also holds mine"):
        export("tiny", out=out, progress=False)


def test_export_refuses_a_tampered_export(tiny_artifacts, tmp_path):
    out = _copy_export(tiny_artifacts, tmp_path / "out")
    with open(os.path.join(out, "prior.onnx"), "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ExportError, match="does not match its sha256"):
        export("tiny", out=out, progress=False)


def test_reexport_replaces_its_own_export_keeps_umask_and_removes_leftovers(tiny_artifacts, tmp_path, umask_022):
    out = _copy_export(tiny_artifacts, tmp_path / "out")
    old = load_manifest(out)
    leftover = tmp_path / ".out.partial-abcd1234"  # a SIGKILLed run's folder: onnx files and its owner file
    leftover.mkdir()
    (leftover / "prior.onnx").write_bytes(b"x")
    (leftover / OWNER).write_text("999999999\n")
    # lean (the graphs only): faster, and the stage files of the export it replaces must go with it
    manifest = export("tiny", out=out, progress=False, seed=1, stages=False)
    assert sorted(os.listdir(out)) == ["manifest.json", "query_segmenter.onnx", "support_encoder.onnx"]
    assert load_manifest(out)["weights"]["source"] == "random-init seed 1" != old["weights"]["source"]
    assert manifest["weights"]["source"] == "random-init seed 1"
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert os.stat(out).st_mode & 0o777 == 0o755
    assert OWNER not in os.listdir(out)


def _repository(tiny_artifacts, out):
    return write_repository(tiny_artifacts[0], str(out))


def test_repository_refuses_a_bogus_marker_and_a_user_file(tiny_artifacts, tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"format": "something-else"}))
    (out / "model.py").write_text("mine")
    before = _snapshot(out)
    with pytest.raises(InputError, match="not an fssam model repository") as info:
        _repository(tiny_artifacts, out)
    assert str(out) in str(info.value)
    assert _snapshot(out) == before
    (out / MARKER).write_text("{}")
    with pytest.raises(InputError, match="not an fssam model repository"):
        _repository(tiny_artifacts, out)
    assert (out / "model.py").read_text() == "mine"


def test_repository_replaces_only_its_own_repository(tiny_artifacts, tmp_path):
    out = tmp_path / "repo"
    _repository(tiny_artifacts, out)
    _repository(tiny_artifacts, out)  # its own: replaced
    (out / "my_model").mkdir()
    (out / "my_model" / "config.pbtxt").write_text("mine")
    with pytest.raises(InputError, match="it also holds my_model"):
        _repository(tiny_artifacts, out)
    assert (out / "my_model" / "config.pbtxt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["repo"]


def test_repository_refuses_a_user_file_inside_one_of_its_model_folders(tiny_artifacts, tmp_path):
    """The marker lists every file the repository wrote: a file (or version folder) someone added inside
    a model folder is not the repository's, so a re-run refuses instead of deleting it. Python's bytecode
    cache beside a model.py (a server that ran it without PYTHONDONTWRITEBYTECODE) is replaced."""
    out = tmp_path / "repo"
    description = _repository(tiny_artifacts, out)
    assert "support_encoder/1/model.py" in description["files"] and MARKER not in description["files"]
    cache = out / "support_encoder" / "1" / "__pycache__"
    cache.mkdir()
    (cache / "model.cpython-311.pyc").write_bytes(b"bytecode")
    _repository(tiny_artifacts, out)  # replaced, the cache with it
    assert not cache.exists()
    (out / "fssam" / "9").mkdir()
    (out / "fssam" / "9" / "user.txt").write_text("mine")
    before = _snapshot(out)
    with pytest.raises(InputError, match=r"it also holds fssam/9, "):
        _repository(tiny_artifacts, out)
    assert _snapshot(out) == before
    marker = json.loads((out / MARKER).read_text())
    del marker["files"]  # an older fssam's marker: it cannot say what it wrote, so nothing is deleted
    os.remove(out / "fssam" / "9" / "user.txt")
    (out / MARKER).write_text(json.dumps(marker))
    with pytest.raises(InputError, match="does not list the files it wrote"):
        _repository(tiny_artifacts, out)


def test_repository_keeps_the_umask(tiny_artifacts, tmp_path):
    previous = os.umask(0o027)
    try:
        _repository(tiny_artifacts, tmp_path / "repo")
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "repo").st_mode & 0o777 == 0o750


def test_leftovers_removed_only_when_ours(tiny_artifacts, tmp_path):
    ours_marker = tmp_path / ".repo.partial-aaaa1111"
    ours_marker.mkdir()
    (ours_marker / MARKER).write_text("{}")
    ours_empty = tmp_path / ".repo.partial-bbbb2222"
    ours_empty.mkdir()
    foreign = tmp_path / ".repo.partial-cccc3333"  # right name, but not recognisably ours
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    other_name = tmp_path / ".repo2.partial-dddd4444"
    other_name.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / ".repo.partial-eeee5555"  # a run that is still writing
        live.mkdir()
        (live / OWNER).write_text(f"{sleeper.pid}\n")
        _repository(tiny_artifacts, tmp_path / "repo")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(os.listdir(tmp_path)) == sorted(["repo", foreign.name, other_name.name, live.name])
    assert (foreign / "thesis.tex").read_text() == "mine"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signal_inside_partial_folder_removes_it_and_exits(tmp_path, signum):
    out = str(tmp_path / "out")
    before = signal.getsignal(signum)
    with pytest.raises(SystemExit) as info:
        with partial_folder(out) as tmp:
            open(os.path.join(tmp, "half.onnx"), "w").close()
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises before this ends
    assert info.value.code == 128 + signum
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signum) == before


@pytest.fixture
def python_sigint():
    """SIGINT as Python sets it up in a process started with SIGINT at its default: KeyboardInterrupt.
    A process started with SIGINT ignored keeps ignoring it (Python does not install its handler, and
    partial_folder takes over only that handler): a background job of a non-interactive shell
    (`pytest ... &` in a script, a parallel run) starts so. The tests that send themselves SIGINT set
    Python's handler first, and restore what was there."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_ignored_sigint_stays_ignored(tmp_path):
    """Where the process was started with SIGINT ignored (see python_sigint), partial_folder leaves it
    ignored: a SIGINT then stops nothing, and the work completes."""
    out = str(tmp_path / "out")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with partial_folder(out) as tmp:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            open(os.path.join(tmp, "done.onnx"), "w").close()
            os.kill(os.getpid(), signal.SIGINT)
            replace_folder(tmp, out)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["done.onnx"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda signum: signal.Signals(signum).name)
def test_signal_swallowed_by_a_callback_still_stops_the_work(tmp_path, python_sigint, signum):
    """Python ignores an exception raised in a garbage-collection or weakref callback: a signal
    handled there must still stop the work before anything replaces `out`."""
    out = str(tmp_path / "out")
    expected = KeyboardInterrupt if signum == signal.SIGINT else SystemExit
    with pytest.raises(expected):
        with partial_folder(out) as tmp:
            open(os.path.join(tmp, "done.onnx"), "w").close()
            try:  # stands in for the callback that swallows the handler's exception
                os.kill(os.getpid(), signum)
                time.sleep(5)
            except (SystemExit, KeyboardInterrupt):
                pass
            replace_folder(tmp, out)
    assert os.listdir(tmp_path) == []


def test_sigterm_of_a_running_export_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "fssam.cli", "export", "--config", "tiny", "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and process.poll() is None:
            partial = [name for name in os.listdir(tmp_path) if name.startswith(".out.partial-")]
            if partial and any(name.endswith(".onnx") for name in os.listdir(tmp_path / partial[0])):
                break
            time.sleep(0.2)
        assert process.poll() is None, process.stderr.read()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert os.listdir(tmp_path) == []


def test_remove_leftovers_ignores_other_names(tmp_path):
    (tmp_path / ".out.partial-notmkdtemp-name").mkdir()
    (tmp_path / "out.partial-abcd1234").mkdir()
    assert remove_leftovers(str(tmp_path / "out")) == []
    assert len(os.listdir(tmp_path)) == 2


def test_output_files_and_folders_replace_only_their_own(tmp_path):
    from fssam.files import check_output_file, check_output_folder, json_with

    owned = json_with("format", "fssam-test/1")
    ours, theirs = tmp_path / "ours.json", tmp_path / "theirs.json"
    ours.write_text(json.dumps({"format": "fssam-test/1"}))
    theirs.write_text(json.dumps({"format": "something else"}))
    assert check_output_file(str(ours), owned, "--out") == str(ours)
    assert check_output_file(str(tmp_path / "new.json"), owned, "--out") == str(tmp_path / "new.json")
    for path, message in ((theirs, "is not a file fssam wrote"), (tmp_path, "is a folder"),
                          (tmp_path / "missing" / "x.json", "does not exist")):
        with pytest.raises(InputError, match=message):
            check_output_file(str(path), owned, "--out")
    run = tmp_path / "run"
    run.mkdir()
    check_output_folder(str(run), "results.json", owned, "--out")  # empty
    (run / "artifacts-1shot").mkdir()
    check_output_folder(str(run), "results.json", owned, "--out", (r"artifacts-\d+shot",))  # a killed run's
    (run / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds files fssam did not write"):
        check_output_folder(str(run), "results.json", owned, "--out", (r"artifacts-\d+shot",))
    (run / "results.json").write_text(json.dumps({"format": "fssam-test/1"}))
    check_output_folder(str(run), "results.json", owned, "--out")  # its own run
    with pytest.raises(InputError, match="is a file"):
        check_output_folder(str(ours), "results.json", owned, "--out")
    # a new folder under missing parents (as README's `--out out/deploy` on a fresh clone): mkdir -p
    nested = tmp_path / "out" / "deep" / "deploy"
    assert check_output_folder(str(nested), "results.json", owned, "--out") == str(nested)
    assert (tmp_path / "out" / "deep").is_dir() and not nested.exists()
    with pytest.raises(InputError, match="a file is in the way"):
        check_output_folder(str(ours / "deploy"), "results.json", owned, "--out")


def test_export_style_outputs_make_missing_parents(tmp_path, tiny_artifacts):
    """export and repository make the missing parents of `--out` (mkdir -p), then the output."""
    from fssam.serving.repository import write_repository

    out = tmp_path / "repos" / "tiny" / "repo"
    write_repository(tiny_artifacts[0], str(out))
    assert (out / "fssam" / "config.pbtxt").is_file()
    assert sorted(os.listdir(out.parent)) == ["repo"]  # no partial folder left beside it


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_the_move_waits_for_it(tmp_path, monkeypatch, signum):
    """A signal that arrives while replace_folder moves the old output away and the new one in is
    taken once the move is complete: `out` is the whole new output, no backup is left."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_rename = os.rename
    sent = []

    def rename(src, dst):
        if not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)  # between the two renames
        real_rename(src, dst)

    expected = KeyboardInterrupt if signum == signal.SIGINT else SystemExit
    with pytest.raises(expected):
        with partial_folder(str(out)) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").close()
            monkeypatch.setattr(os, "rename", rename)
            replace_folder(tmp, str(out))
    monkeypatch.undo()
    assert sent and sorted(os.listdir(out)) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_backup_left_by_a_killed_move_is_removed_when_ours(tmp_path):
    ours = tmp_path / ".out.old-abcd1234" / "previous"
    ours.mkdir(parents=True)
    (ours / "manifest.json").write_text("{}")
    foreign = tmp_path / ".out.old-zzzz9999" / "previous"
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("mine")
    removed = remove_leftovers(str(tmp_path / "out"), markers=("manifest.json",))
    assert removed == [str(tmp_path / ".out.old-abcd1234")]
    assert (foreign / "thesis.tex").read_text() == "mine"
