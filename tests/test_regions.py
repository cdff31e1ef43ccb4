"""Region extractors: grid, caller boxes, YOLO (a real, untrained ultralytics model built offline), crops, to_rgb."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import ExifTags, Image

from modeling_dclip.regions import (
    GridRegionExtractor,
    Regions,
    YoloRegionExtractor,
    crop_regions,
    region_extractor_from_dict,
    regions_from_boxes,
    to_rgb,
)

# The class the test detector is biased to find everywhere; any other class it never finds.
DETECTED_CLASS = 7


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def odd_mode_images() -> list[Image.Image]:
    """One image in each awkward mode a dataset may hand over."""
    base = random_image(40, 30)
    sixteen_bit = Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16))
    assert sixteen_bit.mode == "I;16"
    return [
        base.convert("L"),
        base.convert("LA"),
        base.convert("P"),
        base.convert("RGBA"),
        base.convert("CMYK"),
        sixteen_bit,
    ]


def assert_valid_regions(regions: Regions, max_regions: int | None = None) -> None:
    assert regions.boxes.dtype == np.float32 and regions.boxes.shape == (len(regions), 4)
    assert regions.scores.dtype == np.float32 and regions.labels.dtype == np.int64
    np.testing.assert_array_equal(regions.boxes[0], [0, 0, 1, 1])
    assert regions.scores[0] == 1.0 and regions.labels[0] == -1
    assert (regions.boxes >= 0).all() and (regions.boxes <= 1).all()
    assert (regions.boxes[:, 2] >= regions.boxes[:, 0]).all() and (regions.boxes[:, 3] >= regions.boxes[:, 1]).all()
    if max_regions is not None:
        assert 1 <= len(regions) <= max_regions


# ---------------------------------------------------------------- grid


def test_grid_cells_tile_the_image():
    images = [random_image(64, 48, seed) for seed in range(3)]
    regions_per_image = GridRegionExtractor(scales=(2,))(images)
    assert len(regions_per_image) == 3
    for regions in regions_per_image:
        assert_valid_regions(regions)
        assert len(regions) == 5
        cells = regions.boxes[1:]
        areas = (cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])
        np.testing.assert_allclose(areas, 0.25)
        # Four quarter-area cells inside the unit square cover it exactly when no two overlap.
        assert {tuple(cell) for cell in cells.tolist()} == {
            (0.0, 0.0, 0.5, 0.5),
            (0.5, 0.0, 1.0, 0.5),
            (0.0, 0.5, 0.5, 1.0),
            (0.5, 0.5, 1.0, 1.0),
        }
        np.testing.assert_array_equal(regions.scores, 1.0)
        np.testing.assert_array_equal(regions.labels, -1)


def test_grid_multiscale_cap_and_score():
    image = random_image(30, 30)
    (regions,) = GridRegionExtractor(scales=(2, 3))([image])
    assert len(regions) == 1 + 4 + 9
    third_scale_areas = (regions.boxes[5:, 2] - regions.boxes[5:, 0]) * (regions.boxes[5:, 3] - regions.boxes[5:, 1])
    np.testing.assert_allclose(third_scale_areas.sum(), 1.0, rtol=1e-6)

    (capped,) = GridRegionExtractor(scales=(2, 3), max_regions=6, score=0.5)([image])
    assert len(capped) == 6
    np.testing.assert_array_equal(capped.boxes[:5], regions.boxes[:5])
    np.testing.assert_array_equal(capped.scores, [1.0, 0.5, 0.5, 0.5, 0.5, 0.5])


def test_grid_rejects_bad_settings_and_inputs():
    with pytest.raises(ValueError, match="scale 1 is the whole image"):
        GridRegionExtractor(scales=(1, 2))
    with pytest.raises(ValueError, match="max_regions"):
        GridRegionExtractor(max_regions=0)
    with pytest.raises(TypeError, match=r"images\[1\] is a ndarray"):
        GridRegionExtractor()([random_image(8, 8), np.zeros((8, 8, 3))])
    assert GridRegionExtractor()([]) == []


# ---------------------------------------------------------------- caller boxes


def test_regions_from_pixel_boxes_are_normalised():
    regions = regions_from_boxes([[10, 20, 50, 60], [0, 0, 100, 250]], labels=[3, 4], image_size=(100, 200))
    assert_valid_regions(regions)
    np.testing.assert_allclose(regions.boxes[1], [0.1, 0.1, 0.5, 0.3])
    # A pixel box running past the image edge is clipped to it.
    np.testing.assert_allclose(regions.boxes[2], [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(regions.labels, [-1, 3, 4])
    np.testing.assert_array_equal(regions.scores, [1.0, 1.0, 1.0])


def test_regions_from_boxes_keeps_most_confident_and_handles_empty():
    boxes = [[0.0, 0.0, 0.1, 0.1], [0.2, 0.2, 0.3, 0.3], [0.4, 0.4, 0.5, 0.5]]
    regions = regions_from_boxes(boxes, scores=[0.2, 0.9, 0.5], labels=[0, 1, 2], max_regions=3)
    np.testing.assert_allclose(regions.scores, [1.0, 0.9, 0.5])
    np.testing.assert_array_equal(regions.labels, [-1, 1, 2])
    np.testing.assert_allclose(regions.boxes[1], boxes[1])

    empty = regions_from_boxes([])
    assert len(empty) == 1
    assert_valid_regions(empty)


def test_regions_from_boxes_names_the_bad_row():
    with pytest.raises(ValueError, match=r"row 1 .* pixel boxes need image_size"):
        regions_from_boxes([[0.1, 0.1, 0.2, 0.2], [10, 10, 50, 50]])
    with pytest.raises(ValueError, match=r"row 0 .* not xyxy"):
        regions_from_boxes([[0.5, 0.1, 0.2, 0.2]])
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        regions_from_boxes([[0.1, 0.2, 0.3]])
    with pytest.raises(ValueError, match="one entry per box"):
        regions_from_boxes([[0.1, 0.1, 0.2, 0.2]], scores=[0.5, 0.6])
    with pytest.raises(ValueError, match="row 0 must be the whole image"):
        Regions(boxes=np.zeros((1, 4)), scores=np.ones(1), labels=np.full(1, -1))


# ---------------------------------------------------------------- crops and to_rgb


def test_crop_regions_sizes_including_degenerate_boxes():
    image = random_image(100, 60)
    regions = regions_from_boxes(
        [
            [0.5, 0.5, 1.0, 1.0],  # a quarter
            [0.3, 0.3, 0.3, 0.3],  # a point
            [1.0, 1.0, 1.0, 1.0],  # a point on the far corner
            [0.0, 0.2, 1.0, 0.2],  # a horizontal line
        ]
    )
    crops = crop_regions(image, regions)
    assert [crop.size for crop in crops] == [(100, 60), (50, 30), (1, 1), (1, 1), (100, 1)]
    assert all(crop.mode == "RGB" for crop in crops)
    np.testing.assert_array_equal(np.asarray(crops[1]), np.asarray(image)[30:, 50:])


def test_crop_regions_of_grid_cells_tile_a_grey_image():
    image = random_image(31, 17).convert("L")
    (regions,) = GridRegionExtractor(scales=(3,))([image])
    crops = crop_regions(image, regions)
    assert all(crop.mode == "RGB" for crop in crops)
    # Cells of an odd-sized image round outwards, so together they cover every pixel.
    assert sum(crop.width for crop in crops[1:4]) >= 31
    assert sum(crop.height for crop in crops[1::3]) >= 17


def test_to_rgb_modes():
    for image in odd_mode_images():
        converted = to_rgb(image)
        assert converted.mode == "RGB" and converted.size == (40, 30), image.mode

    sixteen_bit = Image.fromarray(np.array([[0, 256, 32768, 65535]], dtype=np.uint16))
    np.testing.assert_array_equal(np.asarray(to_rgb(sixteen_bit))[0, :, 0], [0, 1, 128, 255])

    wide = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))
    np.testing.assert_array_equal(np.asarray(to_rgb(wide))[0, :, 0], [0, 128, 255])
    constant = Image.fromarray(np.full((2, 2), 1000, dtype=np.int32))
    np.testing.assert_array_equal(np.asarray(to_rgb(constant)), 0)

    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    np.testing.assert_array_equal(np.asarray(to_rgb(transparent)), 255)

    rgb = random_image(5, 5)
    assert to_rgb(rgb) is rgb
    with pytest.raises(TypeError, match="ndarray"):
        to_rgb(np.zeros((4, 4, 3)))


def test_to_rgb_applies_exif_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored landscape, shown portrait
    random_image(40, 20).save(path, exif=exif)
    with Image.open(path) as image:
        assert image.size == (40, 20)
        assert to_rgb(image).size == (20, 40)
        assert crop_regions(image, regions_from_boxes([]))[0].size == (20, 40)


def test_module_imports_only_what_remote_code_may_require():
    from transformers.dynamic_module_utils import get_imports

    third_party = set(get_imports(REPO / "modeling_dclip" / "regions.py")) - set(sys.stdlib_module_names)
    assert third_party <= {"numpy", "PIL", "torch"}


# ---------------------------------------------------------------- YOLO


@pytest.fixture(scope="module")
def yolo_weights(tmp_path_factory) -> Path:
    """An untrained YOLOv8n built offline from ultralytics' packaged yaml, biased to detect one class everywhere."""
    ultralytics = pytest.importorskip("ultralytics")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("YOLO_OFFLINE", "1")
        torch.manual_seed(0)
        model = ultralytics.YOLO("yolov8n.yaml")
        # The untrained head scores every class about 1e-4; one raised bias gives confident boxes of one class.
        for class_branch in model.model.model[-1].cv3:
            class_branch[-1].bias.data[DETECTED_CLASS] = 5.0
        path = tmp_path_factory.mktemp("yolo") / "untrained-yolov8n.pt"
        model.save(path)
    return path


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "1")


def test_yolo_confident_detections_are_capped_and_normalised(yolo_weights, offline):
    images = [random_image(90, 120, 0), random_image(200, 64, 1), random_image(50, 50, 2), *odd_mode_images()]
    extractor = YoloRegionExtractor(yolo_weights, conf=0.5, max_regions=4, imgsz=128, batch_size=3)
    regions_per_image = extractor(images)
    assert len(regions_per_image) == len(images)
    for regions in regions_per_image:
        assert_valid_regions(regions, max_regions=4)
        assert len(regions) == 4
        np.testing.assert_array_equal(regions.labels[1:], DETECTED_CLASS)
        assert (regions.scores[1:] > 0.5).all()
        assert (np.diff(regions.scores[1:]) <= 0).all()


def test_yolo_leaves_torchs_thread_count_as_it_found_it(yolo_weights, offline):
    """ultralytics sets torch's thread count to cpu_count - 1 (at most 8) when it picks a device; regions computed
    in a process must not change the threads (so the speed and floating-point sums) of everything after them."""
    before = torch.get_num_threads()
    theirs = min(8, max(1, (os.cpu_count() or 1) - 1))
    ours = theirs + 1
    torch.set_num_threads(ours)
    try:
        YoloRegionExtractor(yolo_weights, conf=0.5, imgsz=64)([random_image(64, 64, 0)])
        assert torch.get_num_threads() == ours
    finally:
        torch.set_num_threads(before)


def test_yolo_leaves_the_process_environment_as_it_found_it(yolo_weights):
    """Importing ultralytics sets OMP_NUM_THREADS=1 where it is unset, which every process started later (a training
    launch) would inherit: in a fresh interpreter, extracting regions leaves the variable unset."""
    script = (
        "import os, torch\n"
        "from PIL import Image\n"
        "from modeling_dclip.regions import YoloRegionExtractor\n"
        "before = (os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads())\n"
        f"YoloRegionExtractor({str(yolo_weights)!r}, imgsz=64)([Image.new('RGB', (64, 64))])\n"
        "print(before == (os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads()), before[0])\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    environment.update(YOLO_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300, check=True
    )
    assert completed.stdout.split() == ["True", "None"], completed.stdout + completed.stderr[-2000:]


def test_yolo_without_detections_gives_whole_image_only(yolo_weights, offline):
    images = [random_image(64, 64, seed) for seed in range(2)]
    for extractor in (
        YoloRegionExtractor(yolo_weights, conf=1.0, imgsz=64),
        YoloRegionExtractor(yolo_weights, conf=0.5, classes=[DETECTED_CLASS + 1], imgsz=64),
    ):
        for regions in extractor(images):
            assert len(regions) == 1
            assert_valid_regions(regions)


def test_yolo_model_is_cached_but_not_pickled(yolo_weights, offline):
    extractor = YoloRegionExtractor(yolo_weights, conf=0.5, max_regions=2, imgsz=64)
    extractor([random_image(32, 32)])
    model = extractor._model
    assert model is not None
    extractor([random_image(32, 32)])
    assert extractor._model is model
    restored = pickle.loads(pickle.dumps(extractor))
    assert restored._model is None
    assert restored.to_dict() == extractor.to_dict()


def test_every_extractor_round_trips_through_json(yolo_weights):
    extractors = [
        GridRegionExtractor(),
        GridRegionExtractor(scales=(2, 4), max_regions=9, score=0.7),
        YoloRegionExtractor(yolo_weights),
        YoloRegionExtractor(
            str(yolo_weights), conf=0.1, iou=0.5, max_regions=5, classes=(0, 2), imgsz=320, batch_size=4, device="cpu"
        ),
    ]
    for extractor in extractors:
        settings = json.loads(json.dumps(extractor.to_dict()))
        rebuilt = region_extractor_from_dict(settings)
        assert type(rebuilt) is type(extractor)
        assert rebuilt.to_dict() == extractor.to_dict()
    with pytest.raises(ValueError, match="unknown region extractor type 'sam'"):
        region_extractor_from_dict({"type": "sam"})
    with pytest.raises(ValueError, match=r"unknown settings \['confidence'\]"):
        region_extractor_from_dict({"type": "yolo", "weights": "x.pt", "confidence": 0.3})


def test_yolo_missing_weights_file_is_named(tmp_path, offline):
    pytest.importorskip("ultralytics")
    missing = tmp_path / "no-such-detector.pt"
    with pytest.raises(FileNotFoundError, match="no-such-detector.pt") as caught:
        YoloRegionExtractor(missing)([random_image(32, 32)])
    assert "GridRegionExtractor" in str(caught.value) and "regions_from_boxes" in str(caught.value)


def test_yolo_bare_name_offline_fails_fast_with_alternatives(offline):
    pytest.importorskip("ultralytics")
    with pytest.raises(FileNotFoundError, match=r"'yolov8x\.pt' not found.*no network.*GridRegionExtractor"):
        YoloRegionExtractor("yolov8x.pt")([random_image(32, 32)])


def test_yolo_without_ultralytics_explains_the_extra(tmp_path):
    script = (
        "import sys\n"
        "sys.modules['ultralytics'] = None\n"
        "from PIL import Image\n"
        "from modeling_dclip.regions import YoloRegionExtractor\n"
        f"extractor = YoloRegionExtractor({str(tmp_path / 'any.pt')!r})\n"
        "try:\n"
        "    extractor([Image.new('RGB', (16, 16))])\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=120, check=True
    )
    assert 'pip install "dclip[yolo]"' in completed.stdout
    assert "GridRegionExtractor" in completed.stdout and "regions_from_boxes" in completed.stdout
