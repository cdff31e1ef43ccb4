"""ConaCLIP (Wang et al., ACL 2023 industry track, arXiv 2305.17652): distillation over a fully-connected knowledge
interaction graph of four encoders — teacher image, teacher text, student image, student text.

The graph has four kinds of edges, each made of two *paired arrows* (knowledge source -> student encoder). An arrow is
written `(student, source)`, the `(rows, columns)` of its similarity matrix:

| edge       | arrows                                                    | meaning                             |
|------------|-----------------------------------------------------------|-------------------------------------|
| `intra_ts` | student image <- teacher image, student text <- teacher text | intra-modal teacher-student          |
| `intra_ss` | student image <- student image, student text <- student text | intra-modal student-student (loops) |
| `inter_ts` | student image <- teacher text, student text <- teacher image | inter-modal teacher-student          |
| `inter_ss` | student image <- student text, student text <- student image | inter-modal student-student          |

Each edge can carry any of ConaCLIP's supervision strategies (see `modeling_dclip.losses` for the equations):

- `infonce`: InfoNCE between the arrow's two ends ([`info_nce`]); not on `intra_ss` (an encoder against itself).
- `fd`: feature-wise distance ([`feature_distance`]); not on `intra_ss` (always zero).
- `sd`, `kl`: SD / KL-Div of the arrow's similarity matrix towards the *teachers'* matrix: the same matrix with every
  student encoder replaced by its teacher (so the two teacher networks give the targets of the two students).
- `sym_sd`, `sym_kl`: Sym-SD / Sym-KL, the two paired arrows' matrices as each other's targets, each through a
  stop-gradient (mutual learning).

Every `(edge, loss)` is a registered loss term named `{edge}_{loss}` (e.g. `inter_ts_sym_kl`), so a recipe is a plain
term -> weight mapping that the distillation loop's [`LossRecipe`] understands; [`conaclip_weights`] builds one
from a per-edge description. The teacher is any frozen dual encoder whose embeddings arrive as
`teacher_image_embeds` / `teacher_text_embeds` with the student's width.

The default [`CONACLIP`] combination: the stored sources available here (the paper's abstract and Alibaba's summary of
it) state that the symmetric variants beat the one-way ones on every edge and that the final method "integrates all
effective combinations", but not the final table itself. The default therefore puts InfoNCE on every edge that can
carry it, FD on the teacher-student intra-modal edge (MoTIS' and CLIP-KD's strongest single signal), and the symmetric
relation losses on the other edges — a reading of the paper, not a transcription; change it with
[`conaclip_weights`] or per-term weights in the config.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..losses import (
    Pair,
    PairFeatureDistanceLoss,
    PairInfoNCELoss,
    SimilarityDistanceLoss,
    SimilarityKLLoss,
    SymmetricSimilarityDistanceLoss,
    SymmetricSimilarityKLLoss,
    register_loss_term,
    register_recipe,
)

STUDENT_IMAGE, STUDENT_TEXT = "image_embeds", "text_embeds"
TEACHER_IMAGE, TEACHER_TEXT = "teacher_image_embeds", "teacher_text_embeds"
_TEACHER_OF = {STUDENT_IMAGE: TEACHER_IMAGE, STUDENT_TEXT: TEACHER_TEXT}

EDGES: dict[str, tuple[Pair, Pair]] = {
    "intra_ts": ((STUDENT_IMAGE, TEACHER_IMAGE), (STUDENT_TEXT, TEACHER_TEXT)),
    "intra_ss": ((STUDENT_IMAGE, STUDENT_IMAGE), (STUDENT_TEXT, STUDENT_TEXT)),
    "inter_ts": ((STUDENT_IMAGE, TEACHER_TEXT), (STUDENT_TEXT, TEACHER_IMAGE)),
    "inter_ss": ((STUDENT_IMAGE, STUDENT_TEXT), (STUDENT_TEXT, STUDENT_IMAGE)),
}
"""The interaction graph: edge name -> its two paired arrows `(student, source)`."""

LOSS_KINDS = ("infonce", "fd", "sd", "kl", "sym_sd", "sym_kl")
"""ConaCLIP's supervision strategies."""

_FEATURE_KINDS = ("infonce", "fd")

CONACLIP = {
    "intra_ts_infonce": 1.0,
    "intra_ts_fd": 1.0,
    "intra_ss_sym_sd": 1.0,
    "inter_ts_infonce": 1.0,
    "inter_ts_sym_kl": 1.0,
    "inter_ss_infonce": 1.0,
    "inter_ss_sym_kl": 1.0,
}
"""The default ConaCLIP combination (named recipe `"conaclip"`); see the module docstring for how it was chosen."""


def term_name(edge: str, kind: str) -> str:
    """The registered loss-term name of `kind` on `edge`, e.g. `("inter_ts", "sym_kl") -> "inter_ts_sym_kl"`."""
    return f"{edge}_{kind}"


def supports(edge: str, kind: str) -> bool:
    """Whether `kind` is meaningful on `edge` (feature losses are not, on the student-student self loops)."""
    return edge in EDGES and kind in LOSS_KINDS and not (edge == "intra_ss" and kind in _FEATURE_KINDS)


def _teacher_target(arrow: Pair) -> Pair:
    """The teachers' version of an arrow: each student encoder replaced by its teacher."""
    return tuple(_TEACHER_OF.get(key, key) for key in arrow)  # type: ignore[return-value]


def _distinct_pairs(arrows: tuple[Pair, Pair]) -> tuple[Pair, ...]:
    # InfoNCE and FD are symmetric in their two ends, so `inter_ss`'s two arrows are one pair.
    return tuple(dict.fromkeys(tuple(sorted(arrow)) for arrow in arrows))  # type: ignore[misc]


def edge_loss(edge: str, kind: str, temperature: float | None = None, gather: bool = True) -> nn.Module:
    """The module computing `kind` on `edge`, averaged over the edge's arrows; its forward returns
    `{term_name(edge, kind): loss}`.

    Args:
        edge: one of [`EDGES`].
        kind: one of [`LOSS_KINDS`].
        temperature: fixed temperature of `infonce` / `kl` / `sym_kl`; `None` uses `1 / outputs["logit_scale"]`.
        gather: compute over the global batch when training on several processes.
    """
    if not supports(edge, kind):
        raise ValueError(
            f"ConaCLIP has no {kind!r} loss on edge {edge!r} (edges: {sorted(EDGES)}, losses: {LOSS_KINDS})"
        )
    name, arrows = term_name(edge, kind), EDGES[edge]
    if kind == "infonce":
        return PairInfoNCELoss(name, _distinct_pairs(arrows), temperature=temperature, gather=gather)
    if kind == "fd":
        return PairFeatureDistanceLoss(name, _distinct_pairs(arrows))
    targets = tuple(_teacher_target(arrow) for arrow in arrows)
    if kind == "sd":
        return SimilarityDistanceLoss(name, arrows, targets, gather=gather)
    if kind == "kl":
        return SimilarityKLLoss(name, arrows, targets, temperature=temperature, gather=gather)
    if kind == "sym_sd":
        return SymmetricSimilarityDistanceLoss(name, *arrows, gather=gather)
    return SymmetricSimilarityKLLoss(name, *arrows, temperature=temperature, gather=gather)


def conaclip_weights(edges: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Flatten a per-edge description into recipe weights.

    Args:
        edges: edge -> {loss kind -> weight}, e.g. `{"intra_ts": {"fd": 1.0}, "inter_ss": {"infonce": 1.0}}`.

    Returns:
        term name -> weight, for [`LossRecipe`] (merge with other recipes' weights freely).
    """
    weights: dict[str, float] = {}
    for edge, kinds in edges.items():
        for kind, weight in kinds.items():
            if not supports(edge, kind):
                raise ValueError(
                    f"ConaCLIP edge {edge!r} has no {kind!r} loss (edges: {sorted(EDGES)}, losses: {LOSS_KINDS})"
                )
            weights[term_name(edge, kind)] = float(weight)
    return weights


def _register() -> None:
    for edge in EDGES:
        for kind in LOSS_KINDS:
            if supports(edge, kind):
                register_loss_term(
                    term_name(edge, kind), lambda edge=edge, kind=kind, **options: edge_loss(edge, kind, **options)
                )
    register_recipe("conaclip", CONACLIP)


_register()

__all__ = ["CONACLIP", "EDGES", "LOSS_KINDS", "conaclip_weights", "edge_loss", "supports", "term_name"]
