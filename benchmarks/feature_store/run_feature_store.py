"""Feature store: the cost of a second pass (a store hit) per feature kind, against the first pass (computing).

    python benchmarks/feature_store/run_feature_store.py --images 256 --output benchmarks/feature_store/results.json

On synthetic scenes (128 px, 2-4 objects each, 2 captions each) with the embedded towers (EfficientNet-Lite0 +
all-MiniLM-L6-v2, the `dclip run` default), a fresh store in a temporary folder, every kind the pipeline stores is
computed once and then asked for again through a fresh `FeatureStore` object on the same folder, as a later stage or
a later run does. Wall times side by side in one run; the ratio second / first is the cost of a hit, which includes
fingerprinting the inputs (hashing the images' bytes, the model's weights).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from modeling_dclip import EMBEDDED_TEXT, EMBEDDED_VISION, DCLIPModel, DCLIPProcessor, DCLIPTeacherModel
from modeling_dclip.data.captions import caption_pairs
from modeling_dclip.data.synthetic import make_synthetic_dataset
from modeling_dclip.feature_store import DatasetBoxes, FeatureStore
from modeling_dclip.regions import GridRegionExtractor


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/feature_store/results.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    scenes = make_synthetic_dataset(args.images, seed=0, split="train", image_size=128)
    captions = caption_pairs(scenes)
    model = DCLIPModel.from_vision_text_pretrained(EMBEDDED_VISION, EMBEDDED_TEXT, projection_dim=256).eval()
    processor = DCLIPProcessor.from_vision_text_pretrained(EMBEDDED_VISION, EMBEDDED_TEXT)
    processor.image_processor.size = {"shortest_edge": 128}
    processor.image_processor.crop_size = {"height": 128, "width": 128}
    teacher = DCLIPTeacherModel.from_backbone(model, fusion_dim=64, num_attention_heads=2, intermediate_size=128)
    processor.region_config = DatasetBoxes().to_dict()
    kinds = {
        "image_tower_features": lambda store: store.image_tower_features(model, processor, scenes),
        "text_tower_features": lambda store: store.text_tower_features(model, processor, captions.captions),
        "image_embeddings": lambda store: store.image_embeddings(model, processor, scenes),
        "text_embeddings": lambda store: store.text_embeddings(model, processor, captions.captions),
        "region_boxes (grid 2x2+3x3)": lambda store: store.region_boxes(scenes, GridRegionExtractor(scales=(2, 3))),
        "region_features (dataset boxes)": lambda store: store.region_features(
            teacher, processor, scenes, DatasetBoxes()
        ),
        "text_token_features": lambda store: store.text_token_features(teacher, processor, captions.captions),
        "teacher_targets": lambda store: store.teacher_targets(
            teacher, processor, scenes, captions.captions, captions.caption_to_image
        ),
    }
    results = {"images": args.images, "captions": len(captions.captions), "threads": args.threads, "kinds": {}}
    with tempfile.TemporaryDirectory() as root:
        for name, compute in kinds.items():
            first, _ = timed(lambda compute=compute: compute(FeatureStore(root)))
            second, _ = timed(lambda compute=compute: compute(FeatureStore(root)))
            results["kinds"][name] = {
                "first_s": round(first, 3),
                "second_s": round(second, 3),
                "second_over_first": round(second / first, 4),
            }
            print(name, results["kinds"][name], flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
