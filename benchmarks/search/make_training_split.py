"""Write the Karpathy split file the re-ranking benchmark trains its student and teacher from.

Flickr8k's official splits, cut to what trains in ~20 min on a 2-core CPU: `pretrain` (the base's alignment data,
so that the base has not memorised the teacher's and the student's pairs), `train`, `val` (the student's best epoch)
and a small `test` (only for `dclip run`'s own evaluation; the benchmark itself scores the full official test split
from the original file). Photos are taken in file order; the rest are marked `unused`.

    python benchmarks/search/make_training_split.py ../shared/data/flickr8k/dataset_flickr8k.json OUT.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SIZES = {"pretrain": 1000, "train": 2000, "val": 200, "test": 100}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="dataset_flickr8k.json (Karpathy split)")
    parser.add_argument("output", help="the derived split file")
    args = parser.parse_args()
    document = json.loads(Path(args.source).read_text())
    counts = dict.fromkeys(SIZES, 0)
    for entry in document["images"]:
        split = entry["split"]
        wanted = ("pretrain" if counts["pretrain"] < SIZES["pretrain"] else "train") if split == "train" else split
        if wanted in counts and counts[wanted] < SIZES[wanted]:
            counts[wanted] += 1
            entry["split"] = wanted
        else:
            entry["split"] = "unused"
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(document))
    print(counts)


if __name__ == "__main__":
    main()
