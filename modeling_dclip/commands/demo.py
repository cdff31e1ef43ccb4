"""`dclip demo`: serve the gradio demo (`modeling_dclip.demo.app`, the app the Space folder `spaces_demo/` runs)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="Start the gradio demo: text-to-image search, caption ranking, zero-shot labels, teacher regions.",
        description="Serve the demo in this process until SIGINT or SIGTERM, which close the server and free the "
        "port. The server's images are chosen here (--gallery); visitors can only upload images.",
    )
    parser.add_argument("--model", default=None, help="student folder or Hub id (default: newest `dclip run` output)")
    parser.add_argument("--teacher", default=None, help="teacher folder or Hub id, for the region view")
    parser.add_argument("--runs-dir", action="append", default=None, help="where to look for `dclip run` outputs")
    parser.add_argument(
        "--gallery", default=None, metavar="DIR", help="a folder of images on this machine added to the gallery"
    )
    parser.add_argument("--no-sample-photos", action="store_true", help="leave the packages' sample photos out")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.set_defaults(func=run)


def app_arguments(args: argparse.Namespace) -> list[str]:
    """The app's command line (`modeling_dclip.demo.app.parse_args`) for these `dclip demo` arguments."""
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
    import sys

    try:
        from ..demo.app import main
    except ImportError as error:
        print(f'dclip demo: the demo needs its extra: pip install "dclip[demo]" ({error})', file=sys.stderr)
        return 2
    # In this process, not a child: a signal to `dclip demo` reaches the server itself.
    return main(app_arguments(args))
