r"""Knowledge-CLIP (Kao, arXiv 2412.03513): a language model as text teacher of a dual encoder, through three
objectives:

1. text-embedding distillation: the student's text embedding, through a learned linear map $W_e$, mimics the
   language model's sentence embedding, $\mathcal{L}_{emb} = \sum_i \lVert E_T(x_i) W_e - L(x_i)\rVert_2^2$
   ([`TextEmbeddingDistillationLoss`]; averaged over the batch here);
2. concept learning: offline K-means over the language model's caption embeddings gives every image-caption pair a
   soft concept label; a classifier on both towers learns to predict it ([`ConceptLearningLoss`]);
3. contrastive learning: CLIP's InfoNCE between the two towers (the `contrastive` term).

The paper weights the three α = γ = 1 and β = 0.01; [`KNOWLEDGE_CLIP`] reads β as the concept term's weight. The
stored sources available here give the distillation equation above but not the exact soft-label formula, so
[`soft_concept_labels`] uses a softmax over negative squared distances to the centroids at a temperature (the
standard soft assignment); the temperature is a setting.

The language model is any Hugging Face encoder or causal LM ([`TextTeacher`]: mean of the last hidden states over the
attention mask). The projection and the concept head are loss-term parameters, trained with the student and
dropped afterwards: the saved student is a plain DCLIP student.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel

from ..losses import LossRecipe, register_loss_term, register_recipe, resolve_recipe, soft_cross_entropy
from ..towers import EMBEDDED_TEXT, load_text_tower, load_tokenizer

KNOWLEDGE_CLIP = {"text_embedding_distill": 1.0, "concept": 0.01, "contrastive": 1.0}
"""The paper's weights (α = γ = 1, β = 0.01); the named recipe `"knowledge_clip"`."""

LM_EMBEDS = "teacher_lm_text_embeds"
CONCEPT_LABELS = "teacher_concept_labels"


def mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden_states [B, T, H]` over the positions where `attention_mask [B, T]` is 1, `[B, H]`."""
    weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1e-6)


class TextTeacher(nn.Module):
    """Sentence embeddings from any Hugging Face encoder or causal LM: the mean of its last hidden states over the
    attention mask (Knowledge-CLIP's Llama 2 teacher; all-MiniLM-L6-v2 offline).

    Args:
        model: the language model (`BertModel`, `LlamaModel`, `LlamaForCausalLM`, ...), kept frozen.
        tokenizer: its tokenizer; a missing pad token (causal LMs) is set to the end-of-sequence token.
        max_length: captions are truncated to this many tokens.
    """

    def __init__(self, model: PreTrainedModel, tokenizer, max_length: int = 77):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, name_or_path: str, max_length: int = 77, **kwargs) -> TextTeacher:
        """Load a teacher: a Hub id or folder (`AutoModel`, so a causal LM loads without its LM head), or
        `modeling_dclip.EMBEDDED_TEXT` for the packaged all-MiniLM-L6-v2."""
        if name_or_path == EMBEDDED_TEXT:
            return cls(load_text_tower(name_or_path), load_tokenizer(name_or_path), max_length)
        return cls(
            AutoModel.from_pretrained(name_or_path, **kwargs),
            AutoTokenizer.from_pretrained(name_or_path, **kwargs),
            max_length,
        )

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings `[B, H]` of token ids `[B, T]` with their mask `[B, T]`."""
        # `base_model` skips a causal LM's head (a base model is its own `base_model`): its last hidden states are
        # what the head would read.
        states = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True
        ).last_hidden_state
        return mean_pool(states.float(), attention_mask)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Sentence embeddings `[len(texts), H]` (float32, CPU) of `texts`."""
        if not texts:
            raise ValueError("TextTeacher.encode: no texts given")
        device = next(self.model.parameters()).device
        embeddings = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            embeddings.append(self(batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu())
        return torch.cat(embeddings)


def fit_concept_centroids(
    embeddings: torch.Tensor, num_concepts: int, iterations: int = 25, seed: int = 0, spherical: bool = True
) -> torch.Tensor:
    """Offline K-means (faiss) over the teacher's caption embeddings `[N, H]`; returns the centroids `[K, H]`.

    With `spherical`, embeddings are L2-normalised first and centroids kept on the unit sphere, so that the concepts
    follow directions (as cosine similarity does) rather than the language model's hidden-state norms.
    """
    import faiss

    if not 1 < num_concepts <= len(embeddings):
        raise ValueError(f"num_concepts must be in [2, number of captions = {len(embeddings)}], got {num_concepts}")
    points = _prepared(embeddings, spherical).numpy()
    kmeans = faiss.Kmeans(
        points.shape[1],
        num_concepts,
        niter=iterations,
        seed=seed,
        spherical=spherical,
        min_points_per_centroid=1,
        verbose=False,
    )
    kmeans.train(np.ascontiguousarray(points))
    return torch.from_numpy(kmeans.centroids.copy())


def soft_concept_labels(
    embeddings: torch.Tensor, centroids: torch.Tensor, temperature: float = 0.1, spherical: bool = True
) -> torch.Tensor:
    r"""Soft concept label of each caption: $s_{ik} = \mathrm{softmax}_k\big(-\lVert e_i - c_k\rVert_2^2 / \tau\big)$
    for embeddings `[N, H]` and centroids `[K, H]`; rows sum to 1, `[N, K]`. `spherical` must match
    [`fit_concept_centroids`]'s."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    distances = torch.cdist(_prepared(embeddings, spherical), centroids.float()).pow(2)
    return F.softmax(-distances / temperature, dim=-1)


def _prepared(embeddings: torch.Tensor, spherical: bool) -> torch.Tensor:
    embeddings = embeddings.detach().float().cpu()
    return F.normalize(embeddings, dim=-1) if spherical else embeddings


class TextEmbeddingDistillationLoss(nn.Module):
    r"""Knowledge-CLIP's text-embedding distillation: $\frac1B\sum_i \lVert s_i W_e - l_i\rVert_2^2$ between the
    student's text embeddings `s [B, D]` (`outputs["text_embeds"]`) and the language model's sentence embeddings
    `l [B, H]` (`outputs["teacher_lm_text_embeds"]`), with $W_e$ a learned linear map when `D != H` (or when asked).

    Args:
        student_dim: width `D` of the student's text embeddings (its `projection_dim`).
        teacher_dim: width `H` of the language model's embeddings.
        learned_projection: learn $W_e$ even when the widths agree (`None`: only when they differ).
        normalize: compare L2-normalised vectors instead (a scale-free variant; the paper compares raw vectors).
    """

    name = "text_embedding_distill"
    requires = ("text_embeds", LM_EMBEDS)

    def __init__(
        self, student_dim: int, teacher_dim: int, learned_projection: bool | None = None, normalize: bool = False
    ):
        super().__init__()
        if learned_projection is None:
            learned_projection = student_dim != teacher_dim
        if not learned_projection and student_dim != teacher_dim:
            raise ValueError(
                f"student width {student_dim} differs from teacher width {teacher_dim}: a projection is needed"
            )
        self.projection = nn.Linear(student_dim, teacher_dim, bias=False) if learned_projection else nn.Identity()
        self.normalize = normalize

    def forward(self, outputs) -> dict[str, torch.Tensor]:
        student = self.projection(outputs["text_embeds"])
        teacher = outputs[LM_EMBEDS].detach().to(student.dtype)
        if self.normalize:
            student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
        return {self.name: (student - teacher).pow(2).sum(-1).mean()}


class ConceptLearningLoss(nn.Module):
    """Knowledge-CLIP's concept learning: a linear concept classifier on the (L2-normalised) image and text embeddings
    predicts each pair's soft concept label `outputs["teacher_concept_labels"] [B, K]`, trained with
    [`soft_cross_entropy`]; the term is the mean of the image and text cross-entropies.

    Args:
        embed_dim: width of the student's embeddings (its `projection_dim`).
        num_concepts: number of K-means concepts `K`.
        shared_head: one classifier for both towers (they share one embedding space), or one per tower.

    Returns `{"concept": ..., "image_concept": ..., "text_concept": ...}`; only `concept` is weighted.
    """

    name = "concept"
    requires = ("image_embeds", "text_embeds", CONCEPT_LABELS)

    def __init__(self, embed_dim: int, num_concepts: int, shared_head: bool = True):
        super().__init__()
        self.image_head = nn.Linear(embed_dim, num_concepts)
        self.text_head = self.image_head if shared_head else nn.Linear(embed_dim, num_concepts)

    def forward(self, outputs) -> dict[str, torch.Tensor]:
        labels = outputs[CONCEPT_LABELS]
        image_loss = soft_cross_entropy(self.image_head(F.normalize(outputs["image_embeds"], dim=-1)), labels)
        text_loss = soft_cross_entropy(self.text_head(F.normalize(outputs["text_embeds"], dim=-1)), labels)
        return {self.name: (image_loss + text_loss) / 2, "image_concept": image_loss, "text_concept": text_loss}


def knowledge_clip_targets(
    teacher: TextTeacher,
    captions: Sequence[str],
    num_concepts: int,
    temperature: float = 0.1,
    spherical: bool = True,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-caption targets for the Knowledge-CLIP terms, indexed like `captions`:
    `teacher_lm_text_embeds [N, H]` and `teacher_concept_labels [N, K]` (K-means on the same embeddings)."""
    embeddings = teacher.encode(captions, batch_size=batch_size)
    centroids = fit_concept_centroids(embeddings, num_concepts, seed=seed, spherical=spherical)
    labels = soft_concept_labels(embeddings, centroids, temperature=temperature, spherical=spherical)
    return {LM_EMBEDS: embeddings, CONCEPT_LABELS: labels}


def knowledge_clip_options(
    weights: Mapping[str, float],
    student_dim: int,
    teacher_dim: int,
    num_concepts: int,
    shared_head: bool = True,
    normalize: bool = False,
) -> dict[str, dict[str, Any]]:
    """[`LossRecipe`] options sizing the trainable projection and concept head, for the Knowledge-CLIP terms that
    `weights` (resolved term weights) gives a nonzero weight; the others get none, as `LossRecipe` requires."""
    options = {
        TextEmbeddingDistillationLoss.name: {
            "student_dim": student_dim,
            "teacher_dim": teacher_dim,
            "normalize": normalize,
        },
        ConceptLearningLoss.name: {"embed_dim": student_dim, "num_concepts": num_concepts, "shared_head": shared_head},
    }
    return {name: value for name, value in options.items() if weights.get(name)}


def knowledge_clip_recipe(
    student_dim: int,
    teacher_dim: int,
    num_concepts: int,
    weights: dict[str, float] | str = "knowledge_clip",
    shared_head: bool = True,
    normalize: bool = False,
) -> LossRecipe:
    """The Knowledge-CLIP [`LossRecipe`] with its trainable projection and concept head sized for this student and
    teacher; `weights` may add or reweight terms (e.g. `"knowledge_clip+dclip"`)."""
    recipe_weights = resolve_recipe(weights)
    return LossRecipe(
        recipe_weights,
        knowledge_clip_options(recipe_weights, student_dim, teacher_dim, num_concepts, shared_head, normalize),
    )


register_loss_term(TextEmbeddingDistillationLoss.name, TextEmbeddingDistillationLoss)
register_loss_term(ConceptLearningLoss.name, ConceptLearningLoss)
register_recipe("knowledge_clip", KNOWLEDGE_CLIP)

__all__ = [
    "CONCEPT_LABELS",
    "KNOWLEDGE_CLIP",
    "LM_EMBEDS",
    "ConceptLearningLoss",
    "TextEmbeddingDistillationLoss",
    "TextTeacher",
    "fit_concept_centroids",
    "knowledge_clip_options",
    "knowledge_clip_recipe",
    "knowledge_clip_targets",
    "mean_pool",
    "soft_concept_labels",
]
