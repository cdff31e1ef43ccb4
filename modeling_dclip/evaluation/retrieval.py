"""
Image-text retrieval metrics: Recall@K, mean average precision and mean reciprocal rank, both directions.

Protocol (CLIP_benchmark's): every caption is a text query whose one relevant item is its image; every image with
at least one caption is an image query whose relevant items are all of its captions. Images without captions stay
in the gallery of the text queries but are not image queries.

Ties count against the model. Each query's gallery is put in a *pessimistic order*: by descending score, and among
items with equal scores every irrelevant item before every relevant one (equal-scoring relevant items may come in
any order among themselves: they are interchangeable). The rank of a relevant item is its 1-based position in that
order, so the m-th best relevant item of a query has rank

    m + #{irrelevant items whose score is >= its score}.

For a text query (one relevant image) this is `1 + #{other images scoring >= its image}`. From the ranks:
- R@K: a text query hits if its image's rank is <= K; an image query hits if its best caption's rank is <= K;
- mAP: true mean average precision, the mean over queries of the average over ALL relevant items of the precision
  at their ranks (`m / rank_m`). A text query has one relevant item, so its AP is `1 / rank`. (This is not mean
  reciprocal rank, which the DCLIP authors' code reports as "MAP".)
- MRR: the mean over queries of `1 / rank` of the best relevant item.

Everything is computed in chunks of queries, so memory stays O(chunk_size x gallery size) beyond the inputs:
`retrieval_metrics_from_embeddings` never holds the full similarity matrix at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RECALL_AT_K = (1, 5, 10)
# Peak working memory is about 40 bytes x DEFAULT_CHUNK_SIZE x max(n_captions, n_images): ~1 GB for 100k captions.
DEFAULT_CHUNK_SIZE = 256
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class _CaptionsOfImages:
    """Each image's captions, stored as one caption order grouped by image (CSR-like, no per-image lists)."""

    captions_by_image: torch.Tensor  # [n_captions] caption indices, grouped by image in image order
    first_caption: torch.Tensor  # [n_images] offset of each image's group in `captions_by_image`
    caption_counts: torch.Tensor  # [n_images]

    @classmethod
    def from_caption_to_image(cls, caption_to_image: torch.Tensor, n_images: int) -> _CaptionsOfImages:
        caption_counts = torch.bincount(caption_to_image, minlength=n_images)
        return cls(
            captions_by_image=torch.argsort(caption_to_image, stable=True),
            first_caption=caption_counts.cumsum(0) - caption_counts,
            caption_counts=caption_counts,
        )

    def query_images(self) -> torch.Tensor:
        """Indices of the images that have at least one caption, `[n_query_images]`."""
        return torch.nonzero(self.caption_counts).squeeze(1)

    def padded_captions(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The captions of `images` (`[batch]`) as a left-aligned padded matrix.

        Returns:
            `(captions, is_caption)`, both `[batch, max_captions]`: caption indices (padding holds an arbitrary
            valid index) and the mask of real entries.
        """
        counts = self.caption_counts[images]
        slots = torch.arange(int(counts.max()), device=images.device)
        is_caption = slots[None, :] < counts[:, None]
        positions = (self.first_caption[images][:, None] + slots[None, :]).clamp(max=len(self.captions_by_image) - 1)
        return self.captions_by_image[positions], is_caption


def _text_query_ranks(scores: torch.Tensor, target_images: torch.Tensor) -> torch.Tensor:
    """
    Pessimistic rank of each text query's image.

    Args:
        scores (`torch.Tensor` of shape `[batch, n_images]`): similarity of each text query to every image.
        target_images (`torch.LongTensor` of shape `[batch]`): the image of each query.

    Returns:
        `torch.LongTensor` of shape `[batch]`: `#{images scoring >= the target}`, the target itself included.
    """
    target_scores = scores.gather(1, target_images[:, None])
    return (scores >= target_scores).sum(dim=1)


def _image_query_ranks(
    scores: torch.Tensor, relevant_captions: torch.Tensor, is_relevant: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Pessimistic rank of each image query's best caption, and its average precision.

    Args:
        scores (`torch.Tensor` of shape `[batch, n_captions]`): similarity of each image query to every caption.
        relevant_captions (`torch.LongTensor` of shape `[batch, max_relevant]`): each query's captions, padded.
        is_relevant (`torch.BoolTensor` of shape `[batch, max_relevant]`): left-aligned mask of the real entries;
            every row has at least one.

    Returns:
        `(best_ranks, average_precisions)`, both of shape `[batch]`.
    """
    n_captions = scores.shape[1]
    relevant_scores = scores.gather(1, relevant_captions).masked_fill(~is_relevant, -torch.inf)
    # Padding (-inf, scores are finite) sorts last, so `is_relevant` still marks the real entries after sorting.
    relevant_descending = relevant_scores.sort(dim=1, descending=True).values
    gallery_ascending = scores.sort(dim=1).values
    # Counting items at or above a score by binary search in the sorted gallery costs one sort per query, where
    # comparing every relevant item with the whole gallery would cost one pass per relevant item.
    items_at_or_above = n_captions - torch.searchsorted(gallery_ascending, relevant_descending, side="left")
    relevant_at_or_above = relevant_descending.shape[1] - torch.searchsorted(
        relevant_descending.flip(1), relevant_descending, side="left"
    )
    relevant_so_far = torch.arange(1, relevant_descending.shape[1] + 1, device=scores.device)
    ranks = relevant_so_far + (items_at_or_above - relevant_at_or_above)
    precisions = torch.where(is_relevant, relevant_so_far.double() / ranks, 0.0)
    average_precisions = precisions.sum(dim=1) / is_relevant.sum(dim=1)
    return ranks[:, 0], average_precisions


def _summarise(
    text_ranks: torch.Tensor, image_best_ranks: torch.Tensor, image_average_precisions: torch.Tensor
) -> dict[str, float]:
    text_ranks = text_ranks.double()
    image_best_ranks = image_best_ranks.double()
    metrics = {}
    for k in RECALL_AT_K:
        metrics[f"text_to_image_R@{k}"] = (text_ranks <= k).double().mean().item()
    for k in RECALL_AT_K:
        metrics[f"image_to_text_R@{k}"] = (image_best_ranks <= k).double().mean().item()
    # With a single relevant image, a text query's average precision is its reciprocal rank.
    metrics["text_to_image_mAP"] = text_ranks.reciprocal().mean().item()
    metrics["image_to_text_mAP"] = image_average_precisions.double().mean().item()
    metrics["text_to_image_MRR"] = text_ranks.reciprocal().mean().item()
    metrics["image_to_text_MRR"] = image_best_ranks.reciprocal().mean().item()
    return metrics


def _rank_in_chunks(
    text_query_scores: Callable[[slice], torch.Tensor],
    image_query_scores: Callable[[torch.Tensor], torch.Tensor],
    caption_to_image: torch.Tensor,
    n_images: int,
    chunk_size: int,
) -> dict[str, float]:
    """Ranks every query chunk by chunk; the callables give the scores of a chunk of text / image queries."""
    n_captions = len(caption_to_image)
    text_ranks = []
    for start in range(0, n_captions, chunk_size):
        rows = slice(start, min(start + chunk_size, n_captions))
        text_ranks.append(_text_query_ranks(text_query_scores(rows), caption_to_image[rows]))

    captions_of_images = _CaptionsOfImages.from_caption_to_image(caption_to_image, n_images)
    image_best_ranks, image_average_precisions = [], []
    for images in captions_of_images.query_images().split(chunk_size):
        best_ranks, average_precisions = _image_query_ranks(
            image_query_scores(images), *captions_of_images.padded_captions(images)
        )
        image_best_ranks.append(best_ranks)
        image_average_precisions.append(average_precisions)

    return _summarise(torch.cat(text_ranks), torch.cat(image_best_ranks), torch.cat(image_average_precisions))


def _check_caption_to_image(caption_to_image, n_captions: int, n_images: int, device: torch.device) -> torch.Tensor:
    caption_to_image = torch.as_tensor(caption_to_image, device=device)
    if caption_to_image.dim() != 1 or len(caption_to_image) != n_captions:
        raise ValueError(
            f"caption_to_image must have shape [n_captions] = [{n_captions}], got {list(caption_to_image.shape)}"
        )
    if caption_to_image.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"caption_to_image must hold integer image indices, got dtype {caption_to_image.dtype}")
    out_of_range = (caption_to_image < 0) | (caption_to_image >= n_images)
    if bool(out_of_range.any()):
        caption = int(torch.nonzero(out_of_range)[0])
        raise ValueError(
            f"caption_to_image[{caption}] = {int(caption_to_image[caption])} is not an image index "
            f"(there are {n_images} images)"
        )
    return caption_to_image.long()


def _check_float_matrix(values, name: str, expected_shape: str) -> torch.Tensor:
    values = torch.as_tensor(values)
    if values.dim() != 2 or not values.dtype.is_floating_point or 0 in values.shape:
        raise ValueError(
            f"{name} must be a non-empty floating-point matrix {expected_shape}, "
            f"got shape {list(values.shape)} and dtype {values.dtype}"
        )
    return values


def _check_finite_rows(values: torch.Tensor, name: str, first_row: int = 0) -> None:
    finite = torch.isfinite(values).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"{name} row {first_row + int(torch.nonzero(~finite)[0])} contains NaN or infinite values")


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


@torch.no_grad()
def retrieval_metrics(
    similarity: torch.Tensor, caption_to_image: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> dict[str, float]:
    """
    Text-to-image and image-to-text retrieval metrics of a similarity matrix (protocol: see the module docstring).

    Args:
        similarity (`torch.Tensor` of shape `[n_captions, n_images]`): score of every caption against every image,
            higher is more similar; finite.
        caption_to_image (`torch.LongTensor` of shape `[n_captions]`): the index of each caption's image. An image
            may have any number of captions, none included.
        chunk_size (`int`, *optional*, defaults to 256): queries ranked at once; working memory is
            O(chunk_size x max(n_captions, n_images)).

    Returns:
        `dict[str, float]` with the fractions (in [0, 1]) `text_to_image_R@{1,5,10}`, `image_to_text_R@{1,5,10}`,
        `text_to_image_mAP`, `image_to_text_mAP`, `text_to_image_MRR`, `image_to_text_MRR`.
    """
    similarity = _check_float_matrix(similarity, "similarity", "[n_captions, n_images]")
    _check_chunk_size(chunk_size)
    n_captions, n_images = similarity.shape
    caption_to_image = _check_caption_to_image(caption_to_image, n_captions, n_images, similarity.device)

    def caption_rows(rows: slice) -> torch.Tensor:
        # Every row passes through here before any column is read, so this checks the whole matrix, chunk by chunk.
        scores = similarity[rows]
        _check_finite_rows(scores, "similarity", first_row=rows.start)
        return scores

    return _rank_in_chunks(
        text_query_scores=caption_rows,
        # Image queries need columns; copying a chunk of them contiguous makes the row sort several times faster.
        image_query_scores=lambda images: similarity.index_select(1, images).T.contiguous(),
        caption_to_image=caption_to_image,
        n_images=n_images,
        chunk_size=chunk_size,
    )


@torch.no_grad()
def retrieval_metrics_from_embeddings(
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    caption_to_image: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """
    Retrieval metrics of the cosine similarity between caption and image embeddings, computed chunk by chunk so
    that the `[n_captions, n_images]` similarity matrix is never held in memory.

    Equal to `retrieval_metrics(normalize(text_embeds) @ normalize(image_embeds).T, caption_to_image)` (the
    embeddings are L2-normalised here, as CLIP does).

    Args:
        text_embeds (`torch.Tensor` of shape `[n_captions, dim]`): caption embeddings.
        image_embeds (`torch.Tensor` of shape `[n_images, dim]`): image embeddings.
        caption_to_image (`torch.LongTensor` of shape `[n_captions]`): the index of each caption's image.
        chunk_size (`int`, *optional*, defaults to 256): queries scored and ranked at once.

    Returns:
        `dict[str, float]`: the same keys as [`retrieval_metrics`].
    """
    text_embeds = _check_float_matrix(text_embeds, "text_embeds", "[n_captions, dim]")
    image_embeds = _check_float_matrix(image_embeds, "image_embeds", "[n_images, dim]")
    _check_finite_rows(text_embeds, "text_embeds")
    _check_finite_rows(image_embeds, "image_embeds")
    if text_embeds.shape[1] != image_embeds.shape[1]:
        raise ValueError(
            f"text_embeds and image_embeds must have the same width, got {text_embeds.shape[1]} and "
            f"{image_embeds.shape[1]}"
        )
    _check_chunk_size(chunk_size)
    caption_to_image = _check_caption_to_image(
        caption_to_image, len(text_embeds), len(image_embeds), text_embeds.device
    )
    text_embeds = F.normalize(text_embeds, dim=-1)
    image_embeds = F.normalize(image_embeds.to(text_embeds.device), dim=-1)
    return _rank_in_chunks(
        text_query_scores=lambda rows: text_embeds[rows] @ image_embeds.T,
        image_query_scores=lambda images: image_embeds[images] @ text_embeds.T,
        caption_to_image=caption_to_image,
        n_images=len(image_embeds),
        chunk_size=chunk_size,
    )
