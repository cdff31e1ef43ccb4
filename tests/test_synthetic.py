"""Synthetic compositional scenes: determinism, exact boxes, true captions, one-swap false hard negatives,
zero-shot labels. Their YOLO export is tested in test_yolo_export.py."""

from __future__ import annotations

import re

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

from modeling_dclip.data.synthetic import (
    COLORS,
    MIN_RELATION_GAP,
    SHAPES,
    SIZES,
    SceneConfig,
    generate_scene,
    make_synthetic_dataset,
    make_synthetic_splits,
    scene_rng,
    zero_shot_prompts,
)

# An independent reading of the caption language, so that captions are checked against the image rather
# than against the generator's own bookkeeping.
SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}
RELATION_WORDS = {
    "to the left of": "left",
    "to the right of": "right",
    "left of": "left",
    "right of": "right",
    "above": "above",
    "over": "above",
    "below": "below",
    "under": "below",
}
POSITION_WORDS = {
    "on the left side of the image": "left",
    "on the right side of the image": "right",
    "in the upper part of the image": "above",
    "in the lower part of the image": "below",
    "in the middle of the image": "middle",
}
OPPOSITE_WORDS = {
    frozenset(pair) for pair in (("left", "right"), ("above", "below"), ("over", "under"), ("upper", "lower"))
}
BACKGROUND_WORDS = {"plain": "solid", "gradient": "gradient", "textured": "noise", "striped": "stripes"}
COUNT_WORDS = {"two": 2, "three": 3, "four": 4}

OBJECT = rf"(?:({'|'.join(SIZE_WORDS)}) )?({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
OBJECT_NO_GROUPS = re.sub(r"\((?!\?)", "(?:", OBJECT)
RELATION = re.compile(rf"{OBJECT} (?:is |sitting |placed )?({'|'.join(RELATION_WORDS)}) (?:an? |the ){OBJECT}")
POSITION = re.compile(rf"{OBJECT} ({'|'.join(POSITION_WORDS)})")


def _objects(row: dict) -> list[dict]:
    return [
        {"shape": SHAPES[label], "color": color, "size": size, "box": box}
        for label, color, size, box in zip(row["labels"], row["colors"], row["sizes"], row["boxes"])
    ]


def _center(obj: dict) -> tuple[float, float]:
    x1, y1, x2, y2 = obj["box"]
    return (x1 + x2) / 2, (y1 + y2) / 2


def _find(objects: list[dict], size: str | None, color: str, shape: str) -> dict | None:
    """The object a phrase names, or None when the phrase is false of the image."""
    for obj in objects:
        if obj["color"] == color and obj["shape"] == shape and (size is None or SIZE_WORDS[size] == obj["size"]):
            return obj
    return None


def _relation_holds(first: dict, second: dict, relation: str, margin: float) -> bool:
    (x1, y1), (x2, y2) = _center(first), _center(second)
    return {"left": x2 - x1, "right": x1 - x2, "above": y2 - y1, "below": y1 - y2}[relation] > margin


def _position_holds(obj: dict, position: str, margin: float) -> bool:
    x, y = _center(obj)
    if position == "middle":
        return abs(x - 0.5) < MIN_RELATION_GAP and abs(y - 0.5) < MIN_RELATION_GAP
    return {"left": 0.5 - x, "right": x - 0.5, "above": 0.5 - y, "below": y - 0.5}[position] > margin


def caption_is_true(caption: str, row: dict, margin: float = 0.0) -> bool:
    """Every named object exists with the named attributes, and the stated relation / position / count hold."""
    objects = _objects(row)
    for match in re.finditer(OBJECT, caption):
        if _find(objects, *match.groups()) is None:
            return False
    relations, positions = list(RELATION.finditer(caption)), list(POSITION.finditer(caption))
    assert len(relations) + len(positions) == 1, f"expected exactly one relation in {caption!r}"
    if relations:
        first_size, first_color, first_shape, words, size, color, shape = relations[0].groups()
        first, second = _find(objects, first_size, first_color, first_shape), _find(objects, size, color, shape)
        if not _relation_holds(first, second, RELATION_WORDS[words], margin):
            return False
    else:
        size, color, shape, words = positions[0].groups()
        if not _position_holds(_find(objects, size, color, shape), POSITION_WORDS[words], margin):
            return False
    count = re.search(rf"({'|'.join(COUNT_WORDS)}) shapes", caption)
    if count and COUNT_WORDS[count.group(1)] != len(objects):
        return False
    background = re.search(r"on an? (\w+) background", caption)
    return not background or BACKGROUND_WORDS[background.group(1)] == row["background"]


def swap_kind(caption: str, negative: str) -> str | None:
    """Which single swap turns `caption` into `negative`, or None if they differ otherwise."""
    # "a" / "an" follow the next word, so they are not part of a swap.
    caption, negative = (re.sub(r"\ban\b", "a", text) for text in (caption, negative))
    words, negative_words = caption.split(), negative.split()
    if len(words) == len(negative_words):
        changed = [(a, b) for a, b in zip(words, negative_words) if a != b]
        if len(changed) == 1:
            a, b = (word.strip(",") for word in changed[0])
            if a in COLORS and b in COLORS:
                return "color"
            if a in SIZE_WORDS and b in SIZE_WORDS and {a, b} in ({"small", "large"}, {"little", "big"}):
                return "size"
            if frozenset((a, b)) in OPPOSITE_WORDS:
                return "relation"
    phrases = re.findall(OBJECT_NO_GROUPS, caption)
    negative_phrases = re.findall(OBJECT_NO_GROUPS, negative)
    same_frame = re.sub(OBJECT_NO_GROUPS, "<object>", caption) == re.sub(OBJECT_NO_GROUPS, "<object>", negative)
    moved = [k for k, (a, b) in enumerate(zip(phrases, negative_phrases)) if a != b]
    if same_frame and len(moved) == 2:
        i, j = moved
        if phrases[i] == negative_phrases[j] and phrases[j] == negative_phrases[i]:
            return "swap"
    return None


@pytest.fixture(scope="module")
def scenes() -> Dataset:
    return make_synthetic_dataset(48, seed=7, split="train")


@pytest.fixture(scope="module")
def rows(scenes: Dataset) -> list[dict]:
    return list(scenes)


def test_same_seed_gives_identical_scenes_and_other_seeds_differ() -> None:
    first = make_synthetic_dataset(6, seed=11, split="train", image_size=96)
    again = make_synthetic_dataset(6, seed=11, split="train", image_size=96)
    other_seed = make_synthetic_dataset(6, seed=12, split="train", image_size=96)
    other_split = make_synthetic_dataset(6, seed=11, split="val", image_size=96)
    for index in range(6):
        pixels = np.asarray(first[index]["image"])
        assert np.array_equal(pixels, np.asarray(again[index]["image"]))
        for column in ("captions", "hard_negatives", "boxes", "labels", "colors", "sizes", "background"):
            assert first[index][column] == again[index][column]
        assert not np.array_equal(pixels, np.asarray(other_seed[index]["image"]))
        assert not np.array_equal(pixels, np.asarray(other_split[index]["image"]))
    assert first["captions"] != other_seed["captions"]
    # A row depends only on (seed, split, index): a longer dataset extends a shorter one.
    longer = make_synthetic_dataset(8, seed=11, split="train", image_size=96)
    assert longer[:6]["captions"] == first["captions"]
    scene = generate_scene(scene_rng(11, "train", 3), SceneConfig(image_size=96))
    assert np.array_equal(np.asarray(scene.image), np.asarray(first[3]["image"]))


def test_rows_follow_the_canonical_schema(scenes: Dataset, rows: list[dict]) -> None:
    assert scenes.features["label"].names == list(SHAPES)
    assert scenes.features["labels"].feature.names == list(SHAPES)
    assert len(SHAPES) >= 6 and len(COLORS) >= 8 and SIZES == ("small", "large")
    assert len(set(scenes["image_id"])) == len(scenes)
    for row in rows:
        assert row["image"].mode == "RGB" and row["image"].size == (224, 224)
        assert row["split"] == "train"
        assert 1 <= len(row["boxes"]) <= 4
        assert len(row["boxes"]) == len(row["labels"]) == len(row["colors"]) == len(row["sizes"])
        assert len(set(row["colors"])) == len(row["colors"])
        assert set(row["sizes"]) <= set(SIZES)
        assert len(row["captions"]) == len(set(row["captions"])) == 5
        assert len(row["hard_negatives"]) == 5
    # The sample covers the vocabulary and every background kind.
    assert {len(row["boxes"]) for row in rows} == {1, 2, 3, 4}
    assert {row["background"] for row in rows} == set(BACKGROUND_WORDS.values())


def test_boxes_are_exactly_the_extent_of_each_objects_pixels(rows: list[dict]) -> None:
    for row in rows:
        pixels = np.asarray(row["image"])
        size = pixels.shape[0]
        for box, color in zip(row["boxes"], row["colors"]):
            ys, xs = np.nonzero(np.all(pixels == COLORS[color], axis=-1))
            assert len(xs) > 0, f"{row['image_id']}: no {color} pixels"
            expected = [xs.min() / size, ys.min() / size, (xs.max() + 1) / size, (ys.max() + 1) / size]
            assert np.allclose(box, expected, atol=1e-6), (row["image_id"], color, box, expected)
            assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
        boxes = row["boxes"]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], "objects overlap"
        small = [max(b[2] - b[0], b[3] - b[1]) for b, s in zip(boxes, row["sizes"]) if s == "small"]
        large = [max(b[2] - b[0], b[3] - b[1]) for b, s in zip(boxes, row["sizes"]) if s == "large"]
        assert all(extent <= 0.21 for extent in small) and all(extent >= 0.25 for extent in large)


def test_captions_name_the_objects_and_state_a_clearly_true_relation(rows: list[dict]) -> None:
    for row in rows:
        for caption in row["captions"]:
            assert caption_is_true(caption, row, margin=MIN_RELATION_GAP - 1e-6), (row["image_id"], caption)
        # The first caption names every object (shape and colour).
        named = {(color, shape) for _, color, shape in re.findall(OBJECT, row["captions"][0])}
        assert named == {(obj["color"], obj["shape"]) for obj in _objects(row)}, row["captions"][0]


def test_hard_negatives_make_exactly_one_swap_and_are_false(rows: list[dict]) -> None:
    kinds = []
    for row in rows:
        for caption, negative in zip(row["captions"], row["hard_negatives"]):
            kind = swap_kind(caption, negative)
            assert kind is not None, f"{row['image_id']}: {caption!r} -> {negative!r} is not a single swap"
            assert not caption_is_true(negative, row), f"{row['image_id']}: negative {negative!r} is true"
            kinds.append(kind)
    assert set(kinds) == {"color", "size", "relation", "swap"}


def test_label_is_the_shape_of_the_largest_object(rows: list[dict]) -> None:
    for row in rows:
        size = row["image"].size[0]
        areas = [round((b[2] - b[0]) * size) * round((b[3] - b[1]) * size) for b in row["boxes"]]
        assert row["label"] == row["labels"][int(np.argmax(areas))]  # ties: the first object
    assert zero_shot_prompts() == [f"a photo of a {shape}" for shape in SHAPES]


def test_splits_use_disjoint_seeds() -> None:
    splits = make_synthetic_splits({"train": 4, "val": 3, "test": 3}, seed=5, image_size=64)
    assert isinstance(splits, DatasetDict) and list(splits) == ["train", "val", "test"]
    assert [len(splits[name]) for name in splits] == [4, 3, 3]
    assert splits["val"]["split"] == ["val"] * 3
    assert splits["train"]["captions"] == make_synthetic_dataset(4, seed=5, split="train", image_size=64)["captions"]
    images = [np.asarray(image).tobytes() for name in splits for image in splits[name]["image"]]
    assert len(set(images)) == len(images)


def test_bad_configuration_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="image_size"):
        SceneConfig(image_size=16)
    with pytest.raises(ValueError, match="max_objects"):
        SceneConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="small_size"):
        SceneConfig(small_size=(0.2, 0.35))
    with pytest.raises(ValueError, match="backgrounds"):
        SceneConfig(backgrounds=("plasma",))
    with pytest.raises(ValueError, match="seed"):
        make_synthetic_dataset(2, seed=-1)
