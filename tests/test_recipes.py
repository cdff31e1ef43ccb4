"""The seeds' other recipes: ConaCLIP's interaction graph (terms and arrows against numpy), Knowledge-CLIP's
language-model teacher and concept learning, and two-stage compression (kept layers, save/load, stage-1 terms)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from transformers import BertConfig, CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlamaModel, TimmWrapperConfig

from modeling_dclip import EMBEDDED_TEXT, DCLIPConfig, DCLIPModel
from modeling_dclip.losses import LOSS_TERMS, LossRecipe
from modeling_dclip.recipes import (
    CONACLIP,
    EDGES,
    LOSS_KINDS,
    ConceptLearningLoss,
    TextEmbeddingDistillationLoss,
    TextTeacher,
    big_model_targets,
    compress_student,
    conaclip_weights,
    fit_concept_centroids,
    knowledge_clip_recipe,
    knowledge_clip_targets,
    parameter_counts,
    select_layers,
    soft_concept_labels,
)
from modeling_dclip.recipes.conaclip import supports, term_name
from modeling_dclip.towers import load_tokenizer

KEYS = ("image_embeds", "text_embeds", "teacher_image_embeds", "teacher_text_embeds")


def _outputs(batch: int = 5, dim: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {**{key: torch.randn(batch, dim, generator=generator) for key in KEYS}, "logit_scale": torch.tensor(10.0)}


# --- numpy references, written independently of modeling_dclip.losses ------------------------------------------------


def _unit(x: torch.Tensor) -> np.ndarray:
    x = x.double().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _sim(outputs, rows: str, columns: str) -> np.ndarray:
    return _unit(outputs[rows]) @ _unit(outputs[columns]).T


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _kl(target: np.ndarray, student: np.ndarray, tau: float) -> float:
    log_p, log_q = _log_softmax(target / tau), _log_softmax(student / tau)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))


def _infonce(outputs, a: str, b: str, scale: float) -> float:
    logits = scale * _sim(outputs, a, b)
    diagonal = np.arange(len(logits))
    rows = -_log_softmax(logits)[diagonal, diagonal].mean()
    columns = -_log_softmax(logits.T)[diagonal, diagonal].mean()
    return float((rows + columns) / 2)


def _fd(outputs, a: str, b: str) -> float:
    return float(np.mean(np.sum((_unit(outputs[a]) - _unit(outputs[b])) ** 2, axis=1)))


# --- ConaCLIP --------------------------------------------------------------------------------------------------------


def test_every_supported_edge_loss_is_a_named_term():
    outputs = _outputs()
    supported = [(edge, kind) for edge in EDGES for kind in LOSS_KINDS if supports(edge, kind)]
    assert len(supported) == 22  # 4 edges x 6 losses, less InfoNCE and FD on the student-student self loops
    weights = {term_name(edge, kind): float(i + 1) for i, (edge, kind) in enumerate(supported)}
    terms = LossRecipe(weights)(outputs)
    assert set(terms) == set(weights) | {"loss"}
    expected = sum(weight * terms[name] for name, weight in weights.items())
    torch.testing.assert_close(terms["loss"], expected)
    for edge, kind in [("intra_ss", "infonce"), ("intra_ss", "fd")]:
        assert term_name(edge, kind) not in LOSS_TERMS
        with pytest.raises(ValueError, match="has no"):
            conaclip_weights({edge: {kind: 1.0}})


def test_edges_connect_the_right_encoders():
    outputs, tau = _outputs(), 0.1  # logit_scale 10
    terms = LossRecipe({name: 1.0 for name in LOSS_TERMS if name.split("_")[0] in ("intra", "inter")})(outputs)
    si, st, ti, tt = KEYS
    # Feature losses: averaged over the edge's two arrows (inter_ss' two arrows are the same pair).
    assert terms["intra_ts_fd"].item() == pytest.approx((_fd(outputs, si, ti) + _fd(outputs, st, tt)) / 2, abs=1e-5)
    assert terms["inter_ts_fd"].item() == pytest.approx((_fd(outputs, si, tt) + _fd(outputs, st, ti)) / 2, abs=1e-5)
    assert terms["inter_ss_fd"].item() == pytest.approx(_fd(outputs, si, st), abs=1e-5)
    assert terms["inter_ts_infonce"].item() == pytest.approx(
        (_infonce(outputs, si, tt, 10.0) + _infonce(outputs, st, ti, 10.0)) / 2, abs=1e-5
    )
    assert terms["inter_ss_infonce"].item() == pytest.approx(_infonce(outputs, si, st, 10.0), abs=1e-5)
    # SD / KL: each arrow's matrix towards the teachers' version of it (students replaced by their teachers).
    sd = lambda a, b: float(np.mean((a - b) ** 2))  # noqa: E731
    assert terms["intra_ts_sd"].item() == pytest.approx(
        (sd(_sim(outputs, si, ti), _sim(outputs, ti, ti)) + sd(_sim(outputs, st, tt), _sim(outputs, tt, tt))) / 2,
        abs=1e-5,
    )
    assert terms["intra_ss_sd"].item() == pytest.approx(
        (sd(_sim(outputs, si, si), _sim(outputs, ti, ti)) + sd(_sim(outputs, st, st), _sim(outputs, tt, tt))) / 2,
        abs=1e-5,
    )
    assert terms["inter_ss_kl"].item() == pytest.approx(
        (
            _kl(_sim(outputs, ti, tt), _sim(outputs, si, st), tau)
            + _kl(_sim(outputs, tt, ti), _sim(outputs, st, si), tau)
        )
        / 2,
        abs=1e-5,
    )
    assert terms["inter_ts_kl"].item() == pytest.approx(
        (
            _kl(_sim(outputs, ti, tt), _sim(outputs, si, tt), tau)
            + _kl(_sim(outputs, tt, ti), _sim(outputs, st, ti), tau)
        )
        / 2,
        abs=1e-5,
    )
    # Sym: the two paired arrows' matrices are each other's targets.
    first, second = _sim(outputs, si, ti), _sim(outputs, st, tt)
    assert terms["intra_ts_sym_sd"].item() == pytest.approx(sd(first, second), abs=1e-5)
    assert terms["intra_ts_sym_kl"].item() == pytest.approx(
        (_kl(second, first, tau) + _kl(first, second, tau)) / 2, abs=1e-5
    )
    first, second = _sim(outputs, si, si), _sim(outputs, st, st)
    assert terms["intra_ss_sym_kl"].item() == pytest.approx(
        (_kl(second, first, tau) + _kl(first, second, tau)) / 2, abs=1e-5
    )
    first, second = _sim(outputs, si, st), _sim(outputs, st, si)
    assert terms["inter_ss_sym_sd"].item() == pytest.approx(sd(first, second), abs=1e-5)


def test_default_conaclip_recipe_and_per_edge_weights():
    recipe = LossRecipe("conaclip")
    assert recipe.weights == CONACLIP
    assert set(recipe.required_inputs) == set(KEYS) | {"logit_scale"}
    weights = conaclip_weights({"intra_ts": {"fd": 2.0}, "inter_ss": {"infonce": 1.0, "sym_kl": 0.5}})
    assert weights == {"intra_ts_fd": 2.0, "inter_ss_infonce": 1.0, "inter_ss_sym_kl": 0.5}
    outputs = _outputs()
    terms = LossRecipe(weights)(outputs)
    torch.testing.assert_close(
        terms["loss"], 2.0 * terms["intra_ts_fd"] + terms["inter_ss_infonce"] + 0.5 * terms["inter_ss_sym_kl"]
    )
    # A fixed temperature per term instead of 1 / logit_scale.
    fixed = LossRecipe({"inter_ss_kl": 1.0}, {"inter_ss_kl": {"temperature": 0.1}})(outputs)["inter_ss_kl"]
    torch.testing.assert_close(fixed, LossRecipe({"inter_ss_kl": 1.0})(outputs)["inter_ss_kl"])


def test_teacher_embeddings_get_no_gradient_and_students_do():
    outputs = {key: value.requires_grad_(key != "logit_scale") for key, value in _outputs().items()}
    LossRecipe("conaclip")(outputs)["loss"].backward()
    assert outputs["image_embeds"].grad.abs().sum() > 0 and outputs["text_embeds"].grad.abs().sum() > 0
    assert outputs["teacher_image_embeds"].grad is None and outputs["teacher_text_embeds"].grad is None


def test_teacher_of_another_width_fails_clearly():
    outputs = _outputs()
    outputs["teacher_text_embeds"] = torch.randn(5, 12)
    with pytest.raises(ValueError, match="teacher_text_embeds.*width 12"):
        LossRecipe({"intra_ts_fd": 1.0})(outputs)


# --- Knowledge-CLIP --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return load_tokenizer(EMBEDDED_TEXT)


CAPTIONS = [
    "a dog runs on the grass",
    "a black dog jumps over a log",
    "two dogs play in the park",
    "a man rides a bike",
    "a woman cycles down the road",
    "people on bicycles in a race",
    "a bowl of soup",
    "a plate of pasta with sauce",
]


def test_text_teacher_mean_pools_a_tiny_random_llama(minilm_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=minilm_tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    causal = LlamaForCausalLM(config)
    teacher = TextTeacher(causal, minilm_tokenizer)
    batched = teacher.encode(CAPTIONS[:3], batch_size=3)
    alone = torch.cat([teacher.encode([caption], batch_size=1) for caption in CAPTIONS[:3]])
    assert batched.shape == (3, 32) and teacher.hidden_size == 32
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)  # padding does not leak into the mean
    # The same weights as a base model (no LM head) give the same sentence embeddings.
    base = LlamaModel(config)
    base.load_state_dict(causal.model.state_dict())
    torch.testing.assert_close(TextTeacher(base, minilm_tokenizer).encode(CAPTIONS[:3]), batched, atol=1e-5, rtol=1e-5)
    tokens = minilm_tokenizer(CAPTIONS[:1], return_tensors="pt")
    states = base(**tokens).last_hidden_state
    torch.testing.assert_close(
        teacher(tokens["input_ids"], tokens["attention_mask"]), states.mean(1), atol=1e-5, rtol=1e-5
    )


def test_concept_labels_are_distributions_over_kmeans_centroids():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    embeddings = centres.repeat_interleave(10, 0) + 0.3 * torch.randn(30, 3, generator=generator)
    centroids = fit_concept_centroids(embeddings, 3)
    assert centroids.shape == (3, 3)
    labels = soft_concept_labels(embeddings, centroids, temperature=0.1)
    torch.testing.assert_close(labels.sum(-1), torch.ones(30))
    assert (labels >= 0).all()
    hard = labels.argmax(-1)
    # Each well-separated group lands in its own concept.
    assert [len(set(hard[i * 10 : (i + 1) * 10].tolist())) for i in range(3)] == [1, 1, 1]
    assert len(set(hard.tolist())) == 3
    with pytest.raises(ValueError, match="num_concepts"):
        fit_concept_centroids(embeddings, 31)


def test_concept_head_trains_on_a_tiny_problem():
    torch.manual_seed(0)
    embeds = torch.randn(16, 8)
    labels = torch.softmax(3 * torch.randn(16, 4), dim=-1)
    loss_fn = ConceptLearningLoss(embed_dim=8, num_concepts=4)
    outputs = {
        "image_embeds": embeds,
        "text_embeds": embeds + 0.1 * torch.randn(16, 8),
        "teacher_concept_labels": labels,
    }
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=0.1)
    losses = []
    for _ in range(30):
        terms = loss_fn(outputs)
        optimizer.zero_grad()
        terms["concept"].backward()
        optimizer.step()
        losses.append(terms["concept"].item())
    assert losses[-1] < 0.7 * losses[0]
    assert set(terms) == {"concept", "image_concept", "text_concept"}
    assert loss_fn.image_head is loss_fn.text_head
    assert ConceptLearningLoss(8, 4, shared_head=False).text_head is not None


def test_text_embedding_distillation_projects_only_when_widths_differ():
    outputs = {"text_embeds": torch.randn(4, 8), "teacher_lm_text_embeds": torch.randn(4, 32)}
    projected = TextEmbeddingDistillationLoss(student_dim=8, teacher_dim=32)
    assert isinstance(projected.projection, torch.nn.Linear)
    expected = (projected.projection(outputs["text_embeds"]) - outputs["teacher_lm_text_embeds"]).pow(2).sum(-1).mean()
    torch.testing.assert_close(projected(outputs)["text_embedding_distill"], expected)
    same = TextEmbeddingDistillationLoss(student_dim=8, teacher_dim=8)
    assert isinstance(same.projection, torch.nn.Identity)
    matching = {"text_embeds": torch.ones(2, 8), "teacher_lm_text_embeds": torch.ones(2, 8)}
    assert same(matching)["text_embedding_distill"].item() == 0.0
    with pytest.raises(ValueError, match="projection is needed"):
        TextEmbeddingDistillationLoss(8, 32, learned_projection=False)


def test_knowledge_clip_recipe_end_to_end_with_minilm_teacher():
    teacher = TextTeacher.from_pretrained(EMBEDDED_TEXT)
    targets = knowledge_clip_targets(teacher, CAPTIONS, num_concepts=3, batch_size=4)
    assert targets["teacher_lm_text_embeds"].shape == (8, 384)
    torch.testing.assert_close(targets["teacher_concept_labels"].sum(-1), torch.ones(8))
    recipe = knowledge_clip_recipe(student_dim=16, teacher_dim=teacher.hidden_size, num_concepts=3)
    assert recipe.weights == {"text_embedding_distill": 1.0, "concept": 0.01, "contrastive": 1.0}
    assert recipe.needs_teacher and "teacher_concept_labels" in recipe.required_inputs
    trainable = sum(p.numel() for p in recipe.parameters())
    assert trainable == 16 * 384 + (16 * 3 + 3)  # W_e and the shared concept head: the training-only parameters
    generator = torch.Generator().manual_seed(0)
    outputs = {
        "image_embeds": torch.randn(8, 16, generator=generator),
        "text_embeds": torch.randn(8, 16, generator=generator),
    }
    terms = recipe({**outputs, **targets, "logit_scale": torch.tensor(20.0)})
    assert {"text_embedding_distill", "concept", "image_concept", "text_concept", "contrastive", "loss"} == set(terms)
    with pytest.raises(ValueError, match="'concept' could not be built"):
        LossRecipe(
            "knowledge_clip", {"text_embedding_distill": {"student_dim": 16, "teacher_dim": 384}}
        )  # no head size


# --- two-stage compression -------------------------------------------------------------------------------------------


def _tiny_student(vision_config=None) -> DCLIPModel:
    torch.manual_seed(0)
    vision = vision_config or CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4, image_size=30, patch_size=6
    )
    text = BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    return DCLIPModel(DCLIPConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), projection_dim=16)).eval()


def test_select_layers():
    assert select_layers(6, "every_other") == [1, 3, 5]
    assert select_layers(5, "every_other") == [0, 2, 4]
    assert select_layers(12, 4) == [2, 5, 8, 11]
    assert select_layers(4, [3, 0]) == [0, 3]
    assert select_layers(4, None) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        select_layers(4, [4])
    with pytest.raises(ValueError):
        select_layers(4, "half")


def test_compression_keeps_chosen_layers_with_source_weights_and_round_trips(tmp_path):
    student = _tiny_student()
    small = compress_student(student, text_layers="every_other", vision_layers=[0, 3])
    assert small.config.text_config.num_hidden_layers == 2 and small.config.vision_config.num_hidden_layers == 2
    for new, old in enumerate([1, 3]):
        for (name, kept), source in zip(
            small.text_model.encoder.layer[new].state_dict().items(),
            student.text_model.encoder.layer[old].state_dict().values(),
        ):
            assert torch.equal(kept, source), name
    for new, old in enumerate([0, 3]):
        kept, source = (
            small.vision_model.encoder.layers[new].state_dict(),
            student.vision_model.encoder.layers[old].state_dict(),
        )
        assert all(torch.equal(kept[name], source[name]) for name in source)
    for part in ("text_model.embeddings", "vision_model.embeddings", "visual_projection", "text_projection"):
        kept, source = small.get_submodule(part).state_dict(), student.get_submodule(part).state_dict()
        assert all(torch.equal(kept[name], source[name]) for name in source), part
    assert parameter_counts(small)["total"] < parameter_counts(student)["total"]

    small.save_pretrained(tmp_path / "small")
    loaded = DCLIPModel.from_pretrained(tmp_path / "small").eval()
    input_ids, attention_mask = torch.tensor([[2, 5, 7, 9], [2, 4, 3, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    pixel_values = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        expected, actual = (
            small(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask),
            loaded(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask),
        )
    torch.testing.assert_close(actual.logits_per_text, expected.logits_per_text)


def test_timm_vision_tower_is_replaced_by_a_smaller_backbone(tmp_path):
    student = _tiny_student(TimmWrapperConfig(architecture="efficientnet_lite0"))
    with pytest.raises(ValueError, match="vision_architecture"):
        compress_student(student, vision_layers="every_other")
    small = compress_student(student, text_layers=None, vision_architecture="mobilenetv2_100")
    big_tower, small_tower = student.vision_model.timm_model, small.vision_model.timm_model
    # Blocks whose shapes agree are copied whole (stem, first two stages); the others are fresh.
    assert torch.equal(small_tower.conv_stem.weight, big_tower.conv_stem.weight)
    assert torch.equal(small_tower.blocks[1][1].conv_dw.weight, big_tower.blocks[1][1].conv_dw.weight)
    assert small_tower.blocks[2][0].conv_dw.weight.shape != big_tower.blocks[2][0].conv_dw.weight.shape
    # The fresh blocks start from timm's own initialisation, not transformers' normal(0, 0.02), under which the
    # activations of the pretrained stem faded to exactly zero by the last block (every image got one embedding).
    timm_init = timm.create_model("mobilenetv2_100", num_classes=0)
    for name in ("blocks.2.0.conv_pw.weight", "blocks.4.0.conv_pw.weight", "blocks.6.0.conv_pwl.weight"):
        fresh, reference = small_tower.get_parameter(name), timm_init.get_parameter(name)
        torch.testing.assert_close(fresh.std(), reference.std(), rtol=0.1, atol=0)
    assert parameter_counts(small)["vision"] < parameter_counts(student)["vision"]
    small.save_pretrained(tmp_path / "small")
    loaded = DCLIPModel.from_pretrained(tmp_path / "small").eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.get_image_features(pixel_values=pixel_values).pooler_output,
            small.get_image_features(pixel_values=pixel_values).pooler_output,
        )


def test_stage_one_distils_each_tower_from_unpaired_inputs():
    big = _tiny_student()
    small = compress_student(big, text_layers=[3], vision_layers=[3])
    pixel_values = torch.randn(3, 3, 30, 30)  # three images, five unrelated captions
    input_ids, attention_mask = torch.randint(3, 99, (5, 6)), torch.ones(5, 6, dtype=torch.long)
    targets = big_model_targets(big, pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    assert targets["teacher_image_embeds"].shape == (3, 16) and targets["teacher_text_embeds"].shape == (5, 16)
    recipe = LossRecipe("compression_stage1")
    outputs = {
        "image_embeds": small.get_image_features(pixel_values=pixel_values).pooler_output,
        "text_embeds": small.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output,
        "logit_scale": torch.tensor(20.0),
        **targets,
    }
    terms = recipe(outputs)
    assert set(terms) == {"image_contrastive_distill", "text_contrastive_distill", "loss"}
    terms["loss"].backward()
    assert small.vision_model.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert small.text_model.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0
    assert LossRecipe("compression_stage2").weights == {"contrastive": 1.0}
