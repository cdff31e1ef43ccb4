"""Retrieval and compositional metrics against literal brute-force references, hand-made ties and `evaluate`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from modeling_dclip.evaluation import (
    compositional_accuracy,
    compositional_accuracy_from_embeddings,
    retrieval_metrics,
    retrieval_metrics_from_embeddings,
)

METRIC_KEYS = [
    "text_to_image_R@1",
    "text_to_image_R@5",
    "text_to_image_R@10",
    "image_to_text_R@1",
    "image_to_text_R@5",
    "image_to_text_R@10",
    "text_to_image_mAP",
    "image_to_text_mAP",
    "text_to_image_MRR",
    "image_to_text_MRR",
]


def brute_force_query(scores: list[float], relevant: set[int]) -> tuple[int, float]:
    """Best rank and average precision of one query: sort the gallery by descending score, ties irrelevant first."""
    order = sorted(range(len(scores)), key=lambda item: (-scores[item], item in relevant))
    relevant_positions = [position + 1 for position, item in enumerate(order) if item in relevant]
    precisions = [hits / position for hits, position in enumerate(relevant_positions, start=1)]
    return relevant_positions[0], sum(precisions) / len(precisions)


def brute_force_metrics(similarity: torch.Tensor, caption_to_image: list[int]) -> dict[str, float]:
    rows = similarity.tolist()
    n_captions, n_images = len(rows), len(rows[0])
    directions = {"text_to_image": [], "image_to_text": []}
    for caption in range(n_captions):
        directions["text_to_image"].append(brute_force_query(rows[caption], {caption_to_image[caption]}))
    for image in range(n_images):
        captions = {caption for caption in range(n_captions) if caption_to_image[caption] == image}
        if captions:
            column = [rows[caption][image] for caption in range(n_captions)]
            directions["image_to_text"].append(brute_force_query(column, captions))
    metrics = {}
    for direction, queries in directions.items():
        for k in (1, 5, 10):
            metrics[f"{direction}_R@{k}"] = sum(best_rank <= k for best_rank, _ in queries) / len(queries)
        metrics[f"{direction}_mAP"] = sum(average_precision for _, average_precision in queries) / len(queries)
        metrics[f"{direction}_MRR"] = sum(1 / best_rank for best_rank, _ in queries) / len(queries)
    return metrics


def random_captioning(n_images: int, generator: torch.Generator) -> list[int]:
    """Caption-to-image assignment where images have 0 to 7 captions (at least one image has some)."""
    counts = torch.randint(1, 8, (n_images,), generator=generator)
    counts[torch.rand(n_images, generator=generator) < 0.2] = 0
    counts[0] = max(int(counts[0]), 1)
    caption_to_image = torch.repeat_interleave(torch.arange(n_images), counts)
    return caption_to_image[torch.randperm(len(caption_to_image), generator=generator)].tolist()


def assert_metrics_close(actual: dict[str, float], expected: dict[str, float], tolerance: float = 1e-4) -> None:
    assert list(actual) == METRIC_KEYS
    assert all(type(value) is float for value in actual.values())
    for key in METRIC_KEYS:
        assert actual[key] == pytest.approx(expected[key], abs=tolerance), key


@pytest.mark.parametrize("n_images", [1, 2, 7, 40, 120])
@pytest.mark.parametrize("quantised", [False, True], ids=["continuous", "many_ties"])
def test_matches_brute_force_on_random_multi_caption_matrices(n_images, quantised):
    generator = torch.Generator().manual_seed(n_images + 1000 * quantised)
    caption_to_image = random_captioning(n_images, generator)
    similarity = torch.randn(len(caption_to_image), n_images, generator=generator)
    if quantised:
        # Scores on a coarse grid tie often, across relevant and irrelevant items alike.
        similarity = torch.round(similarity * 2) / 2
    metrics = retrieval_metrics(similarity, torch.tensor(caption_to_image), chunk_size=16)
    assert_metrics_close(metrics, brute_force_metrics(similarity, caption_to_image))
    assert all(0.0 <= value <= 1.0 for value in metrics.values())


def test_all_equal_scores_rank_every_relevant_item_below_every_irrelevant_one():
    caption_to_image = [0, 0, 1, 2]
    metrics = retrieval_metrics(torch.full((4, 3), 0.5), torch.tensor(caption_to_image))
    expected = {
        # Every text query ties with the 2 other images: rank 3.
        "text_to_image_R@1": 0.0,
        "text_to_image_R@5": 1.0,
        "text_to_image_R@10": 1.0,
        "text_to_image_mAP": 1 / 3,
        "text_to_image_MRR": 1 / 3,
        # Image 0: its 2 captions come after the 2 others, at ranks 3 and 4; images 1 and 2: rank 4.
        "image_to_text_R@1": 0.0,
        "image_to_text_R@5": 1.0,
        "image_to_text_R@10": 1.0,
        "image_to_text_mAP": ((1 / 3 + 2 / 4) / 2 + 1 / 4 + 1 / 4) / 3,
        "image_to_text_MRR": (1 / 3 + 1 / 4 + 1 / 4) / 3,
    }
    assert_metrics_close(metrics, expected, tolerance=1e-12)


def test_single_pair_is_perfect_even_though_it_ties_with_nothing():
    metrics = retrieval_metrics(torch.zeros(1, 1), torch.tensor([0]))
    assert metrics == {key: 1.0 for key in METRIC_KEYS}


def test_ties_between_relevant_items_do_not_hurt_but_ties_with_irrelevant_ones_do():
    # Captions A, B describe image 0; X, Y describe image 1. Columns: image 0, image 1.
    similarity = torch.tensor(
        [
            [0.9, 0.0],  # A
            [0.5, 0.5],  # B: its image ties with the other one -> rank 2
            [0.9, 1.0],  # X
            [0.1, 1.0],  # Y
        ]
    )
    metrics = retrieval_metrics(similarity, torch.tensor([0, 0, 1, 1]))
    # Image 0 orders X (ties with A, irrelevant first), A, B, Y: relevant at ranks 2 and 3, AP = (1/2 + 2/3) / 2.
    # Image 1: X and Y tie at the top, both relevant: ranks 1 and 2, AP = 1.
    expected = {
        "text_to_image_R@1": 3 / 4,
        "text_to_image_R@5": 1.0,
        "text_to_image_R@10": 1.0,
        "text_to_image_mAP": (1 + 1 / 2 + 1 + 1) / 4,
        "text_to_image_MRR": (1 + 1 / 2 + 1 + 1) / 4,
        "image_to_text_R@1": 1 / 2,
        "image_to_text_R@5": 1.0,
        "image_to_text_R@10": 1.0,
        "image_to_text_mAP": ((1 / 2 + 2 / 3) / 2 + 1) / 2,
        "image_to_text_MRR": (1 / 2 + 1) / 2,
    }
    assert_metrics_close(metrics, expected, tolerance=1e-12)


def test_map_is_not_mean_reciprocal_rank():
    # Image 0's two captions are ranked 1st and 3rd: AP = (1/1 + 2/3) / 2 but reciprocal rank 1. Image 1: AP = 1.
    similarity = torch.tensor([[0.9, 0.1], [0.8, 0.9], [0.7, 0.3]])
    metrics = retrieval_metrics(similarity, torch.tensor([0, 1, 0]))
    assert metrics["image_to_text_MRR"] == pytest.approx(1.0)
    assert metrics["image_to_text_mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


def test_images_without_captions_are_gallery_items_but_not_queries():
    # Image 1 has no caption: it can outrank caption 0's image, but it asks no image query.
    similarity = torch.tensor([[0.2, 0.9, 0.1], [0.0, 0.0, 0.7]])
    metrics = retrieval_metrics(similarity, torch.tensor([0, 2]))
    assert metrics["text_to_image_R@1"] == pytest.approx(1 / 2)
    assert metrics["image_to_text_R@1"] == pytest.approx(1.0)
    assert metrics["image_to_text_mAP"] == pytest.approx(1.0)


def test_chunk_size_does_not_change_the_result():
    generator = torch.Generator().manual_seed(7)
    caption_to_image = torch.tensor(random_captioning(60, generator))
    similarity = torch.round(torch.randn(len(caption_to_image), 60, generator=generator) * 3) / 3
    reference = retrieval_metrics(similarity, caption_to_image, chunk_size=10_000)
    for chunk_size in (1, 3, 17, 64):
        assert retrieval_metrics(similarity, caption_to_image, chunk_size=chunk_size) == reference


def test_from_embeddings_equals_metrics_of_the_full_cosine_matrix():
    generator = torch.Generator().manual_seed(3)
    caption_to_image = torch.tensor(random_captioning(80, generator))
    text_embeds = torch.randn(len(caption_to_image), 32, generator=generator) * 5
    image_embeds = torch.randn(80, 32, generator=generator) * 0.1
    similarity = F.normalize(text_embeds, dim=-1) @ F.normalize(image_embeds, dim=-1).T
    expected = retrieval_metrics(similarity, caption_to_image)
    for chunk_size in (7, 256):
        actual = retrieval_metrics_from_embeddings(text_embeds, image_embeds, caption_to_image, chunk_size=chunk_size)
        assert_metrics_close(actual, expected, tolerance=1e-9)
    assert_metrics_close(expected, brute_force_metrics(similarity, caption_to_image.tolist()))


class LargestTensorRecorder(TorchDispatchMode):
    """Records the largest tensor produced by any torch operation run under it."""

    def __init__(self):
        super().__init__()
        self.largest_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outputs = func(*args, **(kwargs or {}))
        for output in tree_leaves(outputs):
            if isinstance(output, torch.Tensor):
                self.largest_numel = max(self.largest_numel, output.numel())
        return outputs


def test_large_gallery_from_embeddings_never_builds_the_full_similarity_matrix():
    generator = torch.Generator().manual_seed(0)
    n_images, captions_per_image, chunk_size = 2_000, 5, 64
    image_embeds = torch.randn(n_images, 64, generator=generator)
    caption_to_image = torch.arange(n_images).repeat_interleave(captions_per_image)
    text_embeds = image_embeds[caption_to_image] + 2.0 * torch.randn(len(caption_to_image), 64, generator=generator)
    with LargestTensorRecorder() as recorder:
        metrics = retrieval_metrics_from_embeddings(text_embeds, image_embeds, caption_to_image, chunk_size=chunk_size)
    # The largest intermediate is one chunk of image queries against all 10k captions, 1/31 of the full matrix.
    assert recorder.largest_numel <= chunk_size * len(caption_to_image)
    # Noisy captions of 2000 images: far from perfect, far better than chance (chance R@10 = 10 / 2000).
    assert 0.05 < metrics["text_to_image_R@10"] < 1.0, metrics
    assert 0.05 < metrics["image_to_text_R@10"] < 1.0, metrics


@pytest.mark.parametrize(
    ("caption_to_image", "message"),
    [
        (torch.tensor([0, 1, 3]), r"caption_to_image\[2\] = 3 is not an image index"),
        (torch.tensor([0, -1, 1]), r"caption_to_image\[1\] = -1"),
        (torch.tensor([0, 1]), r"caption_to_image must have shape \[n_captions\] = \[3\]"),
        (torch.tensor([0.0, 1.0, 2.0]), "integer image indices"),
    ],
)
def test_bad_caption_to_image_is_named(caption_to_image, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(torch.randn(3, 3), caption_to_image)


def test_non_finite_similarity_names_the_row():
    similarity = torch.randn(5, 3)
    similarity[3, 1] = float("nan")
    with pytest.raises(ValueError, match="similarity row 3"):
        retrieval_metrics(similarity, torch.tensor([0, 1, 2, 0, 1]), chunk_size=2)


def test_bad_embeddings_are_named():
    with pytest.raises(ValueError, match="image_embeds row 1"):
        retrieval_metrics_from_embeddings(torch.randn(2, 4), torch.tensor([[1.0] * 4, [float("inf")] * 4]), [0, 1])
    with pytest.raises(ValueError, match="same width"):
        retrieval_metrics_from_embeddings(torch.randn(2, 4), torch.randn(2, 5), [0, 1])
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics_from_embeddings(torch.randn(2, 4), torch.randn(2, 4), [0, 1], chunk_size=0)


def test_evaluate_metric_module_gives_the_same_numbers(monkeypatch, tmp_path):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    generator = torch.Generator().manual_seed(11)
    caption_to_image = torch.tensor(random_captioning(30, generator))
    similarity = torch.round(torch.randn(len(caption_to_image), 30, generator=generator) * 4) / 4
    metric = evaluate.load(str(REPO / "metrics" / "dclip_retrieval"), cache_dir=str(tmp_path))
    # Fed in two batches, as an evaluation loop would.
    half = len(caption_to_image) // 2
    metric.add_batch(predictions=similarity[:half].tolist(), references=caption_to_image[:half].tolist())
    metric.add_batch(predictions=similarity[half:].tolist(), references=caption_to_image[half:].tolist())
    assert metric.compute(chunk_size=5) == retrieval_metrics(similarity, caption_to_image)


def test_compositional_accuracy_counts_ties_as_failures():
    true_scores = torch.tensor([0.9, 0.5, 0.3, 0.7])
    negative_scores = torch.tensor([0.1, 0.5, 0.4, 0.6])
    assert compositional_accuracy(true_scores, negative_scores) == pytest.approx(2 / 4)
    # With several negatives the true caption must beat the hardest one.
    several = torch.tensor([[0.1, 0.95], [0.2, 0.1], [0.2, 0.3], [0.6, 0.0]])
    assert compositional_accuracy(true_scores, several) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match=r"negative_scores must have shape \[4\]"):
        compositional_accuracy(true_scores, torch.zeros(3))
    with pytest.raises(ValueError, match="negative_scores row 2"):
        compositional_accuracy(true_scores, torch.tensor([0.1, 0.2, float("nan"), 0.3]))


def test_compositional_accuracy_from_embeddings_uses_cosine_and_fails_identical_negatives():
    image_embeds = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # Image 0: true caption at 0 degrees vs a negative at 45 (large norm, which cosine ignores) -> success.
    # Image 1: true caption at 45 degrees vs a negative at 0 -> failure.
    # Image 2: the negative embeds exactly like the true caption (a bag-of-words model on a reordering) -> failure.
    caption_embeds = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.3, 0.7]])
    negative_embeds = torch.tensor([[100.0, 100.0], [0.0, 5.0], [0.3, 0.7]])
    accuracy = compositional_accuracy_from_embeddings(image_embeds, caption_embeds, negative_embeds)
    assert accuracy == pytest.approx(1 / 3)
    two_negatives = torch.stack([negative_embeds, torch.tensor([[0.0, 1.0], [-1.0, 0.0], [-1.0, 0.0]])], dim=1)
    assert compositional_accuracy_from_embeddings(image_embeds, caption_embeds, two_negatives) == pytest.approx(1 / 3)
