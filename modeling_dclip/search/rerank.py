"""
The DCLIP teacher as a re-ranker of a dual encoder's top-k (retrieve, then re-rank).

The student ranks the whole gallery by one inner product per image; the teacher reads a text together with an
image's regions (cross-attention), which is too slow for a whole gallery but affordable for the student's top-k.
The frozen base's region features of every gallery image are computed once and kept in the feature store
(`FeatureStore.region_features`, content-keyed); a query then costs one pass of the base text tower and `k` fusions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..encoding import IMAGE_FEATURES, teacher_pair_scores, text_token_features
from ..feature_store import FeatureStore, RegionSource, region_source_from_config
from ..modeling_dclip import DCLIPTeacherModel


@dataclass
class TeacherReranker:
    """
    A teacher with the region features of a whole gallery.

    Attributes:
        teacher (`DCLIPTeacherModel`), processor (`DCLIPProcessor`): the teacher and its processor.
        features (`dict`): `region_features` of the gallery, row `i` the item with id `i`: `region_embeds [N, R, D]`,
            `region_boxes [N, R, 4]`, `region_scores [N, R]`, `region_mask [N, R]`, `image_embeds [N, D]`.
    """

    teacher: DCLIPTeacherModel
    processor: object
    features: dict[str, torch.Tensor]

    @classmethod
    def for_gallery(
        cls,
        teacher: DCLIPTeacherModel,
        processor,
        image_paths: Sequence[str],
        store: FeatureStore | None = None,
        region_source: RegionSource | None = None,
        batch_size: int = 16,
    ) -> TeacherReranker:
        """
        The teacher over the gallery `image_paths` (in id order). Its regions (default: those the teacher was
        trained with, its processor's `region_config`) and their base embeddings are computed on the first call and
        read from the feature store (default `FeatureStore()`) afterwards.
        """
        source = region_source if region_source is not None else region_source_from_config(processor.region_config)
        store = store if store is not None else FeatureStore()
        features = store.region_features(teacher.eval(), processor, list(image_paths), source, batch_size)
        return cls(teacher, processor, {key: features[key] for key in IMAGE_FEATURES})

    @torch.no_grad()
    def score(self, text: str | dict[str, torch.Tensor], ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """
        The teacher's score (cosine similarity of its enriched embeddings) of one text with each gallery item of
        `ids [k]`.

        Args:
            text: the query, or its `encoding.text_token_features` (`text_states [1, T, H]`, `attention_mask
                [1, T]`, `text_embeds [1, D]`).

        Returns:
            `[k]` float32.
        """
        ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        device = next(self.teacher.parameters()).device
        if isinstance(text, str):
            text = text_token_features(self.teacher, self.processor, [text])
        images = {key: self.features[key][ids].to(device) for key in IMAGE_FEATURES}
        texts = {key: value.to(device) for key, value in text.items()}
        return self.teacher.score_pairs(**images, **texts)[0].float().cpu()

    @torch.no_grad()
    def score_batch(
        self, texts: dict[str, torch.Tensor], ids: np.ndarray | torch.Tensor, pairs_per_step: int = 4096
    ) -> torch.Tensor:
        """
        The teacher's scores of many queries with their own candidates, for offline evaluation: query `q` with the
        gallery items `ids[q]`.

        Args:
            texts: `encoding.text_token_features` of the `Q` queries.
            ids: `[Q, k]` candidate ids per query.

        Returns:
            `[Q, k]` float32.
        """
        ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        queries, k = ids.shape
        text_rows = torch.arange(queries).repeat_interleave(k)
        return teacher_pair_scores(self.teacher, self.features, texts, ids.reshape(-1), text_rows, pairs_per_step).view(
            queries, k
        )

    def rerank(
        self, text: str | dict[str, torch.Tensor], ids: np.ndarray | torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray]:
        """
        Re-order the candidates `ids [k]` (e.g. the student's top-k for `text`) by the teacher's score.

        Returns:
            `(ids [k], scores [k])`, best first by the teacher's score (ties keep the candidates' order).
        """
        ids = np.asarray(ids)
        scores = self.score(text, ids)
        order = torch.argsort(scores, descending=True, stable=True).numpy()
        return ids[order], scores.numpy()[order]


def load_reranker(
    teacher: str | os.PathLike,
    image_paths: Sequence[str],
    store: FeatureStore | None = None,
    device: str | None = None,
) -> TeacherReranker:
    """A saved teacher (folder or Hub id) over the gallery `image_paths` (see `TeacherReranker.for_gallery`).

    Raises:
        `ValueError` naming `teacher` when it is not a DCLIP teacher.
    """
    from ..loading import load_model_and_processor

    model, processor = load_model_and_processor(teacher, device=device)
    if not isinstance(model, DCLIPTeacherModel):
        raise ValueError(f"{teacher}: a {type(model).__name__}, not a DCLIP teacher; re-ranking needs a teacher")
    return TeacherReranker.for_gallery(model, processor, image_paths, store)


__all__ = ["TeacherReranker", "load_reranker"]
