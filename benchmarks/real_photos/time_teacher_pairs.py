"""What scoring every (caption, photo) pair with the benchmark's teacher would cost, against the re-ranking it does.

    python benchmarks/real_photos/time_teacher_pairs.py --data ../shared/data/flickr8k \
        --teacher outputs/real_photos/disjoint/teacher

Fuses `--steps` batches of 4,096 random (photo, caption) pairs of the test split (region features and token states
read from the feature store, as the evaluation does) and prints the median seconds per batch, and what that makes
for the full 1,000 x 5,000 grid and for the re-ranker's 20 x (5,000 + 1,000) shortlist pairs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from modeling_dclip.data.captions import caption_pairs
from modeling_dclip.data.spec import load_dataset_spec
from modeling_dclip.encoding import teacher_pair_scores
from modeling_dclip.feature_store import FeatureStore, region_source_from_config
from modeling_dclip.loading import load_model_and_processor

PAIRS_PER_STEP = 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=20)
    args = parser.parse_args()
    teacher, processor = load_model_and_processor(args.teacher, device="cpu")
    test = load_dataset_spec(args.data).filter(lambda split: split == "test", input_columns="split")
    store = FeatureStore()
    regions = store.region_features(teacher, processor, test, region_source_from_config(processor.region_config))
    captions = caption_pairs(test).captions
    texts = store.text_token_features(teacher, processor, captions)
    generator = torch.Generator().manual_seed(0)
    seconds = []
    for _ in range(args.steps):
        images = torch.randint(len(test), (PAIRS_PER_STEP,), generator=generator)
        rows = torch.randint(len(captions), (PAIRS_PER_STEP,), generator=generator)
        started = time.perf_counter()
        teacher_pair_scores(teacher, regions, texts, images, rows, PAIRS_PER_STEP)
        seconds.append(time.perf_counter() - started)
    per_step = statistics.median(seconds)
    grid, shortlist = len(test) * len(captions), args.top_k * (len(test) + len(captions))
    print(
        json.dumps(
            {
                "seconds_per_4096_pairs": round(per_step, 3),
                "threads": torch.get_num_threads(),
                "full_grid_pairs": grid,
                "full_grid_minutes": round(grid / PAIRS_PER_STEP * per_step / 60, 1),
                "shortlist_pairs": shortlist,
                "shortlist_seconds": round(shortlist / PAIRS_PER_STEP * per_step, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
