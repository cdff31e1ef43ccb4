"""`dclip demo`: start the gradio demo of `spaces_demo/app.py` (the same app a Hugging Face Space runs)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

# The demo is a Space folder at the top of the repository, next to the package, so that it can be uploaded as is.
_DEFAULT_APP = Path(__file__).resolve().parents[2] / "spaces_demo" / "app.py"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="Start the gradio demo: text-to-image search, caption ranking, zero-shot labels, teacher regions.",
    )
    parser.add_argument("--model", default=None, help="student folder or Hub id (default: newest `dclip run` output)")
    parser.add_argument("--teacher", default=None, help="teacher folder or Hub id, for the region view")
    parser.add_argument("--runs-dir", action="append", default=None, help="where to look for `dclip run` outputs")
    parser.add_argument("--gallery", default=None, metavar="DIR", help="a folder of images to add to the gallery")
    parser.add_argument("--no-sample-photos", action="store_true", help="leave the packages' sample photos out")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--app", default=str(_DEFAULT_APP), help="the app file (default: spaces_demo/app.py)")
    parser.set_defaults(func=run)


def app_arguments(args: argparse.Namespace) -> list[str]:
    """The command line of `spaces_demo/app.py` for these `dclip demo` arguments."""
    argv = ["--host", args.host, "--port", str(args.port)]
    for option in ("model", "teacher", "gallery"):
        if getattr(args, option):
            argv += [f"--{option}", getattr(args, option)]
    for runs_dir in args.runs_dir or []:
        argv += ["--runs-dir", runs_dir]
    if args.no_sample_photos:
        argv.append("--no-sample-photos")
    return argv


def run(args: argparse.Namespace) -> int:
    app = Path(args.app)
    if not app.is_file():
        print(
            f"dclip demo: {app} not found; the demo ships in the repository's spaces_demo/ folder (pass --app PATH)",
            file=sys.stderr,
        )
        return 2
    # A child process: the app imports its sibling modules from its own folder, as it does in a Space.
    return subprocess.call([sys.executable, str(app), *app_arguments(args)])
