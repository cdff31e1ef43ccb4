"""Loss terms and recipes: values against direct formulas, the weighted sum, and errors for bad recipes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_dclip.losses import DCLIP_HYBRID, LossRecipe, gather_with_grad, register_loss_term
from modeling_dclip.modeling_dclip import symmetric_contrastive_loss


def _outputs(batch: int = 6, dim: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        name: torch.randn(batch, dim, generator=generator)
        for name in ("image_embeds", "text_embeds", "teacher_image_embeds", "teacher_text_embeds")
    }
    return {**tensors, "logit_scale": torch.tensor(20.0)}


def test_contrastive_term_equals_clip_loss():
    outputs = _outputs()
    terms = LossRecipe({"contrastive": 1.0})(outputs)
    image, text = F.normalize(outputs["image_embeds"], dim=-1), F.normalize(outputs["text_embeds"], dim=-1)
    expected = symmetric_contrastive_loss(20.0 * text @ image.t())
    torch.testing.assert_close(terms["contrastive"], expected)
    torch.testing.assert_close(terms["loss"], expected)


def test_dclip_hybrid_is_weighted_sum_of_named_terms():
    outputs = _outputs()
    weights = {"contrastive": 1.0, "image_distill": 0.5, "text_distill": 2.0}
    terms = LossRecipe(weights)(outputs)
    assert set(terms) == {"contrastive", "image_distill", "text_distill", "loss"}
    cos_image = F.cosine_similarity(outputs["image_embeds"], outputs["teacher_image_embeds"], dim=-1)
    torch.testing.assert_close(terms["image_distill"], (1 - cos_image).mean())
    expected = terms["contrastive"] + 0.5 * terms["image_distill"] + 2.0 * terms["text_distill"]
    torch.testing.assert_close(terms["loss"], expected)
    assert LossRecipe().weights == DCLIP_HYBRID


def test_distillation_terms_vanish_when_student_matches_teacher():
    outputs = _outputs()
    outputs["teacher_image_embeds"] = 3.0 * outputs["image_embeds"]  # same direction, other norm
    outputs["teacher_text_embeds"] = outputs["text_embeds"]
    terms = LossRecipe({"image_distill": 1.0, "text_distill": 1.0, "image_feature_distance": 1.0})(outputs)
    for name in ("image_distill", "text_distill", "image_feature_distance"):
        assert abs(terms[name].item()) < 1e-6


def test_recipe_gradients_reach_student_embeddings_only_through_named_terms():
    outputs = _outputs()
    outputs["image_embeds"].requires_grad_(True)
    outputs["text_embeds"].requires_grad_(True)
    LossRecipe({"image_distill": 1.0})(outputs)["loss"].backward()
    assert outputs["image_embeds"].grad.abs().sum() > 0
    assert outputs["text_embeds"].grad is None


def test_zero_weights_are_skipped_and_bad_recipes_fail_clearly():
    assert set(LossRecipe({"contrastive": 1.0, "text_distill": 0.0}).terms) == {"contrastive"}
    assert not LossRecipe({"contrastive": 1.0}).needs_teacher
    with pytest.raises(ValueError, match="unknown loss term.*'kl_graph'"):
        LossRecipe({"kl_graph": 1.0})
    with pytest.raises(ValueError, match="no term with a nonzero weight"):
        LossRecipe({"contrastive": 0.0})


def test_new_terms_plug_in_by_name():
    class MeanSquaredNorm(torch.nn.Module):
        def forward(self, outputs):
            return {"squared_norm": outputs["image_embeds"].pow(2).sum(-1).mean()}

    register_loss_term("squared_norm", MeanSquaredNorm)
    outputs = _outputs()
    terms = LossRecipe({"contrastive": 1.0, "squared_norm": 0.1})(outputs)
    torch.testing.assert_close(
        terms["loss"], terms["contrastive"] + 0.1 * outputs["image_embeds"].pow(2).sum(-1).mean()
    )


def test_gather_with_grad_is_identity_in_one_process():
    features = torch.randn(4, 3, requires_grad=True)
    assert gather_with_grad(features) is features


# --- equations on hand-computed cases ------------------------------------------------------------------------------
# e1, e2 are the unit vectors of R^2; every expected value below is worked out in the comment beside it.

from modeling_dclip.losses import (  # noqa: E402
    RECIPES,
    ContrastiveDistillationLoss,
    feature_distance,
    info_nce,
    resolve_recipe,
    similarity_distance,
    similarity_kl,
    soft_cross_entropy,
    symmetric_similarity_distance,
    symmetric_similarity_kl,
)

E1_E2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
E1_E1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])


def test_info_nce_by_hand():
    # logits = q k^T = [[1, 1], [0, 0]]. Rows (label = diagonal): row 0 -log(e/2e) = ln 2, row 1 -log(1/2) = ln 2.
    # Columns, logits^T = [[1, 0], [1, 0]]: row 0 -log(e/(e+1)) = 0.313262, row 1 -log(1/(e+1)) = 1.313262.
    # Loss = (ln 2 + (0.313262 + 1.313262) / 2) / 2 = 0.753204.
    torch.testing.assert_close(info_nce(E1_E2, E1_E1, 1.0), torch.tensor(0.753204), atol=1e-6, rtol=0)
    # Inputs are normalised: rescaling rows changes nothing; logit_scale 2 turns the identity logits into 2 I:
    # each row -log(e^2 / (e^2 + 1)) = ln(1 + e^-2) = 0.126928.
    torch.testing.assert_close(info_nce(3 * E1_E2, E1_E2, 2.0), torch.tensor(0.126928), atol=1e-6, rtol=0)


def test_feature_distance_by_hand():
    # normalised: x = (e1, e2), y = (e2, e2); squared distances 2 and 0; mean 1.
    features, targets = torch.tensor([[3.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0], [0.0, 5.0]])
    torch.testing.assert_close(feature_distance(features, targets), torch.tensor(1.0))


def test_similarity_distance_by_hand():
    # (I - ones)^2 has entries 0, 1, 1, 0: mean 0.5. The target gets no gradient.
    similarities, targets = torch.eye(2, requires_grad=True), torch.ones(2, 2, requires_grad=True)
    loss = similarity_distance(similarities, targets)
    torch.testing.assert_close(loss, torch.tensor(0.5))
    loss.backward()
    torch.testing.assert_close(similarities.grad, torch.tensor([[0.0, -0.5], [-0.5, 0.0]]))  # 2 (S - S*) / 4
    assert targets.grad is None


def test_similarity_kl_by_hand():
    # Target rows softmax([1, 1]) = (0.5, 0.5). At tau = 1, rows of I give q = (0.731059, 0.268941):
    # KL = 0.5 ln(0.5 / 0.731059) + 0.5 ln(0.5 / 0.268941) = 0.120115 on each row.
    torch.testing.assert_close(
        similarity_kl(torch.eye(2), torch.ones(2, 2), 1.0), torch.tensor(0.120115), atol=1e-6, rtol=0
    )
    # At tau = 0.5, q = softmax([2, 0]) = (0.880797, 0.119203): KL = 0.5 (-0.566219 + 1.433781) = 0.433781.
    torch.testing.assert_close(
        similarity_kl(torch.eye(2), torch.ones(2, 2), 0.5), torch.tensor(0.433781), atol=1e-6, rtol=0
    )


def test_symmetric_similarity_kl_uses_each_side_as_a_stopped_target():
    # Value: (KL(p_ones || p_I) + KL(p_I || p_ones)) / 2 with p_I rows (0.731059, 0.268941), p_ones rows (0.5, 0.5):
    # KL(p_I || p_ones) = 0.731059 ln(1.462117) + 0.268941 ln(0.537883) = 0.110944; (0.120115 + 0.110944) / 2.
    first, second = torch.eye(2, requires_grad=True), torch.ones(2, 2, requires_grad=True)
    loss = symmetric_similarity_kl(first, second, 1.0)
    torch.testing.assert_close(loss, torch.tensor(0.115530), atol=1e-6, rtol=0)
    loss.backward()
    # Only the term where a matrix is the *student* reaches it: d/dS [KL(sg p* || softmax(S)) / 2] over 2 rows is
    # (softmax(S) - p*) / 4, i.e. (0.731059 - 0.5) / 4 = 0.057765 for the first, the opposite sign for the second.
    step = 0.231059 / 4
    torch.testing.assert_close(first.grad, torch.tensor([[step, -step], [-step, step]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(second.grad, torch.tensor([[-step, step], [step, -step]]), atol=1e-6, rtol=0)


def test_symmetric_similarity_distance_by_hand():
    # Value SD(I, ones) = 0.5; each matrix gets half of the MSE gradient from its own term: (S - S*) / 4.
    first, second = torch.eye(2, requires_grad=True), torch.ones(2, 2, requires_grad=True)
    loss = symmetric_similarity_distance(first, second)
    torch.testing.assert_close(loss, torch.tensor(0.5))
    loss.backward()
    torch.testing.assert_close(first.grad, torch.tensor([[0.0, -0.25], [-0.25, 0.0]]))
    torch.testing.assert_close(second.grad, torch.tensor([[0.0, 0.25], [0.25, 0.0]]))


def test_soft_cross_entropy_by_hand():
    # softmax([0, ln 3]) = (0.25, 0.75); -(0.5 ln 0.25 + 0.5 ln 0.75) = 0.836988.
    logits = torch.tensor([[0.0, torch.log(torch.tensor(3.0)).item()]])
    torch.testing.assert_close(
        soft_cross_entropy(logits, torch.tensor([[0.5, 0.5]])), torch.tensor(0.836988), atol=1e-6, rtol=0
    )


def test_intra_modal_contrastive_distillation_by_hand():
    # Student images (e1, e2) against teacher images (e1, e1) at logit_scale 1: the info_nce case above.
    outputs = {"image_embeds": E1_E2, "teacher_image_embeds": E1_E1, "logit_scale": torch.tensor(1.0)}
    terms = LossRecipe({"image_contrastive_distill": 1.0})(outputs)
    torch.testing.assert_close(terms["image_contrastive_distill"], torch.tensor(0.753204), atol=1e-6, rtol=0)
    # A fixed temperature 0.5 (scale 2): rows ln 2 as before; columns ln(1 + e^-2) = 0.126928 and
    # ln(1 + e^2) = 2.126928; (ln 2 + 1.126928) / 2 = 0.910038.
    sharper = ContrastiveDistillationLoss("image", temperature=0.5)(outputs)["image_contrastive_distill"]
    torch.testing.assert_close(sharper, torch.tensor(0.910038), atol=1e-6, rtol=0)


def test_similarity_kl_matches_numpy_on_random_matrices():
    import numpy as np

    generator = torch.Generator().manual_seed(3)
    similarities, targets = torch.randn(5, 7, generator=generator), torch.randn(5, 7, generator=generator)

    def softmax(x):
        x = np.exp(x - x.max(axis=1, keepdims=True))
        return x / x.sum(axis=1, keepdims=True)

    p, q = softmax(targets.double().numpy() / 0.3), softmax(similarities.double().numpy() / 0.3)
    expected = float(np.mean(np.sum(p * np.log(p / q), axis=1)))
    assert abs(similarity_kl(similarities, targets, 0.3).item() - expected) < 1e-5


# --- named recipes --------------------------------------------------------------------------------------------------


def test_named_recipes_resolve_and_combine():
    assert LossRecipe("dclip").weights == DCLIP_HYBRID
    combined = resolve_recipe("dclip + contrastive")
    assert combined == {"contrastive": 2.0, "image_distill": 1.0, "text_distill": 1.0}
    assert {"conaclip", "knowledge_clip", "compression_stage1", "compression_stage2"} <= set(RECIPES)
    with pytest.raises(ValueError, match="unknown recipe 'cona'"):
        LossRecipe("cona")


def test_term_options_reach_the_factory_and_bad_options_fail_clearly():
    recipe = LossRecipe({"image_contrastive_distill": 1.0}, {"image_contrastive_distill": {"temperature": 0.5}})
    assert recipe.terms["image_contrastive_distill"].temperature == 0.5
    with pytest.raises(ValueError, match="'image_contrastive_distill' could not be built"):
        LossRecipe({"image_contrastive_distill": 1.0}, {"image_contrastive_distill": {"tau": 0.5}})
    with pytest.raises(ValueError, match="does not weight"):
        LossRecipe({"contrastive": 1.0}, {"image_distill": {}})


def test_needs_teacher_follows_the_inputs_terms_read():
    assert not LossRecipe({"inter_ss_infonce": 1.0, "inter_ss_sym_kl": 1.0}).needs_teacher
    assert LossRecipe({"inter_ss_sd": 1.0}).needs_teacher  # the teachers' matrix is its target
    assert LossRecipe({"contrastive": 1.0, "image_distill": 1.0}).required_inputs == (
        "image_embeds",
        "text_embeds",
        "logit_scale",
        "teacher_image_embeds",
    )
