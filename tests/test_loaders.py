"""Dataset readers and dataset specs, on small files written here and on the shared real data."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import pytest
from conftest import SHARED_DATA
from PIL import Image

from modeling_dclip.data.formats import (
    load_caption_table,
    load_caption_tsv,
    load_coco_captions,
    load_flickr30k_csv,
    load_hub_dataset,
    load_image_folder,
    load_karpathy,
)
from modeling_dclip.data.spec import DatasetSpec, load_dataset_spec

FLICKR8K_1K = SHARED_DATA / "flickr8k-1k"
CIFAR10_TEST = SHARED_DATA / "cifar10-test"
CANONICAL_COLUMNS = ["image", "captions", "image_id", "split"]


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    """Keep the Arrow caches that `datasets.load_dataset` writes out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def write_image(path: Path, size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def stored_paths(dataset: datasets.Dataset) -> list[str]:
    """Paths held by the `image` column, read from Arrow without decoding anything."""
    return pc.struct_field(dataset.data.column("image"), "path").to_pylist()


def write_karpathy(tmp_path: Path, entries: list[dict]) -> Path:
    path = tmp_path / "dataset_test.json"
    path.write_text(json.dumps({"dataset": "test", "images": entries}))
    return path


def karpathy_entry(filename: str, split: str, captions: list[str], **extra) -> dict:
    sentences = [{"raw": caption, "tokens": caption.lower().split()} for caption in captions]
    return {"filename": filename, "imgid": 0, "split": split, "sentences": sentences, **extra}


# ---------------------------------------------------------------- Karpathy


def test_karpathy_reads_splits_captions_and_ids_without_decoding(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        write_image(tmp_path / "images" / name)
    path = write_karpathy(
        tmp_path,
        [
            karpathy_entry("a.jpg", "train", ["A red square .", "  a red block  "]),
            karpathy_entry("b.jpg", "test", ["A red thing ."]),
            karpathy_entry("c.jpg", "val", ["Another ."]),
        ],
    )
    dataset, report = load_karpathy(path)
    assert dataset.column_names == CANONICAL_COLUMNS
    assert isinstance(dataset.features["image"], datasets.Image)
    assert dataset["image_id"][:] == ["a", "b", "c"]
    assert dataset["split"][:] == ["train", "test", "val"]
    assert dataset[0]["captions"] == ["A red square .", "a red block"]
    assert stored_paths(dataset) == [str(tmp_path / "images" / name) for name in ("a.jpg", "b.jpg", "c.jpg")]
    assert dataset.data.column("image").combine_chunks().field("bytes").null_count == 3  # paths only, lazy
    assert dataset[1]["image"].size == (40, 30)
    assert (report.num_images, report.num_captions, report.num_dropped) == (3, 4, 0)

    test_only, _ = load_karpathy(path, split="test")
    assert test_only["image_id"][:] == ["b"]
    two_splits, _ = load_karpathy(path, split="train,val")
    assert two_splits["image_id"][:] == ["a", "c"]
    with pytest.raises(ValueError, match="splits present"):
        load_karpathy(path, split="restval")


def test_karpathy_coco_layout_restval_tokens_and_instances(tmp_path):
    write_image(tmp_path / "coco" / "val2014" / "COCO_val2014_1.jpg", size=(100, 50))
    write_image(tmp_path / "coco" / "train2014" / "COCO_train2014_2.jpg", size=(100, 50))
    restval = karpathy_entry("COCO_val2014_1.jpg", "restval", ["ignored"], filepath="val2014", cocoid=1)
    restval["sentences"] = [{"tokens": ["a", "dog", "runs"]}]  # no "raw": rebuilt from tokens
    path = write_karpathy(
        tmp_path,
        [
            restval,
            karpathy_entry("COCO_train2014_2.jpg", "train", ["Two cats ."], filepath="train2014", cocoid=2),
        ],
    )
    instances = tmp_path / "instances.json"
    instances.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "width": 100, "height": 50}, {"id": 2, "width": 100, "height": 50}],
                "categories": [{"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}],
                "annotations": [{"image_id": 1, "category_id": 18, "bbox": [10, 5, 50, 20], "iscrowd": 0}],
            }
        )
    )
    dataset, _ = load_karpathy(path, images=tmp_path / "coco", split="train", instances=instances)
    assert dataset["image_id"][:] == ["1", "2"]
    assert dataset["split"][:] == ["train", "train"]
    assert dataset[0]["captions"] == ["a dog runs"]
    assert dataset.features["labels"].feature.names == ["cat", "dog"]
    np.testing.assert_allclose(dataset[0]["boxes"], [[0.1, 0.1, 0.6, 0.5]], rtol=1e-6)
    assert dataset[0]["labels"] == [1]
    assert dataset[1]["boxes"] == [] and dataset[1]["labels"] == []

    kept_apart, _ = load_karpathy(path, images=tmp_path / "coco", restval_as_train=False)
    assert kept_apart["split"][:] == ["restval", "train"]


def test_karpathy_directory_needs_exactly_one_split_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset_\\*.json"):
        load_karpathy(tmp_path)


def test_missing_images_raise_with_count_and_paths_or_are_skipped_and_reported(tmp_path, caplog):
    write_image(tmp_path / "images" / "present.jpg")
    path = write_karpathy(
        tmp_path,
        [
            karpathy_entry("gone1.jpg", "test", ["x"]),
            karpathy_entry("present.jpg", "test", ["a caption"]),
            karpathy_entry("gone2.jpg", "test", ["y"]),
        ],
    )
    with pytest.raises(FileNotFoundError) as error:
        load_karpathy(path)
    assert "2 image file(s) not found" in str(error.value)
    assert str(tmp_path / "images" / "gone1.jpg") in str(error.value)
    assert "skip_missing" in str(error.value)

    with caplog.at_level(logging.WARNING):
        dataset, report = load_karpathy(path, skip_missing=True)
    assert dataset["image_id"][:] == ["present"]
    assert report.missing_images == [str(tmp_path / "images" / name) for name in ("gone1.jpg", "gone2.jpg")]
    assert "2 missing images dropped" in report.summary()
    assert "gone1.jpg" in caplog.text


def test_empty_captions_dropped_with_warning_and_uncaptioned_image_is_an_error(tmp_path, caplog):
    for name in ("a.jpg", "b.jpg"):
        write_image(tmp_path / "images" / name)
    path = write_karpathy(
        tmp_path,
        [
            karpathy_entry("a.jpg", "test", ["fine", "   ", ""]),
            karpathy_entry("b.jpg", "test", [" \t"]),
        ],
    )
    with pytest.raises(ValueError, match="1 image\\(s\\) have no non-empty caption: 'b'"):
        load_karpathy(path)
    with caplog.at_level(logging.WARNING):
        dataset, report = load_karpathy(path, skip_missing=True)
    assert dataset["captions"][:] == [["fine"]]
    assert report.uncaptioned_images == ["b"]
    assert report.empty_captions_dropped == 3
    assert "dropped 3 empty or whitespace-only captions" in caplog.text


def test_karpathy_malformed_entry_names_file_and_field(tmp_path):
    path = write_karpathy(tmp_path, [{"split": "test", "sentences": []}])
    with pytest.raises(ValueError, match=r"dataset_test.json: images\[0\]: missing field 'filename'"):
        load_karpathy(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_karpathy(path)


def test_duplicate_image_ids_are_an_error(tmp_path):
    write_image(tmp_path / "images" / "a.jpg")
    path = write_karpathy(tmp_path, [karpathy_entry("a.jpg", "test", ["x"]), karpathy_entry("a.jpg", "test", ["y"])])
    with pytest.raises(ValueError, match="image_id 'a' appears twice"):
        load_karpathy(path)


@pytest.mark.skipif(not FLICKR8K_1K.is_dir(), reason=f"shared real data absent: {FLICKR8K_1K}")
def test_real_flickr8k_1k_loads_quickly_from_a_bare_folder_spec():
    start = time.perf_counter()
    dataset = load_dataset_spec(str(FLICKR8K_1K))
    elapsed = time.perf_counter() - start
    assert len(dataset) == 1000
    assert sum(len(captions) for captions in dataset["captions"]) == 5000
    splits = dataset["split"][:]
    assert {name: splits.count(name) for name in set(splits)} == {"train": 762, "val": 113, "test": 125}
    assert elapsed < 3.0, f"loading 1,000 images took {elapsed:.2f} s"
    assert dataset[0]["image"].mode == "RGB"

    test_split = load_dataset_spec(f"karpathy:{FLICKR8K_1K / 'dataset_flickr8k_1k.json'}?split=test")
    assert len(test_split) == 125 and set(test_split["split"]) == {"test"}


# ---------------------------------------------------------------- COCO captions + instances


def test_coco_captions_with_instances_and_standard_layout(tmp_path):
    write_image(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg", size=(200, 100))
    write_image(tmp_path / "val2014" / "COCO_val2014_000000000073.jpg", size=(200, 100))
    annotations_dir = tmp_path / "annotations"
    annotations_dir.mkdir()
    images = [
        {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "width": 200, "height": 100},
        {"id": 73, "file_name": "COCO_val2014_000000000073.jpg", "width": 200, "height": 100},
    ]
    (annotations_dir / "captions_val2014.json").write_text(
        json.dumps(
            {
                "images": images,
                "annotations": [
                    {"id": 1, "image_id": 42, "caption": "A person rides a bike."},
                    {"id": 2, "image_id": 73, "caption": "A bus."},
                    {"id": 3, "image_id": 42, "caption": "Someone on a bicycle."},
                ],
            }
        )
    )
    (annotations_dir / "instances_val2014.json").write_text(
        json.dumps(
            {
                "images": images,
                "categories": [{"id": 2, "name": "bicycle"}, {"id": 1, "name": "person"}, {"id": 6, "name": "bus"}],
                "annotations": [
                    {"id": 10, "image_id": 42, "category_id": 1, "bbox": [20, 10, 40, 60], "iscrowd": 0},
                    {"id": 11, "image_id": 42, "category_id": 2, "bbox": [150, 50, 100, 80], "iscrowd": 0},  # overflows
                    {"id": 12, "image_id": 42, "category_id": 1, "bbox": [0, 0, 200, 100], "iscrowd": 1},  # crowd
                    {"id": 13, "image_id": 73, "category_id": 6, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # empty
                ],
            }
        )
    )
    dataset, report = load_coco_captions(
        annotations_dir / "captions_val2014.json", instances=annotations_dir / "instances_val2014.json"
    )
    assert dataset.column_names == CANONICAL_COLUMNS + ["boxes", "labels"]
    assert dataset["image_id"][:] == ["42", "73"]
    assert dataset["split"][:] == ["val", "val"]
    assert dataset[0]["captions"] == ["A person rides a bike.", "Someone on a bicycle."]
    assert dataset.features["labels"].feature.names == ["person", "bicycle", "bus"]
    assert dataset[0]["labels"] == [0, 1]
    np.testing.assert_allclose(dataset[0]["boxes"], [[0.1, 0.1, 0.3, 0.7], [0.75, 0.5, 1.0, 1.0]], rtol=1e-6)
    assert dataset[1]["boxes"] == [] and dataset[1]["labels"] == []
    assert report.num_captions == 3

    plain, _ = load_coco_captions(annotations_dir / "captions_val2014.json", split="test")
    assert plain.column_names == CANONICAL_COLUMNS and plain["split"][:] == ["test", "test"]


def test_coco_annotation_for_unknown_image_names_the_annotation(tmp_path):
    path = tmp_path / "captions_train2017.json"
    path.write_text(json.dumps({"images": [], "annotations": [{"image_id": 5, "caption": "x"}]}))
    with pytest.raises(ValueError, match=r"annotations\[0\]: image_id 5 is not among the file's images"):
        load_coco_captions(path, images=tmp_path)


# ---------------------------------------------------------------- Flickr30k CSV, TSV, JSONL / CSV tables


def test_flickr30k_pipe_results_csv_including_the_broken_kaggle_row(tmp_path):
    image_dir = tmp_path / "flickr30k_images"
    for name in ("1000092795.jpg", "2199200615.jpg"):
        write_image(image_dir / name)
    csv_path = tmp_path / "results.csv"
    csv_path.write_text(
        "image_name| comment_number| comment\n"
        "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands .\n"
        "1000092795.jpg| 1| Two young , White males are outside near many bushes .\n"
        "2199200615.jpg| 4 A dog runs across the grass .\n"
        "2199200615.jpg| 3| A dog | with a pipe in its caption .\n"
    )
    dataset, _ = load_flickr30k_csv(csv_path)
    assert dataset["image_id"][:] == ["1000092795", "2199200615"]
    assert dataset[0]["captions"][1] == "Two young , White males are outside near many bushes ."
    assert dataset[1]["captions"] == ["A dog runs across the grass .", "A dog | with a pipe in its caption ."]
    assert set(dataset["split"]) == {"train"}


@pytest.mark.parametrize("header", ["image_name,comment_number,comment", "image,caption"])
def test_flickr30k_comma_csv(tmp_path, header):
    write_image(tmp_path / "images" / "1.jpg")
    number = ",0" if "comment_number" in header else ""
    (tmp_path / "captions.csv").write_text(f'{header}\n1.jpg{number},"A man, a plan."\n1.jpg{number},Second one\n')
    dataset, _ = load_flickr30k_csv(tmp_path / "captions.csv", split="test")
    assert dataset[0]["captions"] == ["A man, a plan.", "Second one"]
    assert dataset["split"][:] == ["test"]


def test_caption_tsv_groups_images_and_counts_urls_as_missing(tmp_path):
    write_image(tmp_path / "img" / "0.jpg")
    write_image(tmp_path / "img" / "1.jpg")
    (tmp_path / "cc.tsv").write_text(
        "a cat on a mat\timg/0.jpg\n"
        "a dog in fog\thttps://example.com/2.jpg\n"
        "a cat, sitting\timg/0.jpg\n"
        "a bird\timg/1.jpg\n"
    )
    with pytest.raises(FileNotFoundError, match="https://example.com/2.jpg"):
        load_caption_tsv(tmp_path / "cc.tsv")
    dataset, report = load_caption_tsv(tmp_path / "cc.tsv", skip_missing=True)
    assert dataset["image_id"][:] == ["img/0", "img/1"]
    assert dataset[0]["captions"] == ["a cat on a mat", "a cat, sitting"]
    assert report.missing_images == ["https://example.com/2.jpg"]
    (tmp_path / "bad.tsv").write_text("only one field\n")
    with pytest.raises(ValueError, match="bad.tsv: row 0: expected 'caption<TAB>image'"):
        load_caption_tsv(tmp_path / "bad.tsv")


def test_jsonl_table_one_row_per_caption_or_per_image_with_split_column(tmp_path):
    for name in ("p.png", "q.png", "r.png"):
        write_image(tmp_path / name)
    rows = [
        {"file": "p.png", "text": "first of p", "split": "train"},
        {"file": "q.png", "text": ["q one", "q two"], "split": "test"},
        {"file": "p.png", "text": "second of p", "split": "train"},
        {"file": "r.png", "text": [{"raw": "r as karpathy"}], "split": "test"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    dataset, _ = load_caption_table(path, image_column="file", caption_column="text")
    assert dataset["image_id"][:] == ["p", "q", "r"]
    assert dataset["captions"][:] == [["first of p", "second of p"], ["q one", "q two"], ["r as karpathy"]]
    assert dataset["split"][:] == ["train", "test", "test"]
    test_only, _ = load_caption_table(path, image_column="file", caption_column="text", split="test")
    assert test_only["image_id"][:] == ["q", "r"]

    with pytest.raises(ValueError, match=r"no image column among \['file', 'text', 'split'\]; set image_column="):
        load_caption_table(path)
    path.write_text('{"file": "p.png", "text": 3}\n')
    with pytest.raises(ValueError, match="pairs.jsonl: row 0: a caption must be a string"):
        load_caption_table(path, image_column="file", caption_column="text")


def test_csv_table_with_default_columns_ids_and_tab_delimiter(tmp_path):
    write_image(tmp_path / "data" / "x.jpg")
    (tmp_path / "t.csv").write_text("image_path;caption;key\ndata/x.jpg;hello there;X1\ndata/x.jpg;  ;X1\n")
    dataset, report = load_caption_table(tmp_path / "t.csv", delimiter=";", image_id_column="key", split="val")
    assert dataset[0]["captions"] == ["hello there"] and dataset[0]["image_id"] == "X1"
    assert dataset[0]["split"] == "val" and report.empty_captions_dropped == 1
    (tmp_path / "t.tsv").write_text("image\tcaption\ndata/x.jpg\tvia tsv\n")
    tab_separated, _ = load_caption_table(tmp_path / "t.tsv", file_format="csv")
    assert tab_separated[0]["captions"] == ["via tsv"]


# ---------------------------------------------------------------- image folders


def write_class_folder(root: Path, classes=("cat", "dog"), per_class: int = 2) -> None:
    for index, name in enumerate(classes):
        for number in range(per_class):
            write_image(root / name / f"{number}.png", size=(8, 8), color=(index * 100, 0, 0))


def test_image_folder_gives_labels_class_name_captions_and_ids(tmp_path):
    write_class_folder(tmp_path / "classes")
    dataset, _ = load_image_folder(tmp_path / "classes", split="test")
    assert dataset.column_names == CANONICAL_COLUMNS + ["label"]
    assert dataset.features["label"].names == ["cat", "dog"]
    assert dataset["label"][:] == [0, 0, 1, 1]
    assert dataset["captions"][:] == [["cat"], ["cat"], ["dog"], ["dog"]]
    assert dataset["image_id"][:] == ["cat/0", "cat/1", "dog/0", "dog/1"]
    assert set(dataset["split"]) == {"test"}

    assert DatasetSpec.parse(str(tmp_path / "classes")).kind == "imagefolder"


def test_image_folder_with_split_subfolders(tmp_path):
    write_class_folder(tmp_path / "set" / "train", per_class=2)
    write_class_folder(tmp_path / "set" / "test", per_class=1)
    dataset, _ = load_image_folder(tmp_path / "set")
    assert sorted(dataset["split"]) == ["test"] * 2 + ["train"] * 4
    test_only = load_dataset_spec(f"imagefolder:{tmp_path / 'set'}?split=test")
    assert test_only["image_id"][:] == ["test/cat/0", "test/dog/0"] and test_only["label"][:] == [0, 1]
    with pytest.raises(ValueError, match="no split folder \\['val'\\]"):
        load_image_folder(tmp_path / "set", split="val")


@pytest.mark.skipif(not CIFAR10_TEST.is_dir(), reason=f"shared real data absent: {CIFAR10_TEST}")
def test_real_cifar10_test_folder():
    dataset = load_dataset_spec(f"imagefolder:{CIFAR10_TEST}?split=test&limit=5")
    assert len(dataset) == 5
    assert dataset.features["label"].names[:3] == ["airplane", "automobile", "bird"]
    assert dataset[0]["image"].size == (32, 32)


# ---------------------------------------------------------------- Hugging Face datasets
# The Hub is unreachable here, so the `hf` path is exercised with the local forms that
# `datasets` opens through the same calls: a `save_to_disk` folder and a local parquet file.


def test_hf_save_to_disk_folder_with_embedded_images_and_split_selection(tmp_path):
    image_files = [write_image(tmp_path / "src" / f"{i}.png", color=(i * 60, 0, 0)) for i in range(3)]
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "sentences": datasets.List(datasets.Value("string")),
            "img_id": datasets.Value("int64"),
        }
    )
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"img": [str(image_files[0])], "sentences": [["one"]], "img_id": [0]}, features=features
            ),
            "test": datasets.Dataset.from_dict(
                {"img": [str(f) for f in image_files[1:]], "sentences": [["two", " "], ["three"]], "img_id": [1, 2]},
                features=features,
            ),
        }
    )
    splits.save_to_disk(str(tmp_path / "saved"))
    for image_file in image_files:  # the saved copy embeds the bytes; originals are not needed
        image_file.unlink()

    dataset = load_dataset_spec(f"hf:{tmp_path / 'saved'}?split=test&image_column=img")
    assert dataset.column_names == CANONICAL_COLUMNS
    assert dataset["captions"][:] == [["two"], ["three"]]
    assert dataset["image_id"][:] == ["1", "2"]
    assert dataset["split"][:] == ["test", "test"]
    assert dataset[0]["image"].getpixel((0, 0)) == (60, 0, 0)

    everything, _ = load_hub_dataset(str(tmp_path / "saved"), image_column="img")
    assert everything["split"][:] == ["train", "test", "test"]
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_hub_dataset(str(tmp_path / "saved"), split="validation", image_column="img")


def test_hf_local_parquet_with_path_column_split_column_and_missing(tmp_path):
    write_image(tmp_path / "pics" / "a.jpg")
    write_image(tmp_path / "pics" / "b.jpg")
    datasets.Dataset.from_dict(
        {
            "filename": ["a.jpg", "b.jpg", "gone.jpg"],
            "caption": ["an a", "a b", "a gone"],
            "split": ["test", "train", "test"],
        }
    ).to_parquet(str(tmp_path / "flickr.parquet"))
    spec = f"hf:{tmp_path / 'flickr.parquet'}?split=test&split_column=split&images={tmp_path / 'pics'}"
    with pytest.raises(FileNotFoundError, match="1 image file\\(s\\) not found"):
        load_dataset_spec(spec)
    dataset, report = DatasetSpec.parse(spec + "&skip_missing=true").load()
    assert dataset["image_id"][:] == ["0"] and dataset["captions"][:] == [["an a"]]
    assert stored_paths(dataset) == [str(tmp_path / "pics" / "a.jpg")]
    assert report.missing_images == [str(tmp_path / "pics" / "gone.jpg")]


def test_hf_classification_dataset_by_label_column(tmp_path):
    image_files = [write_image(tmp_path / f"{i}.png") for i in range(2)]
    label_feature = datasets.ClassLabel(names=["apple", "bee"])
    features = datasets.Features({"image": datasets.Image(), "fine_label": label_feature})
    datasets.Dataset.from_dict(
        {"image": [str(f) for f in image_files], "fine_label": [1, 0]}, features=features
    ).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="set caption_column="):
        load_hub_dataset(str(tmp_path / "saved"))
    dataset, _ = load_hub_dataset(str(tmp_path / "saved"), label_column="fine_label", split="test")
    assert dataset.features["label"].names == ["apple", "bee"]
    assert dataset["label"][:] == [1, 0] and dataset["captions"][:] == [["bee"], ["apple"]]
    assert dataset["split"][:] == ["test", "test"]


# ---------------------------------------------------------------- specs


def test_spec_grammar_typed_options_and_round_trip():
    spec = DatasetSpec.parse(
        "karpathy:/d/dataset_coco.json?split=test,val&images=/d/im%26ages&skip_missing=yes&limit=7"
    )
    assert spec.kind == "karpathy" and spec.location == "/d/dataset_coco.json"
    assert spec.options == {"split": "test,val", "images": "/d/im&ages", "skip_missing": True, "limit": 7}
    assert DatasetSpec.parse(str(spec)) == spec
    assert "im%26ages" in str(spec)
    assert spec.to_dict() == {"kind": "karpathy", "path": "/d/dataset_coco.json", **spec.options}
    assert DatasetSpec.parse(spec.to_dict()) == spec

    hub = DatasetSpec.parse("hf:nlphuji/flickr30k?split=test&split_column=split&caption_column=caption")
    assert hub.location == "nlphuji/flickr30k"  # a Hub id is not turned into a path
    assert DatasetSpec.parse("synthetic:?n=12&seed=3").options == {"n": 12, "seed": 3}


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("karpathy:/x.json?splt=test", ValueError, "unknown option 'splt' for kind 'karpathy'"),
        ("karpathy:/x.json?limit=many", ValueError, "option limit='many' must be an integer"),
        ("coco:/x.json?skip_missing=perhaps", ValueError, "must be true or false"),
        ("karpathy:/x.json?split", ValueError, "is not NAME=VALUE"),
        ("karpathy:?split=test", ValueError, "needs a location"),
        ("imagefolder:/x?skip_missing=true", ValueError, "unknown option 'skip_missing'"),
        ("/no/such/dataset", FileNotFoundError, "does not start with a kind"),
        ({"path": "/x.json"}, ValueError, "needs a 'kind'"),
        ({"kind": "webdataset", "path": "/x"}, ValueError, "unknown dataset kind 'webdataset'"),
    ],
)
def test_bad_specs_are_clear_errors(spec, error, message):
    with pytest.raises(error, match=message):
        DatasetSpec.parse(spec)


def test_spec_files_resolve_relative_paths_against_their_folder(tmp_path):
    write_image(tmp_path / "imgs" / "a.jpg")
    write_karpathy(tmp_path, [karpathy_entry("a.jpg", "test", ["x"]), karpathy_entry("gone.jpg", "test", ["y"])])
    (tmp_path / "data.yaml").write_text("kind: karpathy\npath: dataset_test.json\nimages: imgs\nskip_missing: true\n")
    spec = DatasetSpec.parse(tmp_path / "data.yaml")
    assert spec.location == str(tmp_path / "dataset_test.json")
    assert spec.options == {"images": str(tmp_path / "imgs"), "skip_missing": True}
    assert load_dataset_spec(tmp_path / "data.yaml")["image_id"][:] == ["a"]
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        load_dataset_spec(tmp_path / "data.yaml", skip_missing=False)

    (tmp_path / "data.json").write_text(
        json.dumps({"kind": "karpathy", "path": "dataset_test.json", "images": "imgs", "skip_missing": True})
    )
    assert DatasetSpec.parse(str(tmp_path / "data.json")) == spec
    # A Karpathy split file given bare is recognised without a prefix.
    assert DatasetSpec.parse(str(tmp_path / "dataset_test.json")).kind == "karpathy"


def test_synthetic_spec_builds_scenes_with_boxes():
    pytest.importorskip("modeling_dclip.data.synthetic", reason="synthetic scenes module not written yet")
    dataset, report = DatasetSpec.parse("synthetic:?n=3&seed=1&split=test").load()
    assert len(dataset) == 3 and set(dataset["split"]) == {"test"}
    assert {"image", "captions", "image_id", "boxes", "labels"} <= set(dataset.column_names)
    assert report.num_images == 3


def test_every_caption_kind_loads_through_its_spec_string(tmp_path):
    write_image(tmp_path / "images" / "1.jpg")
    write_image(tmp_path / "val2014" / "1.jpg")
    (tmp_path / "results.csv").write_text("image_name| comment_number| comment\n1.jpg| 0| from flickr30k\n")
    (tmp_path / "cc.tsv").write_text("from tsv\timages/1.jpg\n")
    (tmp_path / "t.jsonl").write_text('{"image": "images/1.jpg", "text": "from jsonl"}\n')
    (tmp_path / "t.csv").write_text("path,caption\nimages/1.jpg,from csv\n")
    (tmp_path / "captions_val2014.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "1.jpg"}],
                "annotations": [{"image_id": 1, "caption": "from coco"}],
            }
        )
    )
    specs = {
        f"flickr30k:{tmp_path / 'results.csv'}": "from flickr30k",
        f"tsv:{tmp_path / 'cc.tsv'}": "from tsv",
        f"jsonl:{tmp_path / 't.jsonl'}?image_column=image&caption_column=text&split=test": "from jsonl",
        f"csv:{tmp_path / 't.csv'}?split=test": "from csv",
        f"coco:{tmp_path / 'captions_val2014.json'}": "from coco",
    }
    for spec, caption in specs.items():
        dataset = load_dataset_spec(spec)
        assert dataset.column_names[:4] == CANONICAL_COLUMNS, spec
        assert dataset[0]["captions"] == [caption], spec
        assert dataset[0]["image"].size == (40, 30), spec
