"""`dclip push`: upload a saved model folder (with its card, code files and processor) to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="Upload a model folder to the Hub (create_repo + upload_folder); token from HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("--model-dir", required=True, metavar="DIR", help="a saved model folder, e.g. RUN/student")
    parser.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="the Hub model repository")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing; default: main)")
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.add_argument("--dry-run", action="store_true", help="check the folder and list what would be uploaded")
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also upload files matching this fnmatch pattern (repeatable; a folder name takes the whole folder); "
        "by default only the model's own files are uploaded and everything else is listed as left out",
    )
    parser.set_defaults(func=run)


def _human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _by_top_folder(files: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Files grouped by their top-level folder (`training/ (12 files)`), top-level files as they are."""
    groups: dict[str, list[int]] = {}
    for path, size in files:
        top, separator, _ = path.partition("/")
        groups.setdefault(top + separator, []).append(size)
    return [
        (name if not name.endswith("/") else f"{name} ({len(sizes)} files)", sum(sizes))
        for name, sizes in groups.items()
    ]


def run(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HFValidationError

    from ..publishing.push import ModelFolderError, push_model_folder

    try:
        result = push_model_folder(
            args.model_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            dry_run=args.dry_run,
            include=args.include,
        )
    except (ModelFolderError, HFValidationError, PermissionError) as error:
        print(f"dclip push: {error}", file=sys.stderr)
        return 2
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(result.files)} files ({_human_size(result.total_bytes)}) to {result.repo_id}:")
    for path, size in result.files:
        print(f"  {path}  {_human_size(size)}")
    if result.excluded:
        print(f"left out {len(result.excluded)} files that are not the model's (add them with --include PATTERN):")
        for path, size in _by_top_folder(result.excluded):
            print(f"  {path}  {_human_size(size)}")
    if result.commit is not None:
        print(f"commit: {result.commit.commit_url}")
    return 0
