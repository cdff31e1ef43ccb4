"""The `dclip` command line. Each subcommand lives in `modeling_dclip/commands/<name>.py` and exposes
`register(subparsers)`, which adds its parser and sets `func` to the function that runs it."""

from __future__ import annotations

import argparse
import importlib
import sys

# Imported lazily so that `dclip --help` stays fast and one command's optional dependencies never break another.
COMMAND_MODULES = (
    "info",
    "rank",
    "run",
    "regions",
    "eval",
    "card",
    "push",
    "demo",
    "export_yolo",
    "train_detector",
    "index",
    "search",
    "export",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dclip",
        description="DCLIP (Distill CLIP): train, evaluate, publish and demo distilled CLIP models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"modeling_dclip.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
