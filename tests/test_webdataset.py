"""`wds:` dataset specs: webdataset tar shards written here (real photos as JPEG, generated PNGs), read whole and
streamed through `datasets`, with a corrupt image and a key without a caption named by shard and key."""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from modeling_dclip.data.formats import load_webdataset
from modeling_dclip.data.formats.webdataset import expand_shards
from modeling_dclip.data.spec import DatasetSpec, load_dataset_spec
from modeling_dclip.training.data import load_split

CANONICAL_COLUMNS = ["image", "captions", "image_id", "split"]


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    """Keep the Arrow caches that `datasets.load_dataset` writes out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=image_format)
    return buffer.getvalue()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar shard as img2dataset writes it: each key's members one after another."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def metadata(key: str, caption: str | None = None) -> bytes:
    """img2dataset's per-key .json (its `caption` duplicates the .txt)."""
    return json.dumps({"key": key, "status": "success", "width": 64, "height": 48, "caption": caption}).encode()


@pytest.fixture
def shards(tmp_path, sample_photos) -> Path:
    """Two shards: real photos as JPEG with .txt captions, and a PNG whose caption is only in its .json."""
    photos = list(sample_photos.values())
    write_shard(
        tmp_path / "shards" / "00000.tar",
        [
            ("000000000", {"jpg": encoded(photos[0], "JPEG"), "txt": b"a cat", "json": metadata("000000000", "a cat")}),
            (
                "000000001",
                {"jpg": encoded(photos[1], "JPEG"), "txt": b"a cup of coffee ", "json": metadata("000000001")},
            ),
        ],
    )
    png = Image.fromarray(np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3))
    write_shard(
        tmp_path / "shards" / "00001.tar",
        [
            ("000010000", {"jpg": encoded(photos[2], "JPEG"), "txt": b"an astronaut"}),
            ("000010001", {"png": encoded(png, "PNG"), "json": metadata("000010001", "a colour ramp")}),
        ],
    )
    return tmp_path / "shards"


def test_shards_load_whole_into_the_canonical_schema(shards, sample_photos):
    dataset = load_dataset_spec(f"wds:{shards}/{{00000..00001}}.tar?split=val")
    assert isinstance(dataset, datasets.Dataset)
    assert dataset.column_names == CANONICAL_COLUMNS
    assert isinstance(dataset.features["image"], datasets.Image)
    assert dataset["image_id"][:] == ["000000000", "000000001", "000010000", "000010001"]
    assert dataset["captions"][:] == [["a cat"], ["a cup of coffee"], ["an astronaut"], ["a colour ramp"]]
    assert set(dataset["split"]) == {"val"}
    photo = sample_photos["chelsea"]
    assert dataset[0]["image"].size == photo.size
    # PNG is lossless: the pixels come back exactly.
    expected = np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3)
    assert np.array_equal(np.asarray(dataset[3]["image"]), expected)

    # A folder, a glob and the brace pattern name the same shards, in order.
    assert (
        expand_shards(str(shards))
        == expand_shards(f"{shards}/*.tar")
        == expand_shards(f"{shards}/{{00000..00001}}.tar")
    )
    spec = DatasetSpec.parse(f"wds:{shards}/{{00000..00001}}.tar?skip_missing=true&streaming=false")
    assert DatasetSpec.parse(str(spec)) == spec and spec.options == {"skip_missing": True, "streaming": False}
    # What the stage trainers read: the rows of one split.
    assert load_split(str(spec), "train")["image_id"][:] == dataset["image_id"][:]
    limited, report = DatasetSpec.parse(f"wds:{shards}?limit=3").load()
    assert len(limited) == 3 and report.num_images == 3 and report.num_captions == 3
    assert set(limited["split"]) == {"train"}


def test_streaming_gives_the_same_rows_shard_by_shard(shards):
    whole = load_dataset_spec(f"wds:{shards}/{{00000..00001}}.tar")
    stream = load_dataset_spec(f"wds:{shards}/{{00000..00001}}.tar?streaming=true")
    assert isinstance(stream, datasets.IterableDataset)
    assert stream.n_shards == 2
    rows = list(stream)
    assert [row["image_id"] for row in rows] == whole["image_id"][:]
    assert [row["captions"] for row in rows] == whole["captions"][:]
    assert [row["image"].size for row in rows] == [image.size for image in whole["image"]]
    assert all(row["split"] == "train" for row in rows)
    assert len(list(load_dataset_spec(f"wds:{shards}?streaming=true&limit=3"))) == 3


def test_corrupt_image_and_missing_caption_name_the_shard_and_the_key(shards, caplog):
    good = Image.new("RGB", (16, 16), (10, 200, 10))
    bad_shard = write_shard(
        shards / "00002.tar",
        [
            ("000020000", {"jpg": b"these bytes are not a JPEG", "txt": b"a broken photo"}),
            ("000020001", {"jpg": encoded(good, "JPEG"), "json": metadata("000020001")}),  # no caption anywhere
            ("000020002", {"jpg": encoded(good, "JPEG"), "txt": b"a green square"}),
        ],
    )
    with pytest.raises(ValueError) as error:
        load_webdataset(f"{shards}/{{00000..00002}}.tar")
    assert f"{bad_shard}: key '000020000'" in str(error.value) and "not a readable image" in str(error.value)
    assert "skip_missing" in str(error.value)
    with caplog.at_level(logging.WARNING):
        dataset, report = load_webdataset(f"{shards}/{{00000..00002}}.tar", skip_missing=True)
    assert dataset["image_id"][-1] == "000020002" and len(dataset) == 5
    assert len(report.unreadable_images) == 1 and report.unreadable_images[0].startswith(
        f"{bad_shard}: key '000020000'"
    )
    assert report.uncaptioned_images == [f"{bad_shard}: key '000020001'"]
    assert "000020001" in caplog.text

    only_uncaptioned = write_shard(shards.parent / "other" / "00000.tar", [("k1", {"png": encoded(good, "PNG")})])
    with pytest.raises(ValueError, match=re.escape(f"no non-empty caption: \"{only_uncaptioned}: key 'k1'\"")):
        load_webdataset(only_uncaptioned)

    with pytest.raises(ValueError, match=re.escape(f"{bad_shard}: key '000020000': not a readable image")):
        list(load_webdataset(f"{shards}/{{00000..00002}}.tar", streaming=True)[0])
    streamed, _ = load_webdataset(f"{shards}/{{00000..00002}}.tar", streaming=True, skip_missing=True)
    assert [row["image_id"] for row in streamed] == dataset["image_id"][:]


def test_missing_or_malformed_shards_are_named(shards):
    with pytest.raises(FileNotFoundError, match=r"6 of 8 shard\(s\) not found: .*00002.tar.*\(1 more\)"):
        load_dataset_spec(f"wds:{shards}/{{00000..00007}}.tar")
    (shards / "notes.tar").write_text("not a tar archive")
    with pytest.raises(ValueError, match=r"notes.tar is not a tar archive"):
        load_dataset_spec(f"wds:{shards / 'notes.tar'}")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        load_dataset_spec(f"wds:{shards}/*.tgz")
