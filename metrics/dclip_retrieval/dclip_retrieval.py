"""`evaluate` metric module for image-text retrieval: `evaluate.load("metrics/dclip_retrieval")`."""

import datasets
import evaluate
import torch

from modeling_dclip.evaluation.retrieval import DEFAULT_CHUNK_SIZE, retrieval_metrics

_DESCRIPTION = """
Image-text retrieval metrics of a caption-by-image similarity matrix, both directions: Recall@1/5/10, true mean
average precision (mAP, over all relevant items; not mean reciprocal rank) and mean reciprocal rank (MRR).
Protocol of CLIP_benchmark: a text query hits at K if its image is in the top K; an image query hits at K if any of
its captions is. Ties count against the model (irrelevant items are ranked above relevant ones with equal scores).
Identical to `modeling_dclip.evaluation.retrieval_metrics`, whose docstring defines every number exactly.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]`): one row per caption (text query), the caption's similarity to every image
        in the gallery, all rows over the same images in the same order (rows of the `[n_captions, n_images]`
        similarity matrix, stored as float32).
    references (`list[int]`): for each caption, the index of its image (a column of the rows). An image may have
        any number of captions; images with none are gallery items but not image queries.
    chunk_size (`int`, *optional*, defaults to 256): queries ranked at once.

Returns:
    `dict[str, float]` of fractions in [0, 1]: `text_to_image_R@1`, `text_to_image_R@5`, `text_to_image_R@10`,
    `image_to_text_R@1`, `image_to_text_R@5`, `image_to_text_R@10`, `text_to_image_mAP`, `image_to_text_mAP`,
    `text_to_image_MRR`, `image_to_text_MRR`.

Example:
    >>> metric = evaluate.load("metrics/dclip_retrieval")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.8, 0.9], [0.7, 0.3]], references=[0, 1, 0])["image_to_text_mAP"]
    0.9166666666666666
"""

_CITATION = """
@article{dclip2025,
  title={DCLIP: Distill CLIP},
  journal={arXiv preprint arXiv:2505.21549},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DCLIPRetrieval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://github.com/LAION-AI/CLIP_benchmark", "https://arxiv.org/abs/2505.21549"],
        )

    def _compute(self, predictions, references, chunk_size=DEFAULT_CHUNK_SIZE):
        if len(predictions) == 0:
            raise ValueError("predictions is empty: add at least one caption's row of similarities")
        n_images = len(predictions[0])
        for caption, row in enumerate(predictions):
            if len(row) != n_images:
                raise ValueError(
                    f"predictions[{caption}] has {len(row)} scores but predictions[0] has {n_images}: every row "
                    "must score the same images"
                )
        return retrieval_metrics(
            torch.tensor(predictions, dtype=torch.float32), torch.tensor(references, dtype=torch.long), chunk_size
        )
