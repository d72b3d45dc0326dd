"""The `fssam` command line: one module per sub-command in fssam.commands (register + handle), one
set of model options shared by every command that builds a model, one error wrapper (an fssam
error is one line and exit status 1), and no import of the CLI from the library."""

import argparse
import ast
import importlib
import os
import pkgutil
import subprocess
import sys

import pytest

import fssam
import fssam.commands
from fssam.cli import main, make_parser
from fssam.commands import COMMANDS
from fssam.commands.common import MODEL_FLAGS, OVERRIDE_FLAGS, run
from fssam.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fssam.__file__)))
BUILDS_A_MODEL = ("predict", "export", "eval", "bench", "deploy")
# fssam.serving.deploy.deploy takes no config overrides: deploy offers --config, --checkpoint, --seed only
WITHOUT_OVERRIDES = set()


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def _visible_flags(parser: argparse.ArgumentParser) -> dict:
    """{flag: action} of the options a user sees in --help."""
    return {flag: action for action in parser._actions if action.help is not argparse.SUPPRESS
            for flag in action.option_strings}


def test_every_command_module_is_registered_with_register_and_handle():
    modules = {name for _, name, _ in pkgutil.iter_modules(fssam.commands.__path__)}
    assert modules == {*COMMANDS, "common"}
    subparsers = _subparsers(make_parser())
    assert list(subparsers) == list(COMMANDS)
    for name in COMMANDS:
        module = importlib.import_module(f"fssam.commands.{name}")
        assert callable(module.register) and callable(module.handle), name
        assert subparsers[name].get_default("func") is module.handle, name


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: fssam {command}")


def test_commands_that_build_a_model_share_the_model_options():
    subparsers = _subparsers(make_parser())
    reference = _visible_flags(subparsers["export"])
    for name in BUILDS_A_MODEL:
        flags = _visible_flags(subparsers[name])
        expected = set(MODEL_FLAGS) - (set(OVERRIDE_FLAGS) if name in WITHOUT_OVERRIDES else set())
        assert set(flags) & {*MODEL_FLAGS, "--init-seed"} == expected, name
        for flag in expected - {"--config"}:  # --config: predict and eval default to None (see their help)
            mine, theirs = flags[flag], reference[flag]
            assert (type(mine), mine.dest, mine.type, mine.default, mine.help) == \
                   (type(theirs), theirs.dest, theirs.type, theirs.default, theirs.help), (name, flag)
    assert "--init-seed" not in _visible_flags(subparsers["eval"])


def test_eval_seed_is_the_model_seed_and_episode_seed_its_own(capsys):
    args = make_parser().parse_args(["eval", "--dataset", "pascal", "--root", "r", "--seed", "3"])
    assert (args.seed, args.episode_seed) == (3, 321)
    args = make_parser().parse_args(["eval", "--dataset", "pascal", "--root", "r", "--episode-seed", "5"])
    assert (args.seed, args.episode_seed) == (0, 5)
    args = make_parser().parse_args(["eval", "--dataset", "pascal", "--root", "r", "--init-seed", "4"])
    assert args.seed == 4 and "--init-seed is now --seed" in capsys.readouterr().err


def test_the_library_does_not_import_the_command_line():
    """No module outside fssam/commands (and fssam/cli.py) imports fssam.cli or fssam.commands."""
    offenders = []
    package = os.path.join(ROOT, "fssam")
    for folder, _, files in os.walk(package):
        relative = os.path.relpath(folder, package)
        if relative == "commands" or relative.startswith("commands" + os.sep):
            continue
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or path == os.path.join(package, "cli.py"):
                continue
            for node in ast.walk(ast.parse(open(path).read(), path)):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{os.path.relpath(path, ROOT)}: {n}" for n in names
                              if n in ("fssam.cli", "fssam.commands") or n.startswith("fssam.commands.")]
    assert offenders == []


@pytest.mark.parametrize("module", ["fssam.eval", "fssam.bench.run", "fssam.cli"])
def test_fresh_import_has_no_cycle_and_eval_no_cli(module):
    code = (f"import sys, {module}; "
            "print(sorted(m for m in sys.modules if m == 'fssam.cli' or m.startswith('fssam.commands')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    if module != "fssam.cli":
        assert done.stdout.strip() == "[]", done.stdout


@pytest.mark.parametrize("argv, message", [
    (["compare", "--artifacts", "/nonexistent"], "no manifest.json in '/nonexistent'"),
    (["eval", "--dataset", "pascal", "--root", "/nonexistent", "--config", "tiny"],
     "data root not found: /nonexistent"),
    (["predict", "--config", "nope", "--support", "s.jpg", "--support-mask", "s.png", "--query", "q.jpg",
      "--out", "o.png"], "unknown config 'nope'"),
    (["export", "--config", "nope", "--out", "{tmp}/export"], "unknown config 'nope'"),
    (["bench", "--modes", "nope", "--out", "{tmp}/bench"], "unknown bench mode(s) nope"),
])
def test_an_fssam_error_is_one_line_and_exit_status_1(argv, message, tmp_path, capsys):
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fssam {argv[0]}: error: ") and message in lines[0], captured.err
    assert not os.path.exists(tmp_path / argv[0])  # nothing written


def test_run_turns_errors_and_interrupts_into_exit_codes(capsys):
    def failing(args):
        raise ConfigError("bad input")

    def interrupted(args):
        raise KeyboardInterrupt

    assert run(argparse.Namespace(command="x", func=failing)) == 1
    assert capsys.readouterr().err == "fssam x: error: bad input\n"
    assert run(argparse.Namespace(command="x", func=interrupted)) == 130
    assert capsys.readouterr().err.strip() == "fssam x: interrupted"
    assert run(argparse.Namespace(command="x", func=lambda args: 0)) == 0


def test_a_signal_wrapped_by_a_library_still_stops_the_command(capsys):
    """SIGTERM inside `partial_folder` raises SystemExit(143) in whatever runs; an extension module's
    import turns it into ImportError("initialization failed") caused by it. `run` still exits with
    the signal's status (and Ctrl-C wrapped the same way is 130), instead of a traceback and 1."""
    import argparse

    from fssam.files import _Signalled

    def wrapped(stop):
        def func(args):
            try:
                raise stop
            except BaseException as inner:
                raise ImportError("initialization failed") from inner
        return func

    with pytest.raises(SystemExit) as exited:
        run(argparse.Namespace(command="export", func=wrapped(_Signalled(143))))
    assert exited.value.code == 143
    assert run(argparse.Namespace(command="export", func=wrapped(KeyboardInterrupt()))) == 130
    assert "interrupted" in capsys.readouterr().err
    with pytest.raises(ImportError):  # a plain error stays what it is
        run(argparse.Namespace(command="export", func=wrapped(ValueError("x"))))
