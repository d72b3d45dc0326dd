"""Writing outputs so that nothing half-written is ever left at the destination, and nothing of the
user's is ever replaced.

- `check_replaceable`: a destination folder is replaced only when it is a complete earlier output
  of the same command (the caller says which files and folders that output owns).
- `partial_folder`: the `.<name>.partial-*` temporary folder beside the destination; it is removed
  on success, on error, on Ctrl-C, SIGTERM and SIGHUP (the process then exits 128 + signal), and a
  leftover one of a killed run is removed by the next run for the same destination.
- `replace_folder`: the finished folder moved into place, with the user's umask as its mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from typing import Callable, Iterator

from fssam.errors import InputError

OWNER = ".fssam-partial"  # in a partial folder while it is written: the pid of the writing process
CLEANUP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_MAX_LISTED = 5
_MKDTEMP_SUFFIX = r"[a-z0-9_]{8}"  # tempfile's random names


def check_output_file(path: str, owned: Callable[[str], bool], what: str) -> str:
    """Before the work: `path` may be written. Its folder exists and is writable, it is not a
    folder, and it is new or a file fssam wrote (`owned`): a command replaces only its own files,
    never an input or a user's file. Returns the absolute path; InputError otherwise."""
    absolute = os.path.abspath(path)
    folder = os.path.dirname(absolute)
    if not os.path.isdir(folder):
        raise InputError(f"{what} {path!r}: folder {folder!r} does not exist")
    if os.path.isdir(absolute):
        raise InputError(f"{what} {path!r} is a folder: give a file name")
    if os.path.lexists(absolute) and not owned(absolute):
        raise InputError(f"{what} {path!r} exists and is not a file fssam wrote: choose another name, or move it away")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{what} {path!r}: folder {folder!r} is not writable")
    return absolute


def make_parents(absolute: str, what: str, given: str) -> None:
    """The missing parent folders of a new output folder (`mkdir -p`); a parent that is a file is
    one InputError."""
    parent = os.path.dirname(absolute)
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"{what} {given!r}: {parent!r} cannot be made: a file is in the way") from None
    except PermissionError:
        raise InputError(f"{what} {given!r}: folder {parent!r} cannot be made: permission denied") from None


def check_output_folder(folder: str, marker: str, owned: Callable[[str], bool], what: str,
                        leftovers: tuple[str, ...] = ()) -> str:
    """Before the work: `folder` may be written into. It is new (missing parent folders are made,
    as `mkdir -p`), empty, a folder this command wrote (its `marker` file passes `owned`), or holds
    only what an interrupted run of the command leaves (names matching a `leftovers` pattern).
    Returns the absolute path."""
    absolute = os.path.abspath(folder)
    if not os.path.lexists(absolute):
        make_parents(absolute, what, folder)
        return absolute
    if not os.path.isdir(absolute):
        raise InputError(f"{what} {folder!r} is a file: give a folder")
    entries = os.listdir(absolute)
    if os.path.isfile(os.path.join(absolute, marker)) and owned(os.path.join(absolute, marker)):
        return absolute
    if all(any(re.fullmatch(pattern, entry) for pattern in leftovers) for entry in entries):
        return absolute
    raise InputError(f"{what} {folder!r} holds files fssam did not write there: choose a new folder")


def json_with(key: str, value, *older) -> Callable[[str], bool]:
    """`owned` test for check_output_file: a JSON object whose `key` is `value` or one of `older`
    (fssam's format tags)."""

    def owned(path: str) -> bool:
        try:
            with open(path) as handle:
                data = json.load(handle)
        except (OSError, ValueError, UnicodeDecodeError):
            return False
        return isinstance(data, dict) and data.get(key) in (value, *older)

    return owned


@contextlib.contextmanager
def whole_file(path: str, mode: str = "w") -> Iterator:
    """A handle on a temporary file beside `path`, renamed over it when the block ends without an
    error, removed otherwise (an interrupted write leaves the earlier file, or none, never half a
    file)."""
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        with open(tmp, mode) as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    """Write `path` whole or not at all (whole_file)."""
    with whole_file(path) as handle:
        handle.write(text)


def write_json(path: str, data, indent: int = 2) -> None:
    """`data` as JSON at `path`, written whole or not at all (write_text)."""
    write_text(path, json.dumps(data, indent=indent) + "\n")


def read_json(path: str, format: str) -> dict:
    """The JSON object in `path` whose "format" key is `format` (one of fssam's own files: export
    manifest, repository marker, eval result). ValueError with the reason otherwise."""
    if not os.path.isfile(path):
        raise ValueError("not found")
    try:
        with open(path) as handle:
            document = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not readable JSON: {error}") from None
    if not isinstance(document, dict) or document.get("format") != format:
        raise ValueError(f"not an {format} file")
    return document


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")


def relative_paths(value) -> bool:
    """Whether `value` is what written_files returns: a list of relative paths inside the folder."""
    return isinstance(value, list) and all(isinstance(f, str) and f and not os.path.isabs(f)
                                           and ".." not in f.split(os.sep) for f in value)


def written_files(folder: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """The relative paths of every file under `folder` (a finished output, still in its temporary
    folder), but `exclude` and the run's owner file, and of its empty folders (ending in "/"): what the
    output's description lists as its own, so that a later run replaces exactly those and refuses
    anything someone added."""
    found = []
    for root, dirs, names in os.walk(folder):
        for name in names:
            rel = os.path.normpath(os.path.relpath(os.path.join(root, name), folder))
            if rel not in exclude and rel != OWNER:
                found.append(rel)
        if not dirs and not names and root != folder:  # an empty folder it made (a model version folder)
            found.append(os.path.relpath(root, folder) + "/")
    return sorted(found)


def _bytecode_cache(path: str) -> bool:
    """A __pycache__ folder holding only .pyc files: what Python writes beside the model.py files of
    a repository a server ran (Triton's Python stub writes it whatever PYTHONDONTWRITEBYTECODE says);
    derived from fssam's own files."""
    if os.path.basename(path) != "__pycache__" or os.path.islink(path):
        return False
    entries = os.listdir(path)
    return all(name.endswith(".pyc") and os.path.isfile(os.path.join(path, name))
               and not os.path.islink(os.path.join(path, name)) for name in entries)


def check_replaceable(
    out: str,
    what: str,
    owned: Callable[[str], tuple[set, set]],
    error: type[Exception] = InputError,
) -> None:
    """Refuse (raise `error`, touching nothing) unless `out` is absent, an empty folder, or a complete
    earlier output. `what`: e.g. "an fssam export folder". `owned(out)` returns (files, trees): the
    relative paths of the files that output consists of and the top-level folders it owns whole; it
    raises ValueError with the reason when `out` is not such an output at all. Python's bytecode
    caches (`__pycache__` of .pyc files) in a folder of listed files count as the output's."""
    if not os.path.lexists(out):
        return
    if os.path.islink(out) or not os.path.isdir(out):
        raise error(f"{out!r} exists and is not {what} (it is {'a link' if os.path.islink(out) else 'a file'}): "
                    "refusing to replace it")
    if not os.listdir(out):
        return
    try:
        files, trees = owned(out)
    except ValueError as reason:
        raise error(f"{out!r} exists and is not {what} ({reason}): refusing to replace it; nothing in it was touched") from None
    made = {os.path.normpath(f) for f in files if f.endswith("/")}  # empty folders it made (written_files)
    files = {os.path.normpath(f) for f in files if not f.endswith("/")}
    folders = {os.path.dirname(f) for f in files} | made  # the folders listed files are in, and theirs
    for folder in list(folders):
        while folder:
            folder = os.path.dirname(folder)
            folders.add(folder)
    extra = []
    for root, dirs, names in os.walk(out):
        rel = os.path.relpath(root, out)
        walk = []
        for name in dirs:
            path = os.path.normpath(os.path.join(rel, name))
            if rel == "." and name in trees and not os.path.islink(os.path.join(root, name)):
                continue  # owned whole
            if path in folders and not os.path.islink(os.path.join(root, name)):
                walk.append(name)
            elif os.path.dirname(path) in folders and _bytecode_cache(os.path.join(root, name)):
                continue  # Python's cache of a listed model.py
            else:
                extra.append(path)  # a folder of someone else's (links are never followed)
        dirs[:] = walk
        for name in names:
            path = os.path.normpath(os.path.join(rel, name))
            if path not in files:
                extra.append(path)
    if extra:
        raise error(f"{out!r} exists and is not {what}: it also holds {_listing(sorted(extra))}, which its "
                    "description does not list: refusing to replace it; nothing in it was touched")


def umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def replace_folder(tmp: str, out: str) -> None:
    """Move a finished temporary folder to `out` (same file system), replacing an earlier one there.
    The folder gets the mode the user's umask gives new folders (mkdtemp makes them 0700). The move
    is never half-done: while it runs, SIGINT and the clean-up signals are only recorded (a signal
    mask would not do: it blocks the calling thread only, and the kernel may hand the signal to a
    worker thread of torch or ONNX Runtime, after which Python still runs the handler in the main
    thread), and a recorded one is raised once the move is complete."""
    _raise_received()  # a signal whose exception a callback swallowed: stop before anything is replaced
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(tmp, OWNER))
    os.chmod(tmp, 0o777 & ~umask())
    deferred: list[int] = []
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for number in (*CLEANUP_SIGNALS, signal.SIGINT):
            saved[number] = signal.signal(number, lambda signum, frame: deferred.append(signum))
    try:
        if os.path.exists(out):
            backup = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
            os.rename(out, os.path.join(backup, "previous"))
            os.rename(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)
    if deferred:  # the move is complete: now stop as the signal asked
        _RECEIVED.append(deferred[0])
        _raise_received()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(out: str, markers: tuple[str, ...] = ()) -> list[str]:
    """Remove `.<name>.partial-*` folders beside `out` that killed runs left: only folders named
    exactly so, and only when they look like ours (empty, or holding the owner file of a process
    that is gone, or one of `markers`); and `.<name>.old-*` folders (replace_folder's backup of the
    output it replaced, left by a run killed in the move) holding only `previous`, itself empty or
    holding one of `markers`. Returns the removed paths."""
    parent, name = os.path.dirname(out), os.path.basename(out)
    pattern = re.compile(re.escape(f".{name}.partial-") + _MKDTEMP_SUFFIX)
    backup = re.compile(re.escape(f".{name}.old-") + _MKDTEMP_SUFFIX)
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        path = os.path.join(parent, entry)
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        if backup.fullmatch(entry):
            try:
                content = os.listdir(path)
                previous = os.path.join(path, "previous")
                inner = os.listdir(previous) if content == ["previous"] and os.path.isdir(previous) else None
                if not content or (inner is not None and (not inner or any(m in inner for m in markers))):
                    shutil.rmtree(path)
                    removed.append(path)
            except OSError:
                pass
            continue
        if not pattern.fullmatch(entry):
            continue
        try:
            content = os.listdir(path)
            owner = os.path.join(path, OWNER)
            if OWNER in content:
                with open(owner) as handle:
                    text = handle.read().strip()
                if text.isdigit() and _alive(int(text)):
                    continue  # another run is writing it right now
            elif content and not any(marker in content for marker in markers):
                continue  # not recognisably ours
            shutil.rmtree(path)
            removed.append(path)
        except OSError:
            continue
    return removed


class _Signalled(SystemExit):
    """Raised in the main thread by SIGTERM / SIGHUP inside `partial_folder`: exit status 128 + signal."""


_RECEIVED: list[int] = []  # signals taken inside partial_folder: raised again where a callback swallowed them


def _raise_received() -> None:
    """The exception of a signal taken earlier in this partial_folder block, if any. Python ignores an
    exception raised inside a garbage-collection or weakref callback ("Exception ignored in ..."),
    so a signal handled there would otherwise let the work run on and finish."""
    if _RECEIVED:
        signum = _RECEIVED[0]
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise _Signalled(128 + signum)


@contextlib.contextmanager
def partial_folder(out: str, markers: tuple[str, ...] = ()) -> Iterator[str]:
    """A new temporary folder `.<name>.partial-*` beside `out` (after removing leftovers of killed
    runs). On leaving the block it is removed if still there (so after `replace_folder` nothing
    remains); SIGTERM and SIGHUP remove it too and end the process with status 128 + signal."""
    remove_leftovers(out, markers)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
    previous = {}
    try:
        with open(os.path.join(tmp, OWNER), "w") as handle:
            handle.write(f"{os.getpid()}\n")
        _RECEIVED.clear()
        if threading.current_thread() is threading.main_thread():

            def handler(signum, frame):
                _RECEIVED.append(signum)
                for number in CLEANUP_SIGNALS:  # a second signal must not interrupt the clean-up
                    signal.signal(number, signal.SIG_IGN)
                raise _Signalled(128 + signum)

            def interrupt(signum, frame):
                _RECEIVED.append(signum)
                raise KeyboardInterrupt

            for number in CLEANUP_SIGNALS:
                previous[number] = signal.signal(number, handler)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                previous[signal.SIGINT] = signal.signal(signal.SIGINT, interrupt)
        yield tmp
        _raise_received()  # the block finished although a signal came (its exception was swallowed)
    finally:
        try:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            for number, old in previous.items():
                signal.signal(number, old)
