"""`dclip card --run DIR`: write the model card (`README.md`) of every model folder of a `dclip run` output."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "card",
        help="Write README.md model cards into the model folders of a `dclip run` output, from its results.json.",
    )
    parser.add_argument("--run", required=True, metavar="DIR", help="output folder of `dclip run` (holds results.json)")
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
        help="base_model metadata (repeatable); defaults to the towers named in the run config",
    )
    parser.add_argument("--license", default="apache-2.0", help="Hub license id (default: apache-2.0)")
    parser.add_argument(
        "--template-dir", default=None, help="folder of student.md / teacher.md (default: model_cards/)"
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
    from ..publishing.cards import write_model_cards

    for path in write_model_cards(
        args.run,
        repo_ids=_parse_repo_ids(args.repo_id),
        base_models=args.base_model,
        license=args.license,
        template_dir=args.template_dir,
    ):
        print(f"wrote {path}")
    return 0
