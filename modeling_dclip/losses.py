"""Training losses, in the style of open_clip's `loss.py`: each loss is a small module that returns a dict of named
terms, and a [`LossRecipe`] sums the terms it is given weights for.

Every term reads the same `outputs` mapping, so new recipes (ConaCLIP's interaction graph, Knowledge-CLIP's text
distillation, two-stage compression) add terms without touching the training loop:

- `image_embeds`, `text_embeds` (`[B, D]`): the trained model's embeddings of `B` paired examples;
- `logit_scale` (scalar): the inverse temperature (already exponentiated);
- `teacher_image_embeds`, `teacher_text_embeds` (`[B, D]`): targets for distillation terms;
- recipe-specific targets, always named `teacher_*` (e.g. Knowledge-CLIP's `teacher_lm_text_embeds`).

The equations live in plain functions ([`info_nce`], [`feature_distance`], [`similarity_distance`],
[`similarity_kl`], [`symmetric_similarity_distance`], [`symmetric_similarity_kl`], [`soft_cross_entropy`]); the
modules pick their inputs out of `outputs` and name the result. Each module lists the `outputs` keys it reads in
`requires`, which tells the training loop which targets to prepare.

Named recipes (`"dclip"`, `"conaclip"`, `"knowledge_clip"`, `"compression_stage1"`, ...) map to term weights in
[`RECIPES`]; `LossRecipe("conaclip")` or `LossRecipe("dclip+conaclip")` builds them by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.nn.functional as F
from torch import nn

Pair = tuple[str, str]
"""Two `outputs` keys `(rows, columns)`: the similarity matrix
`normalize(outputs[rows]) @ normalize(outputs[columns]).T`."""


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """Concatenate `features [B, D]` from every process in rank order, `[world_size * B, D]`, keeping gradients.

    The backward of `torch.distributed.nn.all_gather` sums each slice's gradients from every process, so when each
    process computes the same global loss and DDP averages parameter gradients, the update equals one process's
    on the global batch (open_clip's `gather_with_grad=True, local_loss=False`). Without an initialised process
    group, `features` is returned unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    return torch.cat(torch.distributed.nn.all_gather(features.contiguous()), dim=0)


# --- equations ---------------------------------------------------------------------------------------------------


def info_nce(queries: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    r"""Symmetric InfoNCE between paired rows of `queries [B, D]` and `keys [B, D]` (CLIP's loss; MoTIS' and
    ConaCLIP's "InfoNCE loss"):

    $$\mathcal{L} = \tfrac12\Big(-\tfrac1B\sum_i \log\frac{e^{s\,q_i\cdot k_i}}{\sum_j e^{s\,q_i\cdot k_j}}
    -\tfrac1B\sum_i \log\frac{e^{s\,k_i\cdot q_i}}{\sum_j e^{s\,k_i\cdot q_j}}\Big)$$

    with `q`, `k` L2-normalised and `s = logit_scale = 1 / temperature`.
    """
    logits = logit_scale * F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).t()
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def feature_distance(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    r"""ConaCLIP's feature-wise distance (FD): the mean squared L2 distance between paired, L2-normalised rows of
    `features [B, D]` and `targets [B, D]`, $\mathcal{L}_{FD} = \frac1B\sum_i \lVert x_i - y_i\rVert_2^2$."""
    return (F.normalize(features, dim=-1) - F.normalize(targets, dim=-1)).pow(2).sum(-1).mean()


def similarity_matrix(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Cosine similarities `[R, C]` between `rows [R, D]` and `columns [C, D]`."""
    return F.normalize(rows, dim=-1) @ F.normalize(columns, dim=-1).t()


def similarity_distance(similarities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    r"""ConaCLIP's similarity-wise distance (SD) between two similarity matrices `[R, C]`: the mean squared
    difference of their entries, $\mathcal{L}_{SD} = \frac{1}{RC}\sum_{ij}(S_{ij} - S^*_{ij})^2$. `targets` is
    treated as a constant (no gradient)."""
    return F.mse_loss(similarities, targets.detach())


def similarity_kl(similarities: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    r"""ConaCLIP's KL-Div loss between row-wise softmaxed similarity matrices `[R, C]` at `temperature` τ:

    $$\mathcal{L}_{KL} = \frac1R\sum_i \mathrm{KL}\big(p^*_i \,\Vert\, p_i\big),\quad
    p_i = \mathrm{softmax}(S_{i\cdot}/\tau),\ p^*_i = \mathrm{softmax}(S^*_{i\cdot}/\tau)$$

    `targets` (giving $p^*$) is treated as a constant.
    """
    log_probabilities = F.log_softmax(similarities / temperature, dim=-1)
    target_log_probabilities = F.log_softmax(targets.detach() / temperature, dim=-1)
    return F.kl_div(log_probabilities, target_log_probabilities, reduction="batchmean", log_target=True)


def symmetric_similarity_distance(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    r"""ConaCLIP's Sym-SD: two similarity matrices `[R, C]` from paired arrows of the interaction graph are each
    other's target, each through a stop-gradient (mutual learning):
    $\tfrac12\big(\mathrm{SD}(S_1, \mathrm{sg}[S_2]) + \mathrm{SD}(\mathrm{sg}[S_1], S_2)\big)$. Its value is
    $\mathrm{SD}(S_1, S_2)$; each matrix receives half of that loss's gradient, pulled towards the other as in
    [`symmetric_similarity_kl`]."""
    return (similarity_distance(first, second) + similarity_distance(second, first)) / 2


def symmetric_similarity_kl(
    first: torch.Tensor, second: torch.Tensor, temperature: torch.Tensor | float
) -> torch.Tensor:
    r"""ConaCLIP's Sym-KL: the softmaxed rows of two similarity matrices `[R, C]` from paired arrows are each
    other's target through a stop-gradient (deep mutual learning):
    $\tfrac12\big(\mathrm{KL}(\mathrm{sg}[p_2]\Vert p_1) + \mathrm{KL}(\mathrm{sg}[p_1]\Vert p_2)\big)$, so each
    matrix is pulled towards the other and neither is pushed by its own target term."""
    return (similarity_kl(first, second, temperature) + similarity_kl(second, first, temperature)) / 2


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    r"""Cross-entropy with soft targets: $-\frac1B\sum_i\sum_k t_{ik}\log\mathrm{softmax}(z_i)_k$ for
    `logits [B, K]` and target distributions `targets [B, K]` (rows summing to 1)."""
    return -(targets.detach() * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def _temperature(outputs: Mapping[str, torch.Tensor], temperature: float | None) -> torch.Tensor | float:
    return temperature if temperature is not None else 1.0 / outputs["logit_scale"]


def _embeddings(outputs: Mapping[str, torch.Tensor], key: str, gather: bool) -> torch.Tensor:
    """`outputs[key]` as a float tensor, detached when it is a teacher target, gathered over processes."""
    if key not in outputs:
        raise KeyError(f"the loss needs outputs[{key!r}], which the training step did not provide")
    features = outputs[key]
    if key.startswith("teacher_"):
        features = features.detach()
    return gather_with_grad(features) if gather else features


def _check_same_width(rows: torch.Tensor, columns: torch.Tensor, pair: Pair) -> None:
    if rows.shape[-1] != columns.shape[-1]:
        raise ValueError(
            f"outputs[{pair[0]!r}] has width {rows.shape[-1]} and outputs[{pair[1]!r}] width {columns.shape[-1]}; "
            "comparing them needs the teacher embeddings mapped to the student's projection_dim first"
        )


# --- modules -----------------------------------------------------------------------------------------------------


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (CLIP's loss, [`info_nce`]) between the student's image and text embeddings, over the
    global batch: negatives come from every process.

    Returns `{"contrastive": loss}`; the logits are `logit_scale * normalize(text) @ normalize(image).T`.
    """

    name = "contrastive"
    requires = ("image_embeds", "text_embeds", "logit_scale")

    def __init__(self, gather: bool = True):
        super().__init__()
        self.gather = gather

    def forward(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image = F.normalize(outputs["image_embeds"], dim=-1)
        text = F.normalize(outputs["text_embeds"], dim=-1)
        if self.gather:
            image, text = gather_with_grad(image), gather_with_grad(text)
        logits_per_text = outputs["logit_scale"] * text @ image.t()
        labels = torch.arange(len(logits_per_text), device=logits_per_text.device)
        loss = (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_text.t(), labels)) / 2
        return {self.name: loss}


class CosineDistillationLoss(nn.Module):
    r"""DCLIP's distillation term for one modality: $\frac1B\sum_i \big(1 - \cos(s_i, t_i)\big)$ between the
    student's and the teacher's embeddings (the second and third terms of DCLIP's hybrid loss).

    Args:
        modality: `"image"` or `"text"`; reads `{modality}_embeds` and `teacher_{modality}_embeds`.
    """

    def __init__(self, modality: str):
        super().__init__()
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        self.modality = modality
        self.name = f"{modality}_distill"
        self.requires = (f"{modality}_embeds", f"teacher_{modality}_embeds")

    def forward(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        student = outputs[f"{self.modality}_embeds"]
        teacher = outputs[f"teacher_{self.modality}_embeds"].to(student.dtype)
        return {self.name: (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()}


class FeatureDistanceLoss(nn.Module):
    """ConaCLIP's feature-wise distance ([`feature_distance`]) between the student's and the teacher's embeddings
    of one modality. Returns `{"{modality}_feature_distance": loss}`."""

    def __init__(self, modality: str):
        super().__init__()
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        self.modality = modality
        self.name = f"{modality}_feature_distance"
        self.requires = (f"{modality}_embeds", f"teacher_{modality}_embeds")

    def forward(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        student = outputs[f"{self.modality}_embeds"]
        teacher = outputs[f"teacher_{self.modality}_embeds"].to(student.dtype)
        return {self.name: feature_distance(student, teacher)}


class ContrastiveDistillationLoss(nn.Module):
    """Intra-modal contrastive distillation (stage 1 of the two-stage compression, "Leaner and Faster", NAACL 2022):
    [`info_nce`] between the student's embeddings of one modality and the teacher's embeddings of the same inputs,
    so each student embedding must pick out its own teacher embedding among the batch's.

    Args:
        modality: `"image"` or `"text"`; reads `{modality}_embeds`, `teacher_{modality}_embeds`, `logit_scale`.
        temperature: a fixed temperature; `None` uses `1 / outputs["logit_scale"]`.
        gather: take negatives from every process.

    Returns `{"{modality}_contrastive_distill": loss}`.
    """

    def __init__(self, modality: str, temperature: float | None = None, gather: bool = True):
        super().__init__()
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        self.modality = modality
        self.temperature = temperature
        self.gather = gather
        self.name = f"{modality}_contrastive_distill"
        self.requires = (f"{modality}_embeds", f"teacher_{modality}_embeds", "logit_scale")

    def forward(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pair = (f"{self.modality}_embeds", f"teacher_{self.modality}_embeds")
        student, teacher = (_embeddings(outputs, key, self.gather) for key in pair)
        _check_same_width(student, teacher, pair)
        scale = 1.0 / _temperature(outputs, self.temperature)
        return {self.name: info_nce(student, teacher.to(student.dtype), scale)}


class PairInfoNCELoss(nn.Module):
    """Mean of [`info_nce`] over pairs of `outputs` keys (e.g. `("image_embeds", "teacher_image_embeds")`).

    Args:
        name: the returned term's name.
        pairs: the `(queries, keys)` pairs; teacher keys (`teacher_*`) get no gradient.
        temperature: a fixed temperature; `None` uses `1 / outputs["logit_scale"]`.
        gather: take negatives from every process.
    """

    def __init__(self, name: str, pairs: Sequence[Pair], temperature: float | None = None, gather: bool = True):
        super().__init__()
        self.name, self.pairs, self.temperature, self.gather = name, tuple(pairs), temperature, gather
        self.requires = tuple(dict.fromkeys([key for pair in self.pairs for key in pair] + ["logit_scale"]))

    def forward(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scale = 1.0 / _temperature(outputs, self.temperature)
        losses = []
        for pair in self.pairs:
            queries, keys = (_embeddings(outputs, key, self.gather) for key in pair)
            _check_same_width(queries, keys, pair)
            losses.append(info_nce(queries, keys.to(queries.dtype), scale))
        return {self.name: torch.stack(losses).mean()}


class PairFeatureDistanceLoss(nn.Module):
    """Mean of [`feature_distance`] (ConaCLIP's FD) over pairs of `outputs` keys.

    Args:
        name: the returned term's name.
        pairs: the `(features, targets)` pairs; teacher keys get no gradient, student-student pairs pull both ways.
    """

    def __init__(self, name: str, pairs: Sequence[Pair]):
        super().__init__()
        self.name, self.pairs = name, tuple(pairs)
        self.requires = tuple(dict.fromkeys(key for pair in self.pairs for key in pair))

    def forward(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        losses = []
        for pair in self.pairs:
            features, targets = (_embeddings(outputs, key, gather=False) for key in pair)
            _check_same_width(features, targets, pair)
            losses.append(feature_distance(features, targets.to(features.dtype)))
        return {self.name: torch.stack(losses).mean()}


class _SimilarityLoss(nn.Module):
    """Shared plumbing of the similarity-matrix losses: build `[B, B]` cosine-similarity matrices from key pairs."""

    def __init__(self, name: str, key_pairs: Sequence[Pair], gather: bool, uses_temperature: bool = False):
        super().__init__()
        self.name, self.gather = name, gather
        keys = [key for pair in key_pairs for key in pair] + (["logit_scale"] if uses_temperature else [])
        self.requires = tuple(dict.fromkeys(keys))

    def _similarities(self, outputs: Mapping[str, torch.Tensor], pair: Pair) -> torch.Tensor:
        rows, columns = (_embeddings(outputs, key, self.gather) for key in pair)
        _check_same_width(rows, columns, pair)
        return similarity_matrix(rows, columns.to(rows.dtype))


class SimilarityDistanceLoss(_SimilarityLoss):
    """ConaCLIP's SD ([`similarity_distance`]), averaged over `pairs`: the similarity matrix of each pair is pulled
    towards the (constant) matrix of its target pair.

    Args:
        name: the returned term's name.
        pairs: `(rows, columns)` keys of the trained similarity matrices.
        target_pairs: one target pair per pair, e.g. the teachers' `("teacher_image_embeds", "teacher_text_embeds")`.
        gather: build the matrices over the global batch.
    """

    def __init__(self, name: str, pairs: Sequence[Pair], target_pairs: Sequence[Pair], gather: bool = True):
        if len(pairs) != len(target_pairs):
            raise ValueError(f"{name}: {len(pairs)} pairs but {len(target_pairs)} target pairs")
        super().__init__(name, tuple(pairs) + tuple(target_pairs), gather)
        self.pairs, self.target_pairs = tuple(pairs), tuple(target_pairs)

    def forward(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        losses = [
            similarity_distance(self._similarities(outputs, pair), self._similarities(outputs, target))
            for pair, target in zip(self.pairs, self.target_pairs)
        ]
        return {self.name: torch.stack(losses).mean()}


class SimilarityKLLoss(_SimilarityLoss):
    """ConaCLIP's KL-Div ([`similarity_kl`]), averaged over `pairs`, towards the (constant) target pairs' matrices.

    Args:
        name / pairs / target_pairs / gather: as [`SimilarityDistanceLoss`].
        temperature: the softmax temperature; `None` uses `1 / outputs["logit_scale"]`.
    """

    def __init__(
        self,
        name: str,
        pairs: Sequence[Pair],
        target_pairs: Sequence[Pair],
        temperature: float | None = None,
        gather: bool = True,
    ):
        if len(pairs) != len(target_pairs):
            raise ValueError(f"{name}: {len(pairs)} pairs but {len(target_pairs)} target pairs")
        super().__init__(name, tuple(pairs) + tuple(target_pairs), gather, uses_temperature=True)
        self.pairs, self.target_pairs, self.temperature = tuple(pairs), tuple(target_pairs), temperature

    def forward(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        temperature = _temperature(outputs, self.temperature)
        losses = [
            similarity_kl(self._similarities(outputs, pair), self._similarities(outputs, target), temperature)
            for pair, target in zip(self.pairs, self.target_pairs)
        ]
        return {self.name: torch.stack(losses).mean()}


class SymmetricSimilarityDistanceLoss(_SimilarityLoss):
    """ConaCLIP's Sym-SD ([`symmetric_similarity_distance`]) between the matrices of two paired arrows.

    Args:
        name: the returned term's name.
        first, second: `(rows, columns)` keys of the two matrices, which are each other's targets.
        gather: build the matrices over the global batch.
    """

    def __init__(self, name: str, first: Pair, second: Pair, gather: bool = True):
        super().__init__(name, (first, second), gather)
        self.first, self.second = first, second

    def forward(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        first, second = self._similarities(outputs, self.first), self._similarities(outputs, self.second)
        return {self.name: symmetric_similarity_distance(first, second)}


class SymmetricSimilarityKLLoss(_SimilarityLoss):
    """ConaCLIP's Sym-KL ([`symmetric_similarity_kl`]) between the matrices of two paired arrows.

    Args:
        name / first / second / gather: as [`SymmetricSimilarityDistanceLoss`].
        temperature: the softmax temperature; `None` uses `1 / outputs["logit_scale"]`.
    """

    def __init__(self, name: str, first: Pair, second: Pair, temperature: float | None = None, gather: bool = True):
        super().__init__(name, (first, second), gather, uses_temperature=True)
        self.first, self.second, self.temperature = first, second, temperature

    def forward(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        first, second = self._similarities(outputs, self.first), self._similarities(outputs, self.second)
        return {self.name: symmetric_similarity_kl(first, second, _temperature(outputs, self.temperature))}


# --- registries and recipes --------------------------------------------------------------------------------------

LOSS_TERMS: dict[str, Callable[..., nn.Module]] = {
    "contrastive": ContrastiveLoss,
    "image_distill": lambda: CosineDistillationLoss("image"),
    "text_distill": lambda: CosineDistillationLoss("text"),
    "image_feature_distance": lambda: FeatureDistanceLoss("image"),
    "text_feature_distance": lambda: FeatureDistanceLoss("text"),
    "image_contrastive_distill": lambda **options: ContrastiveDistillationLoss("image", **options),
    "text_contrastive_distill": lambda **options: ContrastiveDistillationLoss("text", **options),
}
"""Named loss terms a recipe can weight. Register new ones with [`register_loss_term`]; the recipe modules in
`modeling_dclip.recipes` register theirs (ConaCLIP's graph edges, Knowledge-CLIP's terms) when imported."""

DCLIP_HYBRID = {"contrastive": 1.0, "image_distill": 1.0, "text_distill": 1.0}
"""The DCLIP student's hybrid loss: InfoNCE + (1 - cos) image + (1 - cos) text, all weights 1."""

RECIPES: dict[str, dict[str, float]] = {
    "dclip": dict(DCLIP_HYBRID),
    "contrastive": {"contrastive": 1.0},
}
"""Named recipes, name -> term weights. Register new ones with [`register_recipe`]."""


def register_loss_term(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make `name` usable in recipes; `factory(**options)` builds a module whose forward returns `{name: loss}`
    (optionally with extra diagnostic terms, which are reported but not weighted)."""
    LOSS_TERMS[name] = factory


def register_recipe(name: str, weights: Mapping[str, float]) -> None:
    """Make `name` usable wherever a recipe is expected (`LossRecipe(name)`, `resolve_recipe(name)`)."""
    RECIPES[name] = {term: float(weight) for term, weight in weights.items()}


def _register_builtin_recipes() -> None:
    # The recipe modules import this one, so they are loaded on first use rather than at import time.
    importlib.import_module(f"{__package__}.recipes")


def term_inputs(name: str) -> tuple[str, ...]:
    """The `outputs` keys a registered term reads, without its options: its factory's class-level `requires`, else
    those of an instance built without options (terms that declare none are assumed to read the teacher's
    embeddings)."""
    _register_builtin_recipes()
    if name not in LOSS_TERMS:
        raise ValueError(f"unknown loss term {name!r}; known terms: {sorted(LOSS_TERMS)}")
    factory = LOSS_TERMS[name]
    requires = getattr(factory, "requires", None)
    if requires is None:
        requires = getattr(LossRecipe._build(name, {}), "requires", ("teacher_image_embeds", "teacher_text_embeds"))
    return tuple(requires)


def required_inputs(recipe: str | Mapping[str, float] | None) -> set[str]:
    """Every `outputs` key the weighted terms of `recipe` read (see [`term_inputs`])."""
    return {key for name, weight in resolve_recipe(recipe).items() if weight for key in term_inputs(name)}


def resolve_recipe(recipe: str | Mapping[str, float] | None) -> dict[str, float]:
    """Term weights of `recipe`: a mapping of term name -> weight, a registered recipe name, or names joined by
    `+` (`"dclip+conaclip"`), whose weights add up. `None` is DCLIP's hybrid."""
    if recipe is None:
        return dict(DCLIP_HYBRID)
    if isinstance(recipe, Mapping):
        return {name: float(weight) for name, weight in recipe.items()}
    _register_builtin_recipes()
    weights: dict[str, float] = {}
    for name in (part.strip() for part in recipe.split("+")):
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r} in {recipe!r}; known recipes: {sorted(RECIPES)}")
        for term, weight in RECIPES[name].items():
            weights[term] = weights.get(term, 0.0) + weight
    return weights


class LossRecipe(nn.Module):
    """A weighted sum of named loss terms.

    Args:
        weights: term name -> weight (e.g. [`DCLIP_HYBRID`]), or a recipe name understood by [`resolve_recipe`]
            (`"conaclip"`, `"dclip+conaclip"`, ...). Terms with weight 0 are not computed.
        options: term name -> keyword arguments of its factory (e.g. Knowledge-CLIP's concept head size, a fixed
            temperature).

    `forward(outputs)` returns every computed term (detached copies are the caller's business) and their weighted
    sum under `"loss"`. Terms with parameters (Knowledge-CLIP's projection and concept head) are submodules, so an
    optimiser over the training step's parameters trains them; they are not part of the saved model.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | str | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        super().__init__()
        _register_builtin_recipes()
        weights = resolve_recipe(weights)
        options = dict(options or {})
        unknown = sorted(set(weights) - set(LOSS_TERMS))
        if unknown:
            raise ValueError(f"unknown loss term(s) {unknown}; known terms: {sorted(LOSS_TERMS)}")
        self.weights = {name: float(weight) for name, weight in weights.items() if float(weight) != 0.0}
        if not self.weights:
            raise ValueError("the loss recipe has no term with a nonzero weight")
        stray = sorted(set(options) - set(self.weights))
        if stray:
            raise ValueError(
                f"options given for term(s) {stray} that the recipe does not weight: {sorted(self.weights)}"
            )
        self.terms = nn.ModuleDict({name: self._build(name, options.get(name, {})) for name in self.weights})

    @staticmethod
    def _build(name: str, options: Mapping[str, Any]) -> nn.Module:
        try:
            return LOSS_TERMS[name](**options)
        except TypeError as error:
            raise ValueError(f"loss term {name!r} could not be built with options {dict(options)}: {error}") from error

    @property
    def required_inputs(self) -> tuple[str, ...]:
        """The `outputs` keys the terms read (terms that do not declare theirs are assumed to need a teacher)."""
        keys: dict[str, None] = {}
        for term in self.terms.values():
            keys.update(dict.fromkeys(getattr(term, "requires", ("teacher_image_embeds", "teacher_text_embeds"))))
        return tuple(keys)

    @property
    def needs_teacher(self) -> bool:
        return any(key.startswith("teacher_") for key in self.required_inputs)

    def forward(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        for term in self.terms.values():
            terms.update(term(outputs))
        terms["loss"] = sum(self.weights[name] * terms[name] for name in self.weights)
        return terms


__all__ = [
    "DCLIP_HYBRID",
    "LOSS_TERMS",
    "RECIPES",
    "ContrastiveDistillationLoss",
    "ContrastiveLoss",
    "CosineDistillationLoss",
    "FeatureDistanceLoss",
    "LossRecipe",
    "PairFeatureDistanceLoss",
    "PairInfoNCELoss",
    "SimilarityDistanceLoss",
    "SimilarityKLLoss",
    "SymmetricSimilarityDistanceLoss",
    "SymmetricSimilarityKLLoss",
    "feature_distance",
    "gather_with_grad",
    "info_nce",
    "register_loss_term",
    "register_recipe",
    "required_inputs",
    "resolve_recipe",
    "similarity_distance",
    "similarity_kl",
    "similarity_matrix",
    "soft_cross_entropy",
    "term_inputs",
    "symmetric_similarity_distance",
    "symmetric_similarity_kl",
]
