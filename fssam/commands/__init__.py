"""The `fssam` sub-commands: one module per command, each with `register(subparsers)` (its argparse
definition) and `handle(args)` (its handler). `fssam.commands.common` holds what they share: the
model options and the one error wrapper. Only fssam.cli imports this package."""

COMMANDS = ("predict", "export", "compare", "repository", "serve", "deploy", "eval", "bench")  # `fssam --help` order
