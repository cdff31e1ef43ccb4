"""`dclip run` (default preset) wall time before and after a change, side by side in one run.

    python benchmarks/dclip_run_compare/run_compare.py --before 822f427 --after HEAD --repeats 2 \
        --output benchmarks/dclip_run_compare/results.json

Checks out both commits as git worktrees under `--work-dir`, then runs `python -m modeling_dclip.cli run` from each,
alternating (before, after, before, after, ...), each into a fresh output folder with a fresh feature store and
`datasets` cache, so every run computes everything; reports each wall time and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--work-dir", default="outputs/dclip_run_compare")
    parser.add_argument("--output", default="benchmarks/dclip_run_compare/results.json")
    args = parser.parse_args()
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    trees = {}
    for side in ("before", "after"):
        tree = work / side
        if tree.exists():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=False)
        commit = subprocess.run(["git", "rev-parse", getattr(args, side)], capture_output=True, text=True, check=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit.stdout.strip()], check=True)
        trees[side] = (tree, commit.stdout.strip())
    walls: dict[str, list[float]] = {"before": [], "after": []}
    for repeat in range(args.repeats):
        for side, (tree, _) in trees.items():
            out, store = work / f"{side}-run{repeat}", work / f"{side}-store{repeat}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(store, ignore_errors=True)
            # A fresh feature store (after) and datasets cache (where the before side cached its regions) per run.
            env = {
                **os.environ,
                "PYTHONPATH": str(tree),
                "DCLIP_FEATURE_STORE": str(store),
                "HF_DATASETS_CACHE": str(store / "datasets"),
            }
            command = [
                sys.executable,
                "-m",
                "modeling_dclip.cli",
                "run",
                "--preset",
                args.preset,
                "--output-dir",
                str(out),
            ]
            started = time.perf_counter()
            subprocess.run(command, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            walls[side].append(round(time.perf_counter() - started, 1))
            print(side, repeat, walls[side][-1], flush=True)
    results = {
        "command": " ".join(["python", *sys.argv]),
        "commits": {side: commit for side, (_, commit) in trees.items()},
        "wall_s": walls,
        "median_s": {side: statistics.median(values) for side, values in walls.items()},
    }
    results["after_over_before"] = round(results["median_s"]["after"] / results["median_s"]["before"], 3)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    for tree, _ in trees.values():
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=False)


if __name__ == "__main__":
    main()
