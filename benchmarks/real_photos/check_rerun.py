"""The issue's check of the real-photo benchmark: a re-run of some seeds against the recorded figures.

    python benchmarks/real_photos/check_rerun.py benchmarks/real_photos/v2.1/results.json \
        outputs/rerun-seed1/results.json --output outputs/rerun-seed1/check.md

Both files are `run_benchmark.py`'s `results.json`: the recorded one (three seeds) and a re-run's (the recorded
command with `--seeds 1`, say, from a fresh install). For every model, seed and figure of the re-run that the record
also holds, it gives the recorded figure of the same seed, the re-run's, and the recorded mean ± sample std over
seeds; a figure is **within** when it differs from the recorded mean by at most the recorded std (plus `--atol`, for
sums taken in another order). Models trained once per protocol (the base, the teacher; n = 1, std 0) are within only
when equal to the recorded run. With three seeds one of them can lie further from their mean than their std, so an
exact reproduction of that seed fails this test: the report also counts the figures equal to the recorded seed's
own (to `--atol`) and gives the largest difference from it. It also names the environment entries (releases, CPU,
threads) in which the two runs differ: the same code and seed train other figures in another environment.

Prints a Markdown report (also written to `--output`; `--json` writes every compared figure) and exits 1 when a
figure is outside, 0 when all are within.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from run_benchmark import environment_changes, load_results

from modeling_dclip.atomic import write_json_atomically, write_text_atomically

FIGURES = ("text_to_image_R@1", "image_to_text_R@1", "text_to_image_R@10", "image_to_text_R@10", "cifar10_top1")
SHORT = {"text_to_image": "t2i", "image_to_text": "i2t", "cifar10_top1": "CIFAR-10 top-1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recorded", type=Path, help="the recorded results.json (e.g. benchmarks/real_photos/v2.1)")
    parser.add_argument("rerun", type=Path, help="the re-run's results.json")
    parser.add_argument("--protocol", action="append", help="protocols to compare (default: every one both hold)")
    parser.add_argument("--figures", nargs="+", default=list(FIGURES), help="the figures compared, by key")
    parser.add_argument(
        "--atol", type=float, default=1e-6, help="added to the recorded std (float sums in another order)"
    )
    parser.add_argument("--output", type=Path, help="also write the Markdown report here")
    parser.add_argument("--json", type=Path, help="write every compared figure here as JSON")
    return parser.parse_args(argv)


def label(figure: str) -> str:
    for long, short in SHORT.items():
        figure = figure.replace(long, short)
    return figure.replace("_", " ")


def environment_differences(recorded: dict[str, Any], rerun: dict[str, Any]) -> dict[str, list] | None:
    """The entries of the two commands' recorded environments that differ, `{key: [recorded, rerun]}`; None when
    either run did not record its environment (results made before it was)."""
    if "environment" not in recorded or "environment" not in rerun:
        return None
    return environment_changes(recorded["environment"], rerun["environment"])


def compare(recorded: dict[str, Any], rerun: dict[str, Any], figures: list[str], atol: float) -> list[dict[str, Any]]:
    """Every figure of the re-run's models and seeds that the record holds, beside the record (one protocol)."""
    rows = []
    for model, found in rerun["models"].items():
        if model not in recorded["models"]:
            continue
        for figure in figures:
            if figure not in found or figure not in recorded["models"][model]:
                continue
            record = recorded["models"][model][figure]
            if "runs" not in found[figure]:
                raise SystemExit(
                    "check_rerun: the re-run's results.json has no per-seed figures (`runs`): made by a"
                    " run_benchmark.py older than this script; run the command again (it reuses every stage)"
                )
            for seed, value in found[figure]["runs"].items():
                same_seed = record.get("runs", {}).get(seed)  # absent in records made before `runs` existed
                rows.append(
                    {
                        "model": model,
                        "seed": int(seed),
                        "figure": figure,
                        "recorded_seed": same_seed,
                        "rerun": value,
                        "mean": record["mean"],
                        "std": record["std"],
                        "n": record["n"],
                        "within": abs(value - record["mean"]) <= record["std"] + atol,
                        "equal_to_recorded_seed": same_seed is not None and abs(value - same_seed) <= atol,
                    }
                )
    return rows


def report(protocols: dict[str, list[dict[str, Any]]], differences: dict[str, list] | None, figures: list[str]) -> str:
    lines = ["# Re-run against the record", ""]
    if differences is None:
        lines += ["Environment: not recorded by one of the runs.", ""]
    elif differences:
        changed = "; ".join(f"{key} {was!r} → {now!r}" for key, (was, now) in differences.items())
        lines += [f"Environment: the runs differ in {changed}.", ""]
    else:
        lines += ["Environment: the same in both runs.", ""]
    for protocol, rows in protocols.items():
        lines += [
            f"## Protocol `{protocol}`: recorded seed / re-run / recorded mean ± std, %; ✗ outside the recorded std",
            "",
            "| model | seed | " + " | ".join(label(figure) for figure in figures) + " |",
            "|---|---|" + "---|" * len(figures),
        ]
        cells: dict[tuple[str, int], dict[str, str]] = {}
        for row in rows:
            seed = "–" if row["recorded_seed"] is None else f"{100 * row['recorded_seed']:.1f}"
            spread = "(one run)" if row["n"] == 1 else f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}"
            mark = "" if row["within"] else " ✗"
            cells.setdefault((row["model"], row["seed"]), {})[row["figure"]] = (
                f"{seed} / {100 * row['rerun']:.1f} / {spread}{mark}"
            )
        for (model, seed), found in cells.items():
            lines.append(f"| {model} | {seed} | " + " | ".join(found.get(figure, "–") for figure in figures) + " |")
        outside = [row for row in rows if not row["within"]]
        lines += ["", f"{len(outside)} of {len(rows)} figures outside the recorded std."]
        same_seed = [row for row in rows if row["recorded_seed"] is not None]
        if same_seed:
            worst = max(same_seed, key=lambda row: abs(row["rerun"] - row["recorded_seed"]))
            gap = 100 * abs(worst["rerun"] - worst["recorded_seed"])
            equal = sum(row["equal_to_recorded_seed"] for row in same_seed)
            lines.append(
                f"Largest difference from the recorded seed: {gap:.2f} points "
                f"({worst['model']}, seed {worst['seed']}, {label(worst['figure'])}); "
                f"{equal} of {len(same_seed)} figures equal to the recorded seed's (to --atol)."
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recorded, rerun = (load_results(path, "check_rerun") for path in (args.recorded, args.rerun))
    names = args.protocol or [name for name in rerun["protocols"] if name in recorded["protocols"]]
    for name in names:
        for results, path in ((recorded, args.recorded), (rerun, args.rerun)):
            if name not in results["protocols"]:
                raise SystemExit(
                    f"check_rerun: {path} holds no protocol {name!r} (it has {list(results['protocols'])})"
                )
    if not names:
        raise SystemExit(f"check_rerun: {args.recorded} and {args.rerun} share no protocol")
    protocols = {
        name: compare(recorded["protocols"][name], rerun["protocols"][name], args.figures, args.atol) for name in names
    }
    differences = environment_differences(recorded, rerun)
    text = report(protocols, differences, args.figures)
    print(text)
    if args.output:
        write_text_atomically(args.output, text)
    if args.json:
        write_json_atomically(args.json, {"protocols": protocols, "environment_differences": differences})
    return 1 if any(not row["within"] for rows in protocols.values() for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
