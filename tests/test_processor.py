"""DCLIPProcessor: outputs, region tensors, saving, and bad input (odd modes, sizes, corrupt files, captions)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_student
from PIL import Image
from transformers import AutoProcessor

from modeling_dclip import DCLIPModel, DCLIPProcessor
from modeling_dclip.regions import GridRegionExtractor, YoloRegionExtractor


@pytest.fixture(scope="module")
def photo(sample_photos) -> Image.Image:
    return sample_photos["chelsea"]


def _odd_mode_images(photo: Image.Image) -> dict[str, Image.Image]:
    small = photo.resize((64, 48))
    sixteen_bit = Image.fromarray(np.asarray(small.convert("L"), dtype=np.uint16) * 257).convert("I;16")
    return {
        "L": small.convert("L"),
        "LA": small.convert("LA"),
        "P": small.convert("P"),
        "RGBA": small.convert("RGBA"),
        "CMYK": small.convert("CMYK"),
        "I;16": sixteen_bit,
    }


def test_outputs_and_region_tensors(embedded_processor, photo):
    batch = embedded_processor(images=[photo, photo.resize((100, 300))], text=["a cat", "a tall cat"], regions=True)
    assert batch["pixel_values"].shape == (2, 3, 224, 224)
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 2
    assert batch["region_pixel_values"].shape == (2, 5, 3, 224, 224)  # whole image + 2x2 grid
    assert batch["region_boxes"].shape == (2, 5, 4) and batch["region_mask"].sum().item() == 10
    torch.testing.assert_close(batch["region_boxes"][:, 0], torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2))
    # Region 0 is the whole image, prepared exactly as pixel_values.
    torch.testing.assert_close(batch["region_pixel_values"][:, 0], batch["pixel_values"])


def test_caller_boxes_are_padded_with_a_mask(embedded_processor, photo):
    batch = embedded_processor(images=[photo, photo], boxes=[[[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], []])
    assert batch["region_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["region_pixel_values"][1, 1:].abs().sum() == 0
    torch.testing.assert_close(batch["region_boxes"][0, 1], torch.tensor([0.1, 0.1, 0.5, 0.5]))


def test_region_settings_save_and_load(embedded_processor, tmp_path):
    embedded_processor.region_extractor = GridRegionExtractor(scales=(2, 3), max_regions=8)
    try:
        embedded_processor.save_pretrained(tmp_path)
    finally:
        embedded_processor.region_extractor = GridRegionExtractor()
    reloaded = DCLIPProcessor.from_pretrained(tmp_path)
    assert reloaded.region_config == {"type": "grid", "scales": [2, 3], "max_regions": 8, "score": 1.0}
    assert isinstance(reloaded.region_extractor, GridRegionExtractor)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_odd_image_modes(embedded_processor, photo, mode):
    image = _odd_mode_images(photo)[mode]
    batch = embedded_processor(images=image, regions=True)
    assert batch["pixel_values"].shape == (1, 3, 224, 224)
    assert torch.isfinite(batch["pixel_values"]).all()
    assert batch["pixel_values"].std() > 0.1, f"mode {mode} lost its content"


def test_sixteen_bit_keeps_its_range(embedded_processor, photo):
    image = _odd_mode_images(photo)["I;16"]
    eight_bit = embedded_processor(images=photo.resize((64, 48)).convert("L"))["pixel_values"]
    sixteen = embedded_processor(images=image)["pixel_values"]
    torch.testing.assert_close(sixteen, eight_bit, atol=0.05, rtol=0)


def test_tiny_and_large_images(embedded_processor):
    one_pixel = Image.new("RGB", (1, 1), (200, 10, 10))
    batch = embedded_processor(images=one_pixel, regions=True)
    assert batch["pixel_values"].shape == (1, 3, 224, 224)
    assert batch["region_pixel_values"].shape[1] == 5  # grid cells of a 1x1 image are 1-pixel crops
    wide = Image.new("RGB", (4000, 3000), (10, 200, 10))
    assert embedded_processor(images=wide)["pixel_values"].shape == (1, 3, 224, 224)


def test_decompression_bomb_guard_is_respected(embedded_processor, tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # 90,000 pixels is now > 2x the limit
    with pytest.raises(ValueError, match=r"huge\.png.*decompression-bomb"):
        embedded_processor(images=str(path))
    with pytest.raises(ValueError, match=r"images\[0\].*decompression-bomb"):
        embedded_processor(images=Image.new("RGB", (300, 300)))


def test_truncated_corrupt_and_missing_files(embedded_processor, photo, tmp_path):
    good = tmp_path / "good.jpg"
    photo.save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(ValueError, match="truncated.jpg"):
        embedded_processor(images=[str(good), str(truncated)])
    with pytest.raises(ValueError, match="corrupt.png"):
        embedded_processor(images=str(corrupt))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        embedded_processor(images=str(tmp_path / "missing.jpg"))
    assert embedded_processor(images=str(good))["pixel_values"].shape == (1, 3, 224, 224)


def test_empty_and_overlong_captions(embedded_processor):
    with pytest.raises(ValueError, match=r"text\[1\] is empty"):
        embedded_processor(text=["a cat", "   "])
    with pytest.raises(ValueError, match="empty list"):
        embedded_processor(text=[])
    long_caption = "a cat sitting on a mat " * 400
    batch = embedded_processor(text=[long_caption, "a cat"])
    assert batch["input_ids"].shape[1] == embedded_processor.tokenizer.model_max_length == 512
    assert batch["attention_mask"][1].sum() < 10


def test_needs_some_input(embedded_processor, photo):
    with pytest.raises(ValueError, match="needs images, text"):
        embedded_processor()
    with pytest.raises(ValueError, match="regions=True needs images"):
        embedded_processor(text="a cat", regions=True)
    with pytest.raises(TypeError, match=r"images\[0\]"):
        embedded_processor(images=[42])


@pytest.fixture(scope="module")
def untrained_yolo(tmp_path_factory, monkeypatch_module=None):
    ultralytics = pytest.importorskip("ultralytics", reason="YOLO regions need the `yolo` extra")
    import os

    os.environ["YOLO_OFFLINE"] = "1"
    path = tmp_path_factory.mktemp("yolo") / "untrained.pt"
    ultralytics.YOLO("yolov8n.yaml").save(path)
    return path


def test_no_detections_leaves_the_whole_image(embedded_processor, photo, untrained_yolo):
    processor = DCLIPProcessor(
        image_processor=embedded_processor.image_processor,
        tokenizer=embedded_processor.tokenizer,
        region_config=YoloRegionExtractor(untrained_yolo, conf=0.99, imgsz=64).to_dict(),
    )
    batch = processor(images=[photo, photo.convert("L")], regions=True)
    assert batch["region_mask"].tolist() == [[1], [1]]
    torch.testing.assert_close(batch["region_pixel_values"][:, 0], batch["pixel_values"])


def test_missing_yolo_weights_name_the_file_and_alternatives(embedded_processor, photo, tmp_path):
    pytest.importorskip("ultralytics", reason="YOLO regions need the `yolo` extra")
    processor = DCLIPProcessor(
        image_processor=embedded_processor.image_processor,
        tokenizer=embedded_processor.tokenizer,
        region_config={"type": "yolo", "weights": str(tmp_path / "nowhere" / "yolov8x.pt")},
    )
    with pytest.raises(FileNotFoundError, match=r"yolov8x\.pt.*GridRegionExtractor"):
        processor(images=photo, regions=True)
    # Everything that does not need regions still works.
    assert processor(images=photo, text="a cat")["pixel_values"].shape == (1, 3, 224, 224)


def test_lazily_opened_and_undecoded_truncated_images_are_named(embedded_processor, photo, tmp_path):
    good = tmp_path / "good.jpg"
    photo.save(good)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    # Image.open reads only the header: the truncation shows when the pixels are read, here inside the processor.
    with pytest.raises(ValueError, match=r"images\[1\] \(.*cut\.jpg\): not a readable image.*truncated"):
        embedded_processor(images=[Image.open(good), Image.open(truncated)])
    # A datasets image column left undecoded (datasets.Image(decode=False)) gives {"path", "bytes"}.
    undecoded = {"path": "photos/cut.jpg", "bytes": truncated.read_bytes()}
    with pytest.raises(ValueError, match=r"images\[0\] \(photos/cut\.jpg\): not a readable image"):
        embedded_processor(images=[undecoded])
    assert embedded_processor(images={"path": None, "bytes": good.read_bytes()})["pixel_values"].shape[0] == 1


def _tiny_clip_text_student(max_positions: int) -> DCLIPModel:
    return tiny_student(projection_dim=8, text_pooling=None, max_position_embeddings=max_positions)[0]


def test_captions_are_cut_to_the_text_towers_positions_whatever_the_tokenizer_says(embedded_processor, tmp_path):
    """A CLIP-like text tower with 24 positions and a tokenizer without a model_max_length (as some CLIP
    tokenizers are saved): the processor saved beside the model cuts captions to 24 tokens."""
    model = _tiny_clip_text_student(max_positions=24)
    tokenizer = copy.deepcopy(embedded_processor.tokenizer)
    tokenizer.model_max_length = int(1e30)  # transformers' VERY_LARGE_INTEGER: "no limit known"
    processor = DCLIPProcessor(image_processor=embedded_processor.image_processor, tokenizer=tokenizer)
    long_caption = "a cat sitting on a mat " * 40
    unsafe = processor(text=[long_caption])
    assert unsafe["input_ids"].shape[1] > 24  # the negative control: more tokens than the tower has positions
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.get_text_features(**unsafe)

    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    for reloaded in (
        DCLIPProcessor.from_pretrained(tmp_path / "model"),
        AutoProcessor.from_pretrained(tmp_path / "model"),
    ):
        assert reloaded.tokenizer.model_max_length > 10**6 and reloaded.max_text_length == 24
        batch = reloaded(text=[long_caption, "a cat"], max_length=100)  # a larger max_length is capped too
        assert batch["input_ids"].shape[1] == 24
        with torch.no_grad():
            assert model.get_text_features(**batch).pooler_output.shape == (2, 8)


def test_from_vision_text_pretrained_records_the_text_towers_positions(embedded_processor, tiny_clip, tmp_path):
    assert embedded_processor.text_position_limit == 512  # all-MiniLM-L6-v2's BERT positions
    tiny_clip.save_pretrained(tmp_path / "clip")
    embedded_processor.tokenizer.save_pretrained(tmp_path / "clip")
    embedded_processor.image_processor.save_pretrained(tmp_path / "clip")
    processor = DCLIPProcessor.from_vision_text_pretrained(str(tmp_path / "clip"), str(tmp_path / "clip"))
    assert processor.text_position_limit == tiny_clip.config.text_config.max_position_embeddings == 32
    assert processor(text=["a cat sitting on a mat " * 40])["input_ids"].shape[1] == 32
