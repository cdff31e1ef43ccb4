"""`dclip train-detector`: one epoch on exported synthetic scenes, and the weights run in `YoloRegionExtractor`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytest.importorskip("ultralytics")

from modeling_dclip.cli import main as cli_main  # noqa: E402
from modeling_dclip.data.synthetic import make_synthetic_dataset  # noqa: E402
from modeling_dclip.data.yolo_export import export_yolo  # noqa: E402
from modeling_dclip.regions import YoloRegionExtractor  # noqa: E402
from modeling_dclip.training.detector import resolve_data_yaml, train_detector  # noqa: E402

DCLIP = str(Path(sys.executable).with_name("dclip"))


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    return export_yolo(
        make_synthetic_dataset(8, image_size=96), tmp_path_factory.mktemp("scenes") / "yolo", val_fraction=0.25
    )


def test_cli_trains_one_epoch_and_the_weights_plug_into_the_extractor(data_yaml, tmp_path):
    run_dir = tmp_path / "detector"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [
            DCLIP,
            "train-detector",
            "--data",
            str(data_yaml),
            "--epochs",
            "1",
            "--imgsz",
            "96",
            "--batch",
            "4",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--output-dir",
            str(run_dir),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    weights = Path(result.stdout.strip().splitlines()[-1])
    assert weights == run_dir / "weights" / "best.pt" and weights.is_file()

    num_classes = len(yaml.safe_load(data_yaml.read_text())["names"])
    images = [Image.open(path).convert("RGB") for path in sorted((data_yaml.parent / "images" / "val").iterdir())]
    # A one-epoch detector is barely confident, so the threshold is low enough for it to propose boxes.
    extractor = YoloRegionExtractor(weights, conf=0.001, imgsz=96, max_regions=4, device="cpu")
    all_regions = extractor(images)
    assert len(all_regions) == len(images)
    assert any(len(regions) > 1 for regions in all_regions), "the trained detector proposed no box"
    for regions in all_regions:
        assert 1 <= len(regions) <= 4
        assert regions.boxes[0].tolist() == [0.0, 0.0, 1.0, 1.0]
        detections = regions.boxes[1:]
        assert ((detections >= 0) & (detections <= 1)).all()
        assert (detections[:, 2] >= detections[:, 0]).all() and (detections[:, 3] >= detections[:, 1]).all()
        assert ((regions.scores[1:] > 0) & (regions.scores[1:] <= 1)).all()
        assert np.all(np.diff(regions.scores[1:]) <= 0), "detections are not sorted by confidence"
        assert set(regions.labels[1:].tolist()) <= set(range(num_classes))


def test_missing_or_malformed_data_file_is_a_clear_error(data_yaml, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_detector(tmp_path / "nowhere.yaml", output_dir=tmp_path / "run")
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("train: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        train_detector(malformed, output_dir=tmp_path / "run")
    no_val = tmp_path / "no_val.yaml"
    no_val.write_text(yaml.safe_dump({"path": str(data_yaml.parent), "train": "images/train", "names": ["a"]}))
    with pytest.raises(ValueError, match=r"missing key\(s\) \['val'\]"):
        train_detector(no_val, output_dir=tmp_path / "run")
    wrong_split = tmp_path / "wrong_split.yaml"
    wrong_split.write_text(
        yaml.safe_dump({"path": str(data_yaml.parent), "train": "images/train", "val": "images/nope", "names": ["a"]})
    )
    with pytest.raises(FileNotFoundError, match="'val' images not found"):
        train_detector(wrong_split, output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists(), "a bad data file must fail before anything is written"

    # Relative to the data file's own folder, wherever the command runs from.
    relative = data_yaml.parent / "relative.yaml"
    relative.write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "names": ["a"]}))
    assert resolve_data_yaml(relative)["path"] == str(data_yaml.parent.resolve())

    assert cli_main(["train-detector", "--data", str(tmp_path / "nowhere.yaml")]) == 2
    assert "nowhere.yaml does not exist" in capsys.readouterr().err
