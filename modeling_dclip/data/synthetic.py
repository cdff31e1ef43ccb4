"""Synthetic compositional scenes: the embedded default dataset, generated offline from a seed.

Each image shows 1-4 flat shapes on a muted background (solid colour, gradient, smooth or blocky noise,
or stripes). Every object has

- a shape, which is its class (``SHAPES``; class id = index in ``SHAPES``),
- a colour from ``COLORS`` (colours are unique within an image, so "the red star" is never ambiguous),
- a size from ``SIZES`` (``"small"``: side 14-20% of the image, ``"large"``: 30-40%),
- an exact box: the tight pixel extent of the drawn shape, normalised xyxy in pixel-edge coordinates
  (``x2 = (last column + 1) / width``). Objects never overlap, so boxes are also the visible extent.

Every image has ``captions_per_image`` (default 5) distinct captions drawn from varied templates. Each
names objects by ``[size] colour shape`` and states one spatial relation that is true of the image:
``left of`` / ``right of`` / ``above`` / ``below`` between two objects, judged from box centres along
the axis where the centres are farther apart, and only used when that distance is at least
``MIN_RELATION_GAP`` of the image; a one-object image gets its position in the image instead (left /
right side, upper / lower part, middle). The first caption always names every object.

``hard_negatives[k]`` is the hard negative of ``captions[k]``: the same sentence with exactly one swap
that makes it false -- one object's colour (to a colour absent from the image), one object's size, the
relation word (left <-> right, above <-> below, over <-> under, upper <-> lower), or the two related
objects exchanged.

Zero-shot classification: ``label`` is the shape of the object with the largest box in pixels (ties: the
first listed), a ``ClassLabel`` over ``SHAPES``; prompt each class with ``ZERO_SHOT_TEMPLATE.format(shape)``,
i.e. "a photo of a star" (``zero_shot_prompts()`` lists them in class-id order).

Background pixels keep every channel in ``[70, 190]`` and every object colour has a channel outside that
range, so an object's pixels are exactly the pixels of its colour (images are stored as lossless PNG).
"""

from __future__ import annotations

import functools
import io
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from datasets import Sequence as ListFeature
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "pentagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 30),
    "green": (40, 170, 50),
    "cyan": (30, 210, 220),
    "blue": (30, 70, 220),
    "purple": (140, 50, 190),
    "pink": (250, 130, 200),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: tuple[str, ...] = ("solid", "gradient", "noise", "stripes")
ZERO_SHOT_TEMPLATE = "a photo of a {}"
MIN_RELATION_GAP = 0.1

# Captions use either word pair for the two sizes; a size swap stays inside the pair.
_SIZE_WORDS: tuple[dict[str, str], ...] = ({"small": "small", "large": "large"}, {"small": "little", "large": "big"})
# Synonyms share an index across opposite relations, so flipping a relation changes exactly one word.
_RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
_POSITION_WORDS: dict[str, str] = {
    "left": "on the left side of the image",
    "right": "on the right side of the image",
    "above": "in the upper part of the image",
    "below": "in the lower part of the image",
    "middle": "in the middle of the image",
}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_BACKGROUND_WORDS = {"solid": "plain", "gradient": "gradient", "noise": "textured", "stripes": "striped"}
_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
_PAIR_TEMPLATES = (
    "{A} {rel} {B}",
    "there is {A} {rel} {B}",
    "a picture of {A} {rel} {B}",
    "the {a} is {rel} the {b}",
    "{A} sitting {rel} {B} on a {background} background",
    "{count} shapes on a {background} background, with {A} {rel} {B}",
    "an image showing {A} placed {rel} {B}",
)
_SINGLE_TEMPLATES = (
    "{A} {rel}",
    "there is {A} {rel}",
    "a picture of {A} {rel}",
    "a single {a} {rel}",
    "{A} {rel}, on a {background} background",
    "one shape: {A} {rel}",
)
_REST_JOINERS = (", along with {rest}", ", together with {rest}", ", plus {rest}")

# Background channels stay inside this range; every object colour has a channel outside it.
_BACKGROUND_LOW, _BACKGROUND_HIGH = 70, 190


def _regular_polygon(sides: int, start_degrees: float) -> np.ndarray:
    angles = np.deg2rad(start_degrees + 360.0 * np.arange(sides) / sides)
    return np.stack([0.5 + 0.5 * np.cos(angles), 0.5 + 0.5 * np.sin(angles)], axis=1)


def _star(points: int = 5, inner_radius: float = 0.2) -> np.ndarray:
    angles = np.deg2rad(-90.0 + 180.0 * np.arange(2 * points) / points)
    radii = np.where(np.arange(2 * points) % 2 == 0, 0.5, inner_radius)
    return np.stack([0.5 + radii * np.cos(angles), 0.5 + radii * np.sin(angles)], axis=1)


def _upright(vertices: np.ndarray) -> np.ndarray:
    """Centre a polygon vertically in the unit square (regular polygons pointing up sit too high)."""
    offset = 0.5 - (vertices[:, 1].min() + vertices[:, 1].max()) / 2
    return vertices + np.array([0.0, offset])


# Vertices in the unit square, y pointing down; "circle" is drawn as an ellipse.
_SHAPE_VERTICES: dict[str, np.ndarray] = {
    "square": np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]),
    "triangle": _upright(np.array([[0.5, 0.0], [1.0, math.sqrt(3) / 2], [0.0, math.sqrt(3) / 2]])),
    "star": _upright(_star()),
    "diamond": np.array([[0.5, 0.0], [0.85, 0.5], [0.5, 1.0], [0.15, 0.5]]),
    "hexagon": _regular_polygon(6, 0.0),
    "cross": np.array(
        [[1, 0], [2, 0], [2, 1], [3, 1], [3, 2], [2, 2], [2, 3], [1, 3], [1, 2], [0, 2], [0, 1], [1, 1]], dtype=float
    )
    / 3.0,
    "pentagon": _upright(_regular_polygon(5, -90.0)),
}


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn and captioned.

    Args:
        image_size: side of the square RGB image in pixels.
        min_objects / max_objects: number of objects drawn per image (uniform); an object that finds no
            free place after `placement_tries` random positions is left out.
        small_size / large_size: range of an object's nominal side, as a fraction of `image_size`.
        captions_per_image: distinct captions (and hard negatives) per image.
        backgrounds: background kinds to draw from, a subset of `BACKGROUNDS`.
        placement_tries: random positions tried per object before it is left out.
    """

    image_size: int = 224
    min_objects: int = 1
    max_objects: int = 4
    small_size: tuple[float, float] = (0.14, 0.20)
    large_size: tuple[float, float] = (0.30, 0.40)
    captions_per_image: int = 5
    backgrounds: tuple[str, ...] = BACKGROUNDS
    placement_tries: int = 100

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"SceneConfig.image_size must be >= 32 pixels, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= max(_COUNT_WORDS):
            raise ValueError(
                f"SceneConfig needs 1 <= min_objects <= max_objects <= {max(_COUNT_WORDS)}, "
                f"got min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        for name in ("small_size", "large_size"):
            low, high = getattr(self, name)
            # Sides of at least MIN_RELATION_GAP keep every pair of non-overlapping objects clearly related.
            if not MIN_RELATION_GAP <= low <= high <= 0.5:
                raise ValueError(
                    f"SceneConfig.{name} must be a range inside [{MIN_RELATION_GAP}, 0.5], got {(low, high)}"
                )
        if self.small_size[1] >= self.large_size[0]:
            raise ValueError(
                f"SceneConfig.small_size {self.small_size} must lie below large_size {self.large_size} "
                "so that 'small' and 'large' stay distinguishable"
            )
        if not 1 <= self.captions_per_image <= 10:
            raise ValueError(f"SceneConfig.captions_per_image must be in [1, 10], got {self.captions_per_image}")
        unknown = set(self.backgrounds) - set(BACKGROUNDS)
        if not self.backgrounds or unknown:
            raise ValueError(
                f"SceneConfig.backgrounds must be a non-empty subset of {BACKGROUNDS}, got {self.backgrounds}"
            )


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape; `box` is normalised xyxy, tight around its pixels."""

    shape: str
    color: str
    size: str
    box: tuple[float, float, float, float]

    @property
    def center(self) -> tuple[float, float]:
        """Box centre (x, y), normalised."""
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    @property
    def area(self) -> float:
        """Box area as a fraction of the image."""
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclass(frozen=True)
class Scene:
    """A generated image with its objects, captions and aligned hard negatives."""

    image: Image.Image
    objects: tuple[SceneObject, ...]
    background: str
    captions: tuple[str, ...]
    hard_negatives: tuple[str, ...]

    @property
    def label(self) -> int:
        """Class id (index in `SHAPES`) of the object with the largest box in pixels (ties: the first one)."""
        width, height = self.image.size
        areas = [round(obj.area * width * height) for obj in self.objects]
        return SHAPES.index(self.objects[areas.index(max(areas))].shape)


@dataclass(frozen=True)
class _Statement:
    """A caption before wording: which objects it names and which relation it states."""

    template: str
    subject: int
    reference: int | None  # None: `relation` is the subject's position in the image
    relation: str
    wording: int
    size_words: int
    with_size: bool
    others: tuple[int, ...]
    rest_joiner: str


def _muted_color(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation mid-tone [3]: a grey in [90, 170] with each channel shifted by at most 20."""
    return rng.integers(90, 171) + rng.integers(-20, 21, size=3)


def _palette_image(indices: Image.Image, colors: np.ndarray) -> Image.Image:
    """Colour an "L" image of palette indices with `colors` [K, 3] (a C-level lookup, far cheaper than numpy)."""
    indices.putpalette(colors.astype(np.uint8).tobytes())
    return indices.convert("RGB")


def _draw_background(rng: np.random.Generator, kind: str, size: int) -> Image.Image:
    # Coarse grids upsampled bilinearly keep gradients and noise cheap, and bilinear weights are convex,
    # so channels stay inside the background range.
    if kind == "solid":
        return Image.new("RGB", (size, size), tuple(int(c) for c in _muted_color(rng)))
    if kind == "gradient":
        grid = np.linspace(0.0, 1.0, 16)
        angle = rng.uniform(0.0, 2 * math.pi)
        ramp = np.add.outer(math.sin(angle) * grid, math.cos(angle) * grid)
        ramp = np.rint(255 * (ramp - ramp.min()) / (ramp.max() - ramp.min())).astype(np.uint8)
        ramp_image = Image.fromarray(ramp, "L").resize((size, size), Image.Resampling.BILINEAR)
        start, end = _muted_color(rng), _muted_color(rng)
        return _palette_image(ramp_image, np.rint(start + np.linspace(0.0, 1.0, 256)[:, None] * (end - start)))
    if kind == "noise":
        cells = int(rng.choice([4, 8, 16]))
        coarse = np.clip(
            _muted_color(rng) + rng.integers(-30, 31, size=(cells, cells, 3)), _BACKGROUND_LOW, _BACKGROUND_HIGH
        )
        resample = Image.Resampling.BILINEAR if rng.random() < 0.5 else Image.Resampling.NEAREST
        return Image.fromarray(coarse.astype(np.uint8)).resize((size, size), resample)
    if kind == "stripes":
        half_period = int(rng.integers(4, 17))
        step_x, step_y = ((1, 0), (0, 1), (1, 1), (1, -1))[rng.integers(4)]
        coords = np.arange(size, dtype=np.int32)
        band = ((np.add.outer(coords * step_y, coords * step_x) // half_period) & 1).astype(np.uint8)
        return _palette_image(Image.fromarray(band, "L"), np.stack([_muted_color(rng), _muted_color(rng)]))
    raise ValueError(f"unknown background kind {kind!r}; expected one of {BACKGROUNDS}")


@functools.lru_cache(maxsize=4096)
def _shape_mask(shape: str, side: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Binary mask of `shape` drawn in a `side` x `side` square, and its tight bbox (x0, y0, x1, y1), x1 exclusive.

    Drawn without anti-aliasing so that the object's pixels carry exactly its colour.
    """
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((0, 0, side - 1, side - 1), fill=255)
    else:
        points = np.rint(_SHAPE_VERTICES[shape] * (side - 1)).astype(int)
        draw.polygon([tuple(point) for point in points.tolist()], fill=255)
    return mask, mask.getbbox()


def _place_squares(
    rng: np.random.Generator, sides: Sequence[int], image_size: int, tries: int
) -> list[tuple[int, int, int] | None]:
    """Top-left corners for squares of the given sides that keep a small gap between each other (None: no room)."""
    gap = max(1, round(0.02 * image_size))
    placed: list[tuple[int, int, int]] = []
    corners: list[tuple[int, int, int] | None] = []
    for side in sides:
        corner = None
        for x, y in rng.integers(0, image_size - side + 1, size=(tries, 2)).tolist():
            if all(
                x + side + gap <= px or px + ps + gap <= x or y + side + gap <= py or py + ps + gap <= y
                for px, py, ps in placed
            ):
                corner = (x, y, side)
                placed.append(corner)
                break
        corners.append(corner)
    return corners


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _render(
    statement: _Statement,
    objects: Sequence[SceneObject],
    background: str,
    color_override: Mapping[int, str] | None = None,
    size_override: Mapping[int, str] | None = None,
) -> str:
    color_override, size_override = color_override or {}, size_override or {}

    def phrase(index: int) -> str:
        obj = objects[index]
        words = [color_override.get(index, obj.color), obj.shape]
        if statement.with_size:
            words.insert(0, _SIZE_WORDS[statement.size_words][size_override.get(index, obj.size)])
        return " ".join(words)

    subject = phrase(statement.subject)
    if statement.reference is None:
        relation, reference = _POSITION_WORDS[statement.relation], ""
    else:
        relation, reference = _RELATION_WORDS[statement.relation][statement.wording], phrase(statement.reference)
    text = statement.template.format(
        A=_with_article(subject),
        a=subject,
        B=_with_article(reference) if reference else "",
        b=reference,
        rel=relation,
        count=_COUNT_WORDS.get(len(objects), str(len(objects))),
        background=_BACKGROUND_WORDS[background],
    )
    if statement.others:
        text += statement.rest_joiner.format(rest=_join([_with_article(phrase(i)) for i in statement.others]))
    return text


def _pair_relation(first: SceneObject, second: SceneObject) -> str | None:
    """Relation of `first` to `second` along the axis where their centres are farther apart, if clear enough."""
    dx = second.center[0] - first.center[0]
    dy = second.center[1] - first.center[1]
    if max(abs(dx), abs(dy)) < MIN_RELATION_GAP:
        return None
    if abs(dx) >= abs(dy):
        return "left" if dx > 0 else "right"
    return "above" if dy > 0 else "below"


def _position_in_image(obj: SceneObject) -> str:
    dx, dy = obj.center[0] - 0.5, obj.center[1] - 0.5
    if max(abs(dx), abs(dy)) < MIN_RELATION_GAP:
        return "middle"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _relation_candidates(objects: Sequence[SceneObject]) -> list[tuple[int, int | None, str]]:
    """(subject, reference, relation) triples that are clearly true; reference None: position in the image."""
    if len(objects) == 1:
        return [(0, None, _position_in_image(objects[0]))]
    return [
        (i, j, relation)
        for i in range(len(objects))
        for j in range(len(objects))
        if i != j and (relation := _pair_relation(objects[i], objects[j])) is not None
    ]


def _random_statement(
    rng: np.random.Generator,
    num_objects: int,
    candidates: Sequence[tuple[int, int | None, str]],
    name_all: bool,
) -> _Statement:
    size_words, with_size = int(rng.integers(len(_SIZE_WORDS))), bool(rng.random() < 0.75)
    wording = int(rng.integers(2))
    subject, reference, relation = candidates[rng.integers(len(candidates))]
    if reference is None:
        template = _SINGLE_TEMPLATES[rng.integers(len(_SINGLE_TEMPLATES))]
        return _Statement(template, subject, None, relation, wording, size_words, with_size, (), "")
    others: tuple[int, ...] = ()
    if name_all or rng.random() < 0.5:
        others = tuple(i for i in range(num_objects) if i not in (subject, reference))
    return _Statement(
        template=_PAIR_TEMPLATES[rng.integers(len(_PAIR_TEMPLATES))],
        subject=subject,
        reference=reference,
        relation=relation,
        wording=wording,
        size_words=size_words,
        with_size=with_size,
        others=others,
        rest_joiner=_REST_JOINERS[rng.integers(len(_REST_JOINERS))],
    )


def _hard_negative(
    rng: np.random.Generator, statement: _Statement, objects: Sequence[SceneObject], background: str
) -> str:
    """The statement with one swap that makes it false (see the module docstring)."""
    kinds = ["color"]
    if statement.with_size:
        kinds.append("size")
    if statement.relation != "middle":
        kinds.append("relation")
    if statement.reference is not None:
        kinds.append("swap")
    kind = kinds[rng.integers(len(kinds))]
    if kind == "relation":
        return _render(replace(statement, relation=_OPPOSITE[statement.relation]), objects, background)
    if kind == "swap":
        swapped = replace(statement, subject=statement.reference, reference=statement.subject)
        return _render(swapped, objects, background)
    named = [statement.subject] + ([statement.reference] if statement.reference is not None else [])
    named += list(statement.others)
    target = named[rng.integers(len(named))]
    if kind == "size":
        flipped = "large" if objects[target].size == "small" else "small"
        return _render(statement, objects, background, size_override={target: flipped})
    # Colours are unique within an image, so a colour absent from it names no object at all.
    absent = [color for color in COLORS if color not in {obj.color for obj in objects}]
    return _render(statement, objects, background, color_override={target: absent[rng.integers(len(absent))]})


def generate_scene(rng: np.random.Generator, config: SceneConfig | None = None) -> Scene:
    """Draw one scene, with its captions and hard negatives, from `rng` (the only source of randomness).

    Args:
        rng: numpy random generator; the same generator state always gives the same scene.
        config: drawing and captioning settings (defaults to `SceneConfig()`).

    Returns:
        `Scene` with an RGB `image` of `config.image_size` pixels, `objects` (each with its normalised xyxy
        box), `background` kind, `captions` and aligned `hard_negatives` (`config.captions_per_image` each).
    """
    config = config or SceneConfig()
    size = config.image_size
    background = config.backgrounds[rng.integers(len(config.backgrounds))]
    image = _draw_background(rng, background, size)

    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=count)]
    colors = [list(COLORS)[i] for i in rng.choice(len(COLORS), size=count, replace=False)]
    sizes = [SIZES[i] for i in rng.integers(len(SIZES), size=count)]
    sides = [
        max(8, round(rng.uniform(*(config.small_size if s == "small" else config.large_size)) * size)) for s in sizes
    ]
    objects = []
    for shape, color, size_name, corner in zip(
        shapes, colors, sizes, _place_squares(rng, sides, size, config.placement_tries)
    ):
        if corner is None:
            continue
        x, y, side = corner
        mask, (x0, y0, x1, y1) = _shape_mask(shape, side)
        image.paste(COLORS[color], (x, y, x + side, y + side), mask)
        box = ((x + x0) / size, (y + y0) / size, (x + x1) / size, (y + y1) / size)
        objects.append(SceneObject(shape, color, size_name, box))

    candidates = _relation_candidates(objects)
    captions: list[str] = []
    negatives: list[str] = []
    for _ in range(100 * config.captions_per_image):
        statement = _random_statement(rng, len(objects), candidates, name_all=not captions)
        caption = _render(statement, objects, background)
        if caption not in captions:
            captions.append(caption)
            negatives.append(_hard_negative(rng, statement, objects, background))
            if len(captions) == config.captions_per_image:
                break
    else:
        raise RuntimeError(f"could not phrase {config.captions_per_image} distinct captions for a scene")
    return Scene(image, tuple(objects), background, tuple(captions), tuple(negatives))


def synthetic_features() -> Features:
    """The `datasets.Features` of a synthetic scenes dataset (canonical schema plus object attributes)."""
    return Features(
        {
            "image": ImageFeature(),
            "captions": ListFeature(Value("string")),
            "image_id": Value("string"),
            "split": Value("string"),
            "boxes": ListFeature(ListFeature(Value("float32"), length=4)),
            "labels": ListFeature(ClassLabel(names=list(SHAPES))),
            "label": ClassLabel(names=list(SHAPES)),
            "hard_negatives": ListFeature(Value("string")),
            "colors": ListFeature(Value("string")),
            "sizes": ListFeature(Value("string")),
            "background": Value("string"),
        }
    )


def scenes_to_dataset(scenes: Iterable[Scene], image_ids: Iterable[str], split: str) -> Dataset:
    """Build an in-memory `datasets.Dataset` from scenes, PNG-encoding each image as it arrives.

    Scenes are consumed lazily, so only one decoded image is alive at a time.
    """
    columns: dict[str, list] = {name: [] for name in synthetic_features()}
    for scene, image_id in zip(scenes, image_ids, strict=True):
        buffer = io.BytesIO()
        # Flat shapes on smooth backgrounds are runs of equal bytes: zlib's run-length strategy at level 1
        # encodes ~2.5x faster than Pillow's default and is no larger (measured in benchmarks/synthetic_speed.md).
        scene.image.save(buffer, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
        columns["image"].append({"bytes": buffer.getvalue(), "path": None})
        columns["captions"].append(list(scene.captions))
        columns["image_id"].append(image_id)
        columns["split"].append(split)
        columns["boxes"].append([list(obj.box) for obj in scene.objects])
        columns["labels"].append([SHAPES.index(obj.shape) for obj in scene.objects])
        columns["label"].append(scene.label)
        columns["hard_negatives"].append(list(scene.hard_negatives))
        columns["colors"].append([obj.color for obj in scene.objects])
        columns["sizes"].append([obj.size for obj in scene.objects])
        columns["background"].append(scene.background)
    return Dataset.from_dict(columns, features=synthetic_features())


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image `index` of `split`: independent per (seed, split, index), so splits never share seeds."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.default_rng([seed, zlib.crc32(split.encode("utf-8")), index])


def make_synthetic_dataset(
    num_images: int,
    seed: int = 0,
    split: str = "train",
    image_size: int | None = None,
    config: SceneConfig | None = None,
) -> Dataset:
    """Generate `num_images` scenes as a `datasets.Dataset` in the canonical schema.

    Args:
        num_images: rows to generate.
        seed: dataset seed; image i of a split is drawn from `scene_rng(seed, split, i)`, so a dataset is
            reproducible row by row and a larger one extends a smaller one with the same seed.
        split: split name, stored in the `split` column and mixed into every image's seed.
        image_size: shortcut that overrides `config.image_size` (default 224).
        config: drawing and captioning settings (default `SceneConfig()`).

    Returns:
        Dataset with columns `image` (PNG), `captions` [C], `image_id` ("synthetic-{split}-{seed}-{i:06d}"),
        `split`, `boxes` [N, 4] normalised xyxy, `labels` [N] (ClassLabel over `SHAPES`), `label`
        (shape of the largest object), `hard_negatives` [C] (one per caption, aligned), `colors` [N],
        `sizes` [N] and `background`; N objects and C = `config.captions_per_image` captions per row.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be non-negative, got {num_images}")
    config = config or SceneConfig()
    if image_size is not None:
        config = replace(config, image_size=image_size)
    scenes = (generate_scene(scene_rng(seed, split, i), config) for i in range(num_images))
    image_ids = (f"synthetic-{split}-{seed}-{i:06d}" for i in range(num_images))
    return scenes_to_dataset(scenes, image_ids, split)


def make_synthetic_splits(
    sizes: Mapping[str, int],
    seed: int = 0,
    image_size: int | None = None,
    config: SceneConfig | None = None,
) -> DatasetDict:
    """Generate several splits, e.g. `{"train": 2000, "val": 200, "test": 200}`, with disjoint per-image seeds.

    Each split equals `make_synthetic_dataset(n, seed, split_name, image_size, config)`.
    """
    return DatasetDict(
        {name: make_synthetic_dataset(count, seed, name, image_size, config) for name, count in sizes.items()}
    )


def zero_shot_prompts() -> list[str]:
    """Zero-shot class prompts in class-id order: `ZERO_SHOT_TEMPLATE` filled with each shape."""
    return [ZERO_SHOT_TEMPLATE.format(shape) for shape in SHAPES]
