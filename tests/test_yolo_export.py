"""The YOLO export (`modeling_dclip.data.yolo_export`, `dclip export-yolo`): a well-formed detection dataset from the
synthetic scenes or any dataset with boxes, that `dclip train-detector` reads and ultralytics trains on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from datasets import ClassLabel, DatasetDict
from PIL import Image

from modeling_dclip.cli import main as cli_main
from modeling_dclip.data.synthetic import SHAPES, make_synthetic_dataset
from modeling_dclip.data.yolo_export import export_yolo
from modeling_dclip.training.detector import resolve_data_yaml


def _read_yolo_labels(path) -> list[list[float]]:
    return [[float(v) for v in line.split()] for line in path.read_text().splitlines()]


def test_export_yolo_writes_a_well_formed_detection_dataset(tmp_path) -> None:
    dataset = make_synthetic_dataset(10, seed=2, image_size=64)
    data_yaml = export_yolo(dataset, tmp_path / "yolo", val_fraction=0.3, seed=0)
    spec = yaml.safe_load(data_yaml.read_text())
    root = tmp_path / "yolo"
    assert spec == {
        "path": str(root.resolve()),
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(SHAPES)),
    }
    train_images = sorted((root / "images" / "train").iterdir())
    val_images = sorted((root / "images" / "val").iterdir())
    assert (len(train_images), len(val_images)) == (7, 3)
    for image_path in train_images + val_images:
        row = dataset[int(image_path.stem)]
        assert image_path.suffix == ".png"
        assert np.array_equal(np.asarray(row["image"]), np.asarray(Image.open(image_path)))
        split = image_path.parent.name
        lines = _read_yolo_labels(root / "labels" / split / f"{image_path.stem}.txt")
        assert [int(line[0]) for line in lines] == row["labels"]
        for (_, cx, cy, w, h), (x1, y1, x2, y2) in zip(lines, row["boxes"]):
            assert np.allclose([cx, cy, w, h], [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], atol=1e-5)
            assert 0 < w <= 1 and 0 < h <= 1 and 0 <= cx - w / 2 and cx + w / 2 <= 1 + 1e-6

    # A DatasetDict keeps its own splits; "validation" is accepted for "val".
    splits = DatasetDict({"train": dataset.select(range(6)), "validation": dataset.select(range(6, 8))})
    spec = yaml.safe_load(export_yolo(splits, tmp_path / "dict").read_text())
    assert spec["val"] == "images/val" and "test" not in spec
    assert len(list((tmp_path / "dict" / "images" / "val").iterdir())) == 2

    with pytest.raises(FileExistsError, match="not empty"):
        export_yolo(dataset, tmp_path / "yolo")
    broken = dataset.select(range(3)).map(
        lambda row, index: {"boxes": [[0.5, 0.5, 0.4, 0.9]] * len(row["boxes"]) if index == 1 else row["boxes"]},
        with_indices=True,
    )
    with pytest.raises(ValueError, match=r"row 1 .*'boxes'\[0\]"):
        export_yolo(broken, tmp_path / "broken", val_fraction=0.5)
    assert not (tmp_path / "broken").exists(), "a rejected export must not leave files behind"
    assert isinstance(dataset.features["labels"].feature, ClassLabel)


def test_ultralytics_trains_on_the_export(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    ultralytics = pytest.importorskip("ultralytics")
    data_yaml = export_yolo(make_synthetic_dataset(16, seed=3, image_size=64), tmp_path / "yolo", val_fraction=0.25)
    model = ultralytics.YOLO("yolov8n.yaml")
    model.train(
        data=str(data_yaml),
        epochs=1,
        imgsz=64,
        batch=8,
        workers=0,
        device="cpu",
        plots=False,
        project=str(tmp_path / "runs"),
        name="synthetic",
        exist_ok=True,
        verbose=False,
    )
    weights = tmp_path / "runs" / "synthetic" / "weights"
    assert (weights / "last.pt").stat().st_size > 0
    assert (weights / "best.pt").stat().st_size > 0


def test_cli_exports_synthetic_scenes_for_train_detector(tmp_path, capsys) -> None:
    output = tmp_path / "yolo"
    arguments = ["export-yolo", "--data", "synthetic:?n=6&seed=1", "--output", str(output), "--val-fraction", "0.5"]
    assert cli_main(arguments) == 0
    data_yaml = Path(capsys.readouterr().out.strip())
    assert data_yaml == output.resolve() / "data.yaml"
    # What `dclip train-detector --data` reads and checks before training.
    resolved = resolve_data_yaml(data_yaml)
    assert resolved["names"] == dict(enumerate(SHAPES))
    assert len(list((output / "images" / "train").iterdir())) == 3
    assert len(list((output / "labels" / "val").iterdir())) == 3
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")], "a temporary folder was left"


def test_cli_exports_coco_boxes_by_the_split_column_and_refuses_data_without_boxes(tmp_path, capsys) -> None:
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    entries, instance_images, annotations = [], [], []
    for index, split in enumerate(["train", "train", "val"]):
        Image.new("RGB", (100, 50), (index * 80, 0, 0)).save(image_dir / f"{index}.jpg")
        entries.append({"filename": f"{index}.jpg", "cocoid": index, "split": split, "sentences": [{"raw": "x"}]})
        instance_images.append({"id": index, "width": 100, "height": 50})
        annotations.append({"image_id": index, "category_id": 7, "bbox": [10, 5, 50, 20], "iscrowd": 0})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    (tmp_path / "instances.json").write_text(
        json.dumps({"images": instance_images, "categories": [{"id": 7, "name": "car"}], "annotations": annotations})
    )
    spec = f"karpathy:{tmp_path / 'dataset_coco.json'}?instances={tmp_path / 'instances.json'}"
    assert cli_main(["export-yolo", "--data", spec, "--output", str(tmp_path / "yolo")]) == 0
    data_yaml = Path(capsys.readouterr().out.strip())
    assert yaml.safe_load(data_yaml.read_text())["names"] == {0: "car"}
    # The file's own train / val splits are kept; JPEG files are copied as they are.
    assert sorted(path.name for path in (tmp_path / "yolo" / "images" / "train").iterdir()) == [
        "000000.jpg",
        "000001.jpg",
    ]
    assert (tmp_path / "yolo" / "images" / "val" / "000002.jpg").read_bytes() == (image_dir / "2.jpg").read_bytes()
    label = (tmp_path / "yolo" / "labels" / "val" / "000002.txt").read_text().split()
    assert label[0] == "0" and np.allclose([float(v) for v in label[1:]], [0.35, 0.3, 0.5, 0.4])

    without_boxes = f"karpathy:{tmp_path / 'dataset_coco.json'}"
    assert cli_main(["export-yolo", "--data", without_boxes, "--output", str(tmp_path / "none")]) == 2
    assert "no ['boxes', 'labels'] column(s)" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
