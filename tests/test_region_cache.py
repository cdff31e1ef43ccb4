"""Cached regions: boxes through `Dataset.map` (grid, dataset boxes, an untrained YOLO built offline) reused from
their Arrow cache on a second call, and frozen-base region embeddings equal to a direct `encode_regions`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, List, Value
from PIL import Image
from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPVisionConfig

from modeling_dclip import EMBEDDED_TEXT, DCLIPConfig, DCLIPModel, DCLIPProcessor, DCLIPTeacherModel
from modeling_dclip.data.region_cache import (
    REGION_COLUMNS,
    DatasetBoxes,
    add_region_boxes,
    region_embeddings,
    regions_of_row,
)
from modeling_dclip.data.synthetic import make_synthetic_dataset
from modeling_dclip.regions import GridRegionExtractor, Regions, YoloRegionExtractor, regions_from_boxes
from modeling_dclip.towers import load_tokenizer

DETECTED_CLASS = 3


class CountingGrid(GridRegionExtractor):
    """A grid extractor that counts the images it is asked about: zero on a second call means the cache answered."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.images_seen = 0

    def _extract(self, images: list[Image.Image]) -> list[Regions]:
        self.images_seen += len(images)
        return super()._extract(images)


def cache_files(folder: Path, pattern: str = "region-boxes-*.arrow") -> list[Path]:
    return sorted(folder.glob(pattern))


def assert_regions_equal(dataset: Dataset, expected: list[Regions]) -> None:
    assert len(dataset) == len(expected)
    for row, regions in zip(dataset.select_columns(list(REGION_COLUMNS)), expected):
        found = regions_of_row(row)
        np.testing.assert_array_equal(found.boxes, regions.boxes)
        np.testing.assert_array_equal(found.scores, regions.scores)
        np.testing.assert_array_equal(found.labels, regions.labels)


@pytest.fixture(scope="module")
def scenes() -> Dataset:
    return make_synthetic_dataset(6, seed=3, split="train", image_size=48)


def test_grid_boxes_are_mapped_once_then_read_from_the_arrow_cache(scenes, tmp_path):
    first_grid = CountingGrid(scales=(2,))
    first = add_region_boxes(scenes, first_grid, cache_dir=tmp_path, batch_size=4)
    assert first_grid.images_seen == len(scenes)
    assert first.column_names == scenes.column_names + list(REGION_COLUMNS)
    assert first["captions"] == scenes["captions"]
    assert_regions_equal(first, GridRegionExtractor(scales=(2,))([Image.new("RGB", (8, 8))] * len(scenes)))
    [cache_file] = cache_files(tmp_path)
    assert str(cache_file) in {entry["filename"] for entry in first.cache_files}
    written = cache_file.stat().st_mtime_ns

    # The same rows built again (an in-memory dataset's fingerprint hashes its content) hit the same cache file.
    rebuilt = make_synthetic_dataset(6, seed=3, split="train", image_size=48)
    second_grid = CountingGrid(scales=(2,))
    second = add_region_boxes(rebuilt, second_grid, cache_dir=tmp_path, batch_size=4)
    assert second_grid.images_seen == 0
    assert cache_files(tmp_path) == [cache_file] and cache_file.stat().st_mtime_ns == written
    assert second[:] == first[:]

    # Other settings or other rows are other cache entries; load_from_cache_file=False recomputes.
    finer = CountingGrid(scales=(2, 3))
    assert len(add_region_boxes(scenes, finer, cache_dir=tmp_path, batch_size=4)[0]["region_boxes"]) == 14
    other_rows = CountingGrid(scales=(2,))
    add_region_boxes(scenes.select(range(3)), other_rows, cache_dir=tmp_path, batch_size=4)
    assert finer.images_seen == len(scenes) and other_rows.images_seen == 3
    assert len(cache_files(tmp_path)) == 3
    forced = CountingGrid(scales=(2,))
    add_region_boxes(scenes, forced, cache_dir=tmp_path, batch_size=4, load_from_cache_file=False)
    assert forced.images_seen == len(scenes)


def test_dataset_boxes_become_regions_after_the_whole_image(scenes, tmp_path):
    with_regions = add_region_boxes(scenes, DatasetBoxes(max_regions=4), cache_dir=tmp_path)
    expected = [regions_from_boxes(row["boxes"], labels=row["labels"], max_regions=4) for row in scenes]
    assert_regions_equal(with_regions, expected)
    assert any(len(regions) == 4 for regions in expected) and any(len(regions) < 4 for regions in expected)
    again = add_region_boxes(
        make_synthetic_dataset(6, seed=3, split="train", image_size=48), DatasetBoxes(max_regions=4), cache_dir=tmp_path
    )
    assert len(cache_files(tmp_path)) == 1 and again[:] == with_regions[:]


def test_bad_dataset_boxes_and_missing_columns_are_named(tmp_path):
    features = Features({"boxes": List(List(Value("float32"), length=4))})
    dataset = Dataset.from_dict({"boxes": [[[0.1, 0.1, 0.5, 0.5]], [], [[0.2, 0.2, 30.0, 40.0]]]}, features=features)
    with pytest.raises(ValueError, match=r"dataset row 2, column 'boxes'.*outside \[0, 1\]"):
        add_region_boxes(dataset, DatasetBoxes(), cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"no column 'image'"):
        add_region_boxes(dataset, GridRegionExtractor(), cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"add_region_boxes"):
        region_embeddings(None, None, dataset, cache_dir=tmp_path)


@pytest.fixture(scope="module")
def yolo_weights(tmp_path_factory) -> Path:
    """An untrained YOLOv8n from ultralytics' packaged yaml (no download), biased to detect one class everywhere."""
    ultralytics = pytest.importorskip("ultralytics")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("YOLO_OFFLINE", "1")
        torch.manual_seed(0)
        model = ultralytics.YOLO("yolov8n.yaml")
        for class_branch in model.model.model[-1].cv3:
            class_branch[-1].bias.data[DETECTED_CLASS] = 5.0
        path = tmp_path_factory.mktemp("yolo") / "untrained-yolov8n.pt"
        model.save(path)
    return path


def test_yolo_boxes_are_cached_and_keyed_by_the_weights_bytes(scenes, yolo_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    rows = scenes.select(range(4))
    settings = dict(conf=0.5, max_regions=4, imgsz=64, batch_size=3)
    with_regions = add_region_boxes(
        rows, YoloRegionExtractor(yolo_weights, **settings), cache_dir=tmp_path, batch_size=4
    )
    expected = YoloRegionExtractor(yolo_weights, **settings)(list(rows["image"]))
    assert all(len(regions) == 4 and (regions.labels[1:] == DETECTED_CLASS).all() for regions in expected)
    assert_regions_equal(with_regions, expected)

    # The detector loads its weights on first use: still unloaded after the second call means nothing ran.
    cached_extractor = YoloRegionExtractor(yolo_weights, **settings)
    again = add_region_boxes(rows, cached_extractor, cache_dir=tmp_path, batch_size=4)
    assert cached_extractor._model is None and again[:] == with_regions[:]
    assert len(cache_files(tmp_path)) == 1

    # Retrained weights under the same path must not reuse the old boxes.
    retrained = torch.load(yolo_weights, weights_only=False)
    retrained["model"].model[-1].cv3[0][-1].bias.data[DETECTED_CLASS] = 4.0
    torch.save(retrained, yolo_weights)
    fresh_extractor = YoloRegionExtractor(yolo_weights, **settings)
    add_region_boxes(rows, fresh_extractor, cache_dir=tmp_path, batch_size=4)
    assert fresh_extractor._model is not None and len(cache_files(tmp_path)) == 2


def tiny_teacher() -> tuple[DCLIPTeacherModel, DCLIPProcessor]:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = CLIPTextConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=30522,
        max_position_embeddings=64,
        bos_token_id=101,
        eos_token_id=102,
        pad_token_id=0,
    )
    base = DCLIPModel(
        DCLIPConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), projection_dim=8, text_pooling="mean")
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = DCLIPProcessor(image_processor=image_processor, tokenizer=load_tokenizer(EMBEDDED_TEXT))
    teacher = DCLIPTeacherModel.from_backbone(base, fusion_dim=8, num_attention_heads=2, intermediate_size=16)
    return teacher, processor


def test_region_embeddings_equal_encode_regions_and_are_cached_by_base_weights(scenes, tmp_path):
    teacher, processor = tiny_teacher()
    with_regions = add_region_boxes(scenes, DatasetBoxes(), cache_dir=tmp_path)
    # Scenes hold 2-4 objects: batches of 2 images have 4 or 5 regions, so padding across batches is exercised.
    features = region_embeddings(teacher, processor, with_regions, cache_dir=tmp_path, batch_size=2)

    per_image = [regions_of_row(row) for row in with_regions.select_columns(list(REGION_COLUMNS))]
    direct = processor.pack_regions(list(scenes["image"]), per_image)
    expected = teacher.encode_regions(direct["region_pixel_values"], direct["region_mask"])
    assert features["region_embeds"].shape == expected.shape == (len(scenes), max(map(len, per_image)), 8)
    torch.testing.assert_close(features["region_embeds"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features["region_boxes"], direct["region_boxes"])
    torch.testing.assert_close(features["region_scores"], direct["region_scores"])
    assert torch.equal(features["region_mask"], direct["region_mask"].long())
    assert torch.equal(features["image_embeds"], features["region_embeds"][:, 0])

    [cache_file] = tmp_path.glob("region-embeddings-*.safetensors")
    written = cache_file.stat().st_mtime_ns
    # The fusion is not part of the key (it trains on these features); the frozen base is.
    with torch.no_grad():
        teacher.region_projection.weight.add_(1.0)
    cached = region_embeddings(teacher, processor, with_regions, cache_dir=tmp_path, batch_size=3)
    assert cache_file.stat().st_mtime_ns == written and len(list(tmp_path.glob("region-embeddings-*"))) == 1
    assert all(torch.equal(cached[name], features[name]) for name in features)
    with torch.no_grad():
        teacher.base.visual_projection.weight.mul_(2.0)
    region_embeddings(teacher, processor, with_regions, cache_dir=tmp_path, batch_size=2)
    assert len(list(tmp_path.glob("region-embeddings-*.safetensors"))) == 2
