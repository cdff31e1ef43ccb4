"""
The DCLIP teacher as a re-ranker of a dual encoder's top-k (retrieve, then re-rank).

The student ranks the whole gallery by one inner product per image; the teacher reads a text together with an
image's regions (cross-attention), which is too slow for a whole gallery but affordable for the student's top-k.
The frozen base's region embeddings of every gallery image are computed once and cached on disk (content-keyed,
see `modeling_dclip.data.region_cache`); a query then costs one pass of the base text tower and `k` fusions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from ..data.region_cache import RegionSource
from ..evaluation.model_eval import TEACHER_IMAGE_KEYS, teacher_region_features, teacher_text_features
from ..modeling_dclip import DCLIPTeacherModel

RERANK_CACHE_FOLDER = "rerank"


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
        image_paths: list[str],
        cache_dir: str | os.PathLike,
        region_source: RegionSource | None = None,
        batch_size: int = 16,
    ) -> TeacherReranker:
        """
        The teacher over the gallery `image_paths` (in id order); the regions (default: the processor's own region
        extractor) and their base embeddings are computed on the first call and read from `cache_dir` afterwards.

        Raises:
            `FileNotFoundError` naming the first gallery image that is not a file (the teacher reads the pixels).
        """
        missing = next((path for path in image_paths if not Path(path).is_file()), None)
        if missing is not None:
            raise FileNotFoundError(f"{missing}: the teacher re-reads each gallery image, and this one is not a file")
        gallery = datasets.Dataset.from_dict(
            {"image": list(image_paths)}, features=datasets.Features({"image": datasets.Image()})
        )
        teacher.eval()
        features = teacher_region_features(teacher, processor, gallery, region_source, cache_dir, batch_size)
        return cls(teacher, processor, {key: features[key] for key in TEACHER_IMAGE_KEYS})

    @torch.no_grad()
    def score(self, text: str, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The teacher's score (cosine similarity of its enriched embeddings) of `text` with each gallery item of
        `ids [k]`: `[k]` float32."""
        ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        device = next(self.teacher.parameters()).device
        images = {key: self.features[key][ids].to(device) for key in TEACHER_IMAGE_KEYS}
        texts = teacher_text_features(self.teacher, self.processor, [text])
        return self.teacher.score_pairs(**images, **texts)[0].float().cpu()

    def rerank(self, text: str, ids: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
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
    index_folder: str | os.PathLike,
    image_paths: list[str],
    region_source: RegionSource | None = None,
    device: str | None = None,
) -> TeacherReranker:
    """A saved teacher (folder or Hub id) over the gallery of the index at `index_folder`, its region features
    cached in `index_folder/rerank/`.

    Raises:
        `ValueError` naming `teacher` when it is not a DCLIP teacher.
    """
    from ..evaluation.model_eval import load_model_for_evaluation

    model, processor = load_model_for_evaluation(teacher, device=device)
    if not isinstance(model, DCLIPTeacherModel):
        raise ValueError(f"{teacher}: a {type(model).__name__}, not a DCLIP teacher; re-ranking needs a teacher")
    return TeacherReranker.for_gallery(
        model, processor, image_paths, Path(index_folder) / RERANK_CACHE_FOLDER, region_source
    )


__all__ = ["RERANK_CACHE_FOLDER", "TeacherReranker", "load_reranker"]
