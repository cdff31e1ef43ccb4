"""`dclip card --run DIR`: write the model card (`README.md`) of every model folder of a `dclip run` output, of a
folder of single-stage trainer outputs, or of one model folder, from their own records."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "card",
        help="Write README.md model cards into model folders, from the run's results.json and each folder's records.",
    )
    parser.add_argument(
        "--run",
        required=True,
        metavar="DIR",
        help="a `dclip run` output (holds results.json), a folder of model folders, or one model folder",
    )
    parser.add_argument(
        "--repo-id",
        action="append",
        default=[],
        metavar="ROLE=ORG/NAME",
        help="Hub id a model will be pushed to, shown in its usage snippet (repeatable, e.g. student=me/dclip-student)",
    )
    parser.add_argument(
        "--base-model",
        action="append",
        default=None,
        metavar="HUB_ID",
        help="base_model metadata (repeatable); defaults to the Hub ids the run's records trace the model to",
    )
    parser.add_argument("--license", default="apache-2.0", help="Hub license id (default: apache-2.0)")
    parser.add_argument(
        "--template-dir", default=None, help="folder of student.md / teacher.md (default: the package's templates)"
    )
    parser.set_defaults(func=run)


def _parse_repo_ids(pairs: list[str]) -> dict[str, str]:
    repo_ids = {}
    for pair in pairs:
        role, separator, repo_id = pair.partition("=")
        if not separator or not role or not repo_id:
            raise SystemExit(f"dclip card: --repo-id expects ROLE=ORG/NAME, got {pair!r}")
        repo_ids[role] = repo_id
    return repo_ids


def run(args: argparse.Namespace) -> int:
    import sys

    from ..publishing.cards import write_model_cards

    try:
        written = write_model_cards(
            args.run,
            repo_ids=_parse_repo_ids(args.repo_id),
            base_models=args.base_model,
            license=args.license,
            template_dir=args.template_dir,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"dclip card: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0
