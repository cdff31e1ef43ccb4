"""One protocol's seeds, run by separate commands (`run_benchmark.py --seeds 0`, then `--seeds 1 2` on another
machine or in another session), merged into one `results.json` with the mean ± sample std over all of them.

    python benchmarks/real_photos/merge_seeds.py benchmarks/real_photos/v2.1/all-seed0/results.json \
        outputs/v2.1-all-seeds12/results.json --results-dir benchmarks/real_photos/v2.1/all

A merge is what one command with every seed would have written only where the runs are the same procedure in the
same environment, so it is refused, naming the file, unless: the budget, image size, learning rates, splits and
CIFAR-10 images are the same in every file; every stage of every file ran in one environment (the same releases,
CPU, kernels and threads; only the operating system's kernel build may differ); the models trained once per
protocol (the base and the teacher, with seed 0 whatever `--seeds` said) have the same figures in every file (to
`--atol`: retrained from scratch in the same environment, they do); and no seed of a fine-tuned model is in two
files. `--allow-other-environments` lifts the one-environment condition alone: the merged file then names each
environment with the stages that ran in it (so does `results.md`). Ablations are not merged (they run at the first
seed of one command): a file holding them is refused.

Writes `results.json`, `results.md` and `retention_vs_recall.png` into `--results-dir` with `run_benchmark.py`'s
own writer; `sources` names each file with its command, seeds and stage seconds. `timings_s` holds every stage's
recorded seconds, a stage that several files ran (the base, the teacher, their evaluations) with the first file's.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from run_benchmark import ONCE_MODELS, environment_changes, load_results, mean_std, write_results

SAME_SETTINGS = ("learning_rates", "splits", "cifar_images")
IGNORED = ("platform",)
"""Environment entries that do not decide a figure (the operating system's kernel build)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="run_benchmark.py results.json files, seeds disjoint")
    parser.add_argument("--results-dir", type=Path, required=True, help="where the merged results are written")
    parser.add_argument(
        "--atol", type=float, default=1e-6, help="how far the once-trained models' figures may differ between files"
    )
    parser.add_argument(
        "--allow-other-environments",
        action="store_true",
        help="merge stages that ran in other environments (each written down with its stages) instead of refusing",
    )
    return parser.parse_args(argv)


def merge_protocol(
    name: str, found: dict[Path, dict[str, Any]], atol: float, other_environments: bool = False
) -> dict[str, Any]:
    """One protocol's entries of every file, merged; `SystemExit` naming the file where they cannot be."""
    for path, entry in found.items():
        if "environments" not in entry or any("runs" not in figure for figure in entry["models"]["base"].values()):
            raise SystemExit(
                f"merge_seeds: {path} holds no per-seed figures or stage environments for protocol {name!r} "
                "(written before v2.1): it cannot be merged"
            )
    (first_path, first), *_ = found.items()
    reference = first["environments"][0]["environment"]
    for path, entry in found.items():
        if entry.get("ablations"):
            raise SystemExit(f"merge_seeds: {path} holds ablations of protocol {name!r}, which are not merged")
        for setting in SAME_SETTINGS:
            if entry[setting] != first[setting]:
                raise SystemExit(
                    f"merge_seeds: protocol {name!r}: {setting} {entry[setting]} in {path}, "
                    f"{first[setting]} in {first_path}"
                )
        for group in entry["environments"]:
            differ = environment_changes(reference, group["environment"], IGNORED)
            if differ and not other_environments:
                raise SystemExit(
                    f"merge_seeds: protocol {name!r}: stages of {path} ran in another environment than those of "
                    f"{first_path} (they differ in {', '.join(differ)}); the same seed trains other figures there "
                    "(--allow-other-environments merges them all the same, each stage's environment written down)"
                )
    runs: dict[str, dict[str, dict[str, float]]] = {}  # label -> metric -> seed -> figure
    kept: dict[str, dict[str, float]] = {}  # label -> seed -> retention
    owner: dict[tuple[str, str], Path] = {}  # (label, seed) -> the file it was taken from
    for path, entry in found.items():
        for label, metrics in entry["models"].items():
            seeds = next(iter(metrics.values()))["runs"]
            for seed in seeds:
                earlier = owner.setdefault((label, seed), path)
                if earlier != path and label not in ONCE_MODELS:
                    raise SystemExit(
                        f"merge_seeds: protocol {name!r}: seed {seed} of {label!r} is in both {earlier} and {path}; "
                        "merge files of disjoint seeds"
                    )
            for metric, figure in metrics.items():
                for seed, value in figure["runs"].items():
                    taken = runs.setdefault(label, {}).setdefault(metric, {}).setdefault(seed, value)
                    if abs(taken - value) > atol:
                        raise SystemExit(
                            f"merge_seeds: protocol {name!r}: the {label}'s {metric} is {value} in {path} and "
                            f"{taken} in {owner[label, seed]}; trained once, it must be the same model in every file"
                        )
        for label, retention in entry["zeroshot_retention"].items():
            for seed, value in retention["runs"].items():
                kept.setdefault(label, {}).setdefault(seed, value)
    timings: dict[str, float] = {}
    for entry in found.values():
        for stage, seconds in entry["timings_s"].items():
            timings.setdefault(stage, seconds)
    environments: list[dict[str, Any]] = []  # each environment once, with every stage any file ran in it
    for entry in found.values():
        for group in entry["environments"]:
            same = next((known for known in environments if known["environment"] == group["environment"]), None)
            if same is None:
                environments.append({"environment": group["environment"], "stages": list(group["stages"])})
            else:
                same["stages"] += [stage for stage in group["stages"] if stage not in same["stages"]]
    return {
        "models": {
            label: {metric: mean_std(_by_seed(values)) for metric, values in metrics.items()}
            for label, metrics in runs.items()
        },
        "zeroshot_retention": {label: mean_std(_by_seed(values)) for label, values in kept.items()},
        **{setting: first[setting] for setting in SAME_SETTINGS},
        "timings_s": timings,
        "environments": environments,
    }


def _by_seed(values: dict[str, float]) -> dict[int, float]:
    return {int(seed): values[seed] for seed in sorted(values, key=int)}


def merge(paths: list[Path], atol: float = 1e-6, other_environments: bool = False) -> dict[str, Any]:
    files = {path: load_results(path, "merge_seeds") for path in paths}
    if len(files) < 2:
        raise SystemExit("merge_seeds: give two results.json files or more")
    (first_path, first), *_ = files.items()
    for path, found in files.items():
        for setting in ("budget", "image_size"):
            if found[setting] != first[setting]:
                raise SystemExit(f"merge_seeds: {setting} of {path} differs from {first_path}'s")
    protocols = [name for name in first["protocols"] if all(name in found["protocols"] for found in files.values())]
    if not protocols:
        raise SystemExit(f"merge_seeds: no protocol is in every one of {', '.join(map(str, paths))}")
    seeds = sorted({seed for found in files.values() for seed in found["seeds"]})
    return {
        "command": "merged by benchmarks/real_photos/merge_seeds.py from: "
        + "; ".join(f"{path} ({found['command']})" for path, found in files.items()),
        "budget": first["budget"],
        "image_size": first["image_size"],
        "seeds": seeds,
        "environment": first.get("environment"),
        "sources": [
            {"path": str(path), "command": found["command"], "seeds": found["seeds"], "timings_s": _timings(found)}
            for path, found in files.items()
        ],
        "protocols": {
            name: merge_protocol(
                name, {path: found["protocols"][name] for path, found in files.items()}, atol, other_environments
            )
            for name in protocols
        },
    }


def _timings(found: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {name: entry["timings_s"] for name, entry in found["protocols"].items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    merged = merge(args.results, args.atol, args.allow_other_environments)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_results(merged, args.results_dir)
    for name, entry in merged["protocols"].items():
        seeds = {seed for metrics in entry["models"].values() for figure in metrics.values() for seed in figure["runs"]}
        print(f"merge_seeds: protocol {name!r}, seeds {', '.join(sorted(seeds, key=int))} -> {args.results_dir}")


if __name__ == "__main__":
    main()
