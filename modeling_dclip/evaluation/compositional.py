"""
Compositional accuracy: how often an image's true caption outscores a hard negative caption (the same words
reordered, an attribute swapped, a relation flipped, ...), as in ARO / SugarCrepe style benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compositional_accuracy(true_scores: torch.Tensor, negative_scores: torch.Tensor) -> float:
    """
    Fraction of examples whose true caption scores strictly higher than its hard negative(s); a tie is a failure.

    Args:
        true_scores (`torch.Tensor` of shape `[n]`): score of each image with its true caption.
        negative_scores (`torch.Tensor` of shape `[n]` or `[n, n_negatives]`): score of each image with its hard
            negative caption(s); with several negatives the true caption must beat every one of them.

    Returns:
        `float` in [0, 1].
    """
    true_scores, negative_scores = torch.as_tensor(true_scores), torch.as_tensor(negative_scores)
    if true_scores.dim() != 1 or len(true_scores) == 0:
        raise ValueError(f"true_scores must have shape [n] with n >= 1, got {list(true_scores.shape)}")
    if negative_scores.dim() not in (1, 2) or negative_scores.shape[0] != len(true_scores):
        raise ValueError(
            f"negative_scores must have shape [{len(true_scores)}] or [{len(true_scores)}, n_negatives], "
            f"got {list(negative_scores.shape)}"
        )
    for name, scores in (("true_scores", true_scores), ("negative_scores", negative_scores)):
        finite = torch.isfinite(scores.reshape(len(true_scores), -1)).all(dim=1)
        if not bool(finite.all()):
            raise ValueError(f"{name} row {int(torch.nonzero(~finite)[0])} is NaN or infinite")
    hardest_negative = negative_scores.reshape(len(true_scores), -1).max(dim=1).values
    return (true_scores > hardest_negative).double().mean().item()


@torch.no_grad()
def compositional_accuracy_from_embeddings(
    image_embeds: torch.Tensor, caption_embeds: torch.Tensor, negative_caption_embeds: torch.Tensor
) -> float:
    """
    [`compositional_accuracy`] of the cosine similarities between images and their true / hard negative captions.

    Args:
        image_embeds (`torch.Tensor` of shape `[n, dim]`): `model.get_image_features(...).pooler_output`.
        caption_embeds (`torch.Tensor` of shape `[n, dim]`): embedding of each image's true caption.
        negative_caption_embeds (`torch.Tensor` of shape `[n, dim]` or `[n, n_negatives, dim]`): embedding of each
            image's hard negative caption(s).

    Returns:
        `float` in [0, 1].
    """
    if image_embeds.dim() != 2 or caption_embeds.shape != image_embeds.shape:
        raise ValueError(
            "image_embeds and caption_embeds must both have shape [n, dim], "
            f"got {list(image_embeds.shape)} and {list(caption_embeds.shape)}"
        )
    n, dim = image_embeds.shape
    if negative_caption_embeds.dim() not in (2, 3) or (
        negative_caption_embeds.shape[0] != n or negative_caption_embeds.shape[-1] != dim
    ):
        raise ValueError(
            f"negative_caption_embeds must have shape [{n}, {dim}] or [{n}, n_negatives, {dim}], "
            f"got {list(negative_caption_embeds.shape)}"
        )
    # True and negative captions are scored by one identical computation, so a negative whose embedding equals the
    # true caption's (a bag-of-words model on a reordered caption) ties exactly and counts as a failure.
    captions = torch.cat([caption_embeds[:, None, :], negative_caption_embeds.reshape(n, -1, dim)], dim=1)
    scores = (F.normalize(image_embeds.float(), dim=-1)[:, None, :] * F.normalize(captions.float(), dim=-1)).sum(-1)
    return compositional_accuracy(scores[:, 0], scores[:, 1:])
