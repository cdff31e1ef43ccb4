"""The feature store: content-keyed entries (grid, dataset boxes, an untrained YOLO built offline, region
embeddings, image embeddings) reused only for the inputs that produced them, chunked resumable computation, two
processes computing one entry once, and bad input named."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_student
from datasets import Dataset, Features, List, Value
from PIL import Image

from modeling_dclip import DCLIPProcessor, DCLIPTeacherModel
from modeling_dclip.data.synthetic import make_synthetic_dataset
from modeling_dclip.encoding import encode_images, tensors_to_regions
from modeling_dclip.feature_store import DatasetBoxes, FeatureStore, images_fingerprint
from modeling_dclip.regions import GridRegionExtractor, Regions, YoloRegionExtractor, regions_from_boxes

DETECTED_CLASS = 3


class CountingGrid(GridRegionExtractor):
    """A grid extractor that counts the images it is asked about: zero on a second call means the store answered."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.images_seen = 0

    def _extract(self, images: list[Image.Image]) -> list[Regions]:
        self.images_seen += len(images)
        return super()._extract(images)


def entries(store: FeatureStore, kind: str) -> list[Path]:
    return sorted((store.root / kind).glob("**/*.safetensors"))


def assert_regions_equal(boxes: dict, expected: list[Regions]) -> None:
    assert len(boxes["region_mask"]) == len(expected)
    for row, regions in enumerate(expected):
        found = tensors_to_regions(boxes, row)
        np.testing.assert_array_equal(found.boxes, regions.boxes.astype(np.float32))
        np.testing.assert_array_equal(found.scores, regions.scores.astype(np.float32))
        np.testing.assert_array_equal(found.labels, regions.labels)


@pytest.fixture(scope="module")
def scenes() -> Dataset:
    return make_synthetic_dataset(6, seed=3, split="train", image_size=48)


def test_grid_boxes_are_computed_once_then_read_from_the_store(scenes, tmp_path):
    store = FeatureStore(tmp_path)
    first_grid = CountingGrid(scales=(2,))
    first = store.region_boxes(scenes, first_grid, batch_size=4)
    assert first_grid.images_seen == len(scenes)
    assert_regions_equal(first, GridRegionExtractor(scales=(2,))([Image.new("RGB", (8, 8))] * len(scenes)))
    [entry] = entries(store, "region_boxes")
    written = entry.stat().st_mtime_ns

    # The same images built again hit the same entry.
    rebuilt = make_synthetic_dataset(6, seed=3, split="train", image_size=48)
    second_grid = CountingGrid(scales=(2,))
    second = store.region_boxes(rebuilt, second_grid, batch_size=4)
    assert second_grid.images_seen == 0
    assert entries(store, "region_boxes") == [entry] and entry.stat().st_mtime_ns == written
    assert all(torch.equal(second[name], first[name]) for name in first)

    # Regions are stored per image: any subset or order of images already seen is read back, new images are
    # computed; other settings are other entries.
    subset = CountingGrid(scales=(2,))
    reordered = store.region_boxes(scenes.select([4, 1, 2]), subset)
    assert subset.images_seen == 0
    assert all(torch.equal(reordered[name], first[name][[4, 1, 2]]) for name in first)
    more = make_synthetic_dataset(8, seed=3, split="train", image_size=48)  # the same 6 scenes and 2 new ones
    grown = CountingGrid(scales=(2,))
    store.region_boxes(more, grown)
    assert grown.images_seen == 2 and len(entries(store, "region_boxes")) == 2
    finer = CountingGrid(scales=(2, 3))
    assert int(store.region_boxes(scenes, finer)["region_mask"][0].sum()) == 14
    assert finer.images_seen == len(scenes) and len(entries(store, "region_boxes")) == 3


def test_image_files_replaced_under_the_same_names_are_new_inputs(tmp_path, embedded_student, embedded_processor):
    """The key follows the files' bytes, not their names: a photo fixed or replaced in place is recomputed."""
    paths = []
    for index, colour in enumerate(("red", "green", "blue")):
        paths.append(tmp_path / f"photo{index}.png")
        Image.new("RGB", (40, 30), colour).save(paths[-1])
    before = images_fingerprint([str(path) for path in paths])
    store = FeatureStore(tmp_path / "store")
    first = store.image_embeddings(embedded_student, embedded_processor, [str(path) for path in paths])
    Image.new("RGB", (40, 30), "white").save(paths[1])
    assert images_fingerprint([str(path) for path in paths]) != before
    second = store.image_embeddings(embedded_student, embedded_processor, [str(path) for path in paths])
    assert len(entries(store, "image_embeddings")) == 2
    assert torch.equal(first[0], second[0]) and not torch.allclose(first[1], second[1])
    expected = encode_images(embedded_student, embedded_processor, [str(path) for path in paths])
    torch.testing.assert_close(second, expected)


def test_dataset_boxes_become_regions_after_the_whole_image(scenes, tmp_path):
    store = FeatureStore(tmp_path)
    boxes = store.region_boxes(scenes, DatasetBoxes(max_regions=4))
    expected = [regions_from_boxes(row["boxes"], labels=row["labels"], max_regions=4) for row in scenes]
    assert_regions_equal(boxes, expected)
    assert any(len(regions) == 4 for regions in expected) and any(len(regions) < 4 for regions in expected)
    again = store.region_boxes(
        make_synthetic_dataset(6, seed=3, split="train", image_size=48), DatasetBoxes(max_regions=4)
    )
    # Read from the dataset's columns each time: nothing worth storing.
    assert not entries(store, "region_boxes") and all(torch.equal(again[k], boxes[k]) for k in boxes)


def test_bad_dataset_boxes_missing_columns_and_corrupt_images_are_named(tmp_path):
    store = FeatureStore(tmp_path)
    features = Features({"boxes": List(List(Value("float32"), length=4))})
    dataset = Dataset.from_dict({"boxes": [[[0.1, 0.1, 0.5, 0.5]], [], [[0.2, 0.2, 30.0, 40.0]]]}, features=features)
    with pytest.raises(ValueError, match=r"dataset row 2, column 'boxes'.*outside \[0, 1\]"):
        store.region_boxes(dataset, DatasetBoxes())
    with pytest.raises(ValueError, match=r"no 'image' column"):
        store.region_boxes(dataset, GridRegionExtractor())
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    Image.new("RGB", (20, 20), "red").save(good)
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match=r"bad\.jpg\)?: not a readable image"):
        store.region_boxes([str(good), str(bad)], GridRegionExtractor(), chunk_size=1)
    # The chunk finished before the bad image is kept (a failed or killed run keeps its finished chunks).
    assert len(entries(store, "region_boxes")) == 1
    counting = CountingGrid()
    store.region_boxes([str(good)], counting)
    assert counting.images_seen == 0


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


def test_yolo_boxes_are_stored_and_keyed_by_the_weights_bytes(scenes, yolo_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    store = FeatureStore(tmp_path)
    rows = scenes.select(range(4))
    settings = dict(conf=0.5, max_regions=4, imgsz=64, batch_size=3)
    boxes = store.region_boxes(rows, YoloRegionExtractor(yolo_weights, **settings), batch_size=4)
    expected = YoloRegionExtractor(yolo_weights, **settings)(list(rows["image"]))
    assert all(len(regions) == 4 and (regions.labels[1:] == DETECTED_CLASS).all() for regions in expected)
    assert_regions_equal(boxes, expected)

    # The detector loads its weights on first use: still unloaded after the second call means nothing ran. Run with
    # another batch size, it finds the same boxes, so they are reused.
    cached_extractor = YoloRegionExtractor(yolo_weights, **{**settings, "batch_size": 1})
    again = store.region_boxes(rows, cached_extractor, batch_size=4)
    assert cached_extractor._model is None and all(torch.equal(again[k], boxes[k]) for k in boxes)
    assert len(entries(store, "region_boxes")) == 1

    # Retrained weights under the same path must not reuse the old boxes.
    retrained = torch.load(yolo_weights, weights_only=False)
    retrained["model"].model[-1].cv3[0][-1].bias.data[DETECTED_CLASS] = 4.0
    torch.save(retrained, yolo_weights)
    fresh_extractor = YoloRegionExtractor(yolo_weights, **settings)
    store.region_boxes(rows, fresh_extractor, batch_size=4)
    assert fresh_extractor._model is not None and len(entries(store, "region_boxes")) == 2


def tiny_teacher() -> tuple[DCLIPTeacherModel, DCLIPProcessor]:
    base, processor = tiny_student(projection_dim=8)
    teacher = DCLIPTeacherModel.from_backbone(base, fusion_dim=8, num_attention_heads=2, intermediate_size=16)
    return teacher, processor


def test_region_features_equal_encode_regions_and_are_keyed_by_the_base_weights(scenes, tmp_path):
    store = FeatureStore(tmp_path)
    teacher, processor = tiny_teacher()
    # Scenes hold 2-4 objects: batches of 2 images have 4 or 5 regions, so padding across batches is exercised.
    features = store.region_features(teacher, processor, scenes, DatasetBoxes(), batch_size=2)

    per_image = [regions_from_boxes(row["boxes"], labels=row["labels"]) for row in scenes]
    direct = processor.pack_regions(list(scenes["image"]), per_image)
    expected = teacher.encode_regions(direct["region_pixel_values"], direct["region_mask"])
    assert features["region_embeds"].shape == expected.shape == (len(scenes), max(map(len, per_image)), 8)
    torch.testing.assert_close(features["region_embeds"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features["region_boxes"], direct["region_boxes"])
    torch.testing.assert_close(features["region_scores"], direct["region_scores"])
    assert torch.equal(features["region_mask"], direct["region_mask"].long())
    assert torch.equal(features["image_embeds"], features["region_embeds"][:, 0])

    [entry] = entries(store, "region_features")
    written = entry.stat().st_mtime_ns
    # The fusion is not part of the key (it trains on these features); the frozen base is.
    with torch.no_grad():
        teacher.region_projection.weight.add_(1.0)
    cached = store.region_features(teacher, processor, scenes, DatasetBoxes(), batch_size=3)
    assert entry.stat().st_mtime_ns == written and len(entries(store, "region_features")) == 1
    assert all(torch.equal(cached[name], features[name]) for name in features)
    with torch.no_grad():
        teacher.base.visual_projection.weight.mul_(2.0)
    store.region_features(teacher, processor, scenes, DatasetBoxes(), batch_size=2)
    assert len(entries(store, "region_features")) == 2


def _compute_slowly(root: str, marker: str) -> None:
    """A process asking the store for an entry whose computation takes a while and leaves a mark each time."""

    def compute() -> dict[str, torch.Tensor]:
        with open(marker, "a") as file:
            file.write("computed\n")
        time.sleep(1.0)
        return {"values": torch.arange(4.0)}

    values = FeatureStore(root).load_or_compute("test_values", {"a": 1}, compute)["values"]
    assert torch.equal(values, torch.arange(4.0))


def test_two_processes_compute_one_entry_once(tmp_path):
    marker = tmp_path / "marks.txt"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_compute_slowly, args=(str(tmp_path), str(marker))) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert marker.read_text().splitlines() == ["computed"]
    assert len(list((tmp_path / "test_values").glob("*.safetensors"))) == 1


CHUNKED_SCRIPT = """
import sys, time, torch
from modeling_dclip.feature_store import FeatureStore

def compute(start, stop):
    with open(sys.argv[2], "a") as marks:
        marks.write(f"{start}\\n")
    time.sleep(float(sys.argv[3]))
    return {"values": torch.arange(start, stop, dtype=torch.float32)[:, None].repeat(1, 1 + start % 3)}

values = FeatureStore(sys.argv[1]).chunked("test_chunks", {"n": 10}, 10, compute, chunk_size=2)["values"]
print(values.shape[0], values[:, 0].tolist())
"""


def test_chunked_entries_resume_after_kill_9_and_pad_their_chunks(tmp_path):
    script = tmp_path / "chunked.py"
    script.write_text(CHUNKED_SCRIPT)
    marks = tmp_path / "marks.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    worker = subprocess.Popen([sys.executable, str(script), str(tmp_path / "store"), str(marks), "0.7"], env=env)
    deadline = time.time() + 60
    while (not marks.exists() or len(marks.read_text().split()) < 3) and time.time() < deadline:
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    started = marks.read_text().split()
    finished = list((tmp_path / "store" / "test_chunks").glob("*.chunks/*.safetensors"))
    assert 1 <= len(finished) < 5, (started, finished)

    marks.write_text("")
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "store"), str(marks), "0"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(" ", 1)[0] == "10"
    assert done.stdout.strip().endswith(str([float(value) for value in range(10)]))
    # Only the chunks missing after the kill were computed again.
    assert len(marks.read_text().split()) == 5 - len(finished)
    assert not list((tmp_path / "store" / "test_chunks").glob("*.chunks"))
