"""What every sub-command shares: the one set of model options, and `run`, which turns an fssam
error into one line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import signal
import sys

from fssam.errors import FSSAMError

MODEL_FLAGS = ("--config", "--checkpoint", "--seed", "--num-refine", "--refine-version", "--scma-mode")
OVERRIDE_FLAGS = MODEL_FLAGS[3:]  # config overrides: commands that cannot pass them on leave them out


def _integer(text: str, low: int, high: int | None, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"{text}: expected {expected}")
    return value


def at_least(minimum: int):
    """argparse type: an integer >= `minimum` (argparse turns the error into one usage line)."""

    def parse(text: str) -> int:
        return _integer(text, minimum, None, f"an integer >= {minimum}")

    parse.__name__ = f"integer >= {minimum}"
    return parse


def port(text: str) -> int:
    """argparse type: a TCP port, 0 (a free one) to 65535."""
    return _integer(text, 0, 65535, "a port number 0..65535")


def seed_type(expected: str = "a seed, 0 <= seed < 2**63"):
    """argparse type: a seed torch's generator takes, 0 <= seed < 2**63 (a larger one would be a
    traceback from torch.manual_seed, a negative one is not a seed this project records); `expected`
    words the error."""

    def parse(text: str) -> int:
        return _integer(text, 0, 2**63 - 1, expected)

    parse.__name__ = "seed"
    return parse


seed = seed_type()  # the model's --seed, compare's --episode-seed


def positive_seconds(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds > 0") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: expected seconds > 0")
    return value


def shot_list(text: str) -> list[int]:
    """argparse type: a comma list of shot counts >= 1, e.g. 1,5."""
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items or not all(item.isdigit() and int(item) >= 1 for item in items):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of shot counts >= 1, e.g. 1,5")
    return [int(item) for item in items]


def add_model_options(parser) -> None:
    """The model options of every command that builds or exports a model (a parser or an argument group)."""
    parser.add_argument("--config", default="small", help="tiny | small (paper default) | base_plus | large")
    parser.add_argument(
        "--checkpoint",
        action="append",
        help="official FSSAM training file, or SAM 2 and DINOv2 files (repeat the flag); "
        "without it the model is a seeded random init and says so",
    )
    parser.add_argument("--seed", type=seed, default=0, help="seed of the random init when no checkpoint covers a part")
    parser.add_argument("--num-refine", type=int, default=None, help="IMR rounds (default: the config's; 3 for small, base_plus, large)")
    parser.add_argument("--refine-version", default=None, help="v1 (official default) or v2")
    parser.add_argument("--scma-mode", default=None, help="official (default; the released 5-shot code) or paper "
                        "(every shot calibrates); identical at 1 shot")


def model_options(args) -> dict:
    """The model options (but --config) as keywords of `fssam.model.build` / `fssam.export.export`."""
    options = dict(checkpoint=args.checkpoint, seed=args.seed)
    for name in ("num_refine", "refine_version", "scma_mode"):
        if hasattr(args, name):
            options[name] = getattr(args, name)
    return options


def install_sigterm() -> None:
    """SIGTERM stops a long command as Ctrl-C does (its clean-up runs)."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run(args) -> int:
    """Run a parsed command: an fssam error is one line on stderr and exit status 1."""
    try:
        return args.func(args)
    except FSSAMError as error:
        if _stop_in_chain(error) is None:
            print(f"fssam {args.command}: error: {error}", file=sys.stderr)
            return 1
        return _stopped(args, _stop_in_chain(error))
    except KeyboardInterrupt:
        print(f"fssam {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        # a signal that arrived inside an import or a library call can come back wrapped (e.g. an
        # extension module's ImportError "initialization failed" caused by it): still that signal
        stop = _stop_in_chain(error)
        if stop is None:
            raise
        return _stopped(args, stop)


def _stopped(args, stop: BaseException) -> int:
    if isinstance(stop, KeyboardInterrupt):
        print(f"fssam {args.command}: interrupted", file=sys.stderr)
        return 130
    raise stop from None  # SystemExit(128 + signal) of fssam.files


def _stop_in_chain(error: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or SystemExit (a signal's exit) among the causes / contexts of `error`."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            return error
        error = error.__cause__ or error.__context__
    return None
