"""The student and teacher models: CLIP equivalence, embedded towers, teacher initialisation and scoring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import teacher_features
from transformers import CLIPModel

from modeling_dclip import DCLIPModel, DCLIPTeacherModel
from modeling_dclip.towers import EMBEDDED_TEXT, load_embedded_vision_classifier, load_text_tower, load_tokenizer


def _clip_inputs(batch: int = 3):
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(batch, 3, 30, 30, generator=generator)
    input_ids = torch.randint(3, 98, (batch, 7), generator=generator)
    input_ids[:, -1] = 2  # end-of-text, which CLIP's text tower pools
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 5:] = 0
    return pixel_values, input_ids, attention_mask


def test_from_clip_matches_clip_embeddings(tiny_clip, tmp_path):
    tiny_clip.save_pretrained(tmp_path / "clip")
    student = DCLIPModel.from_clip(str(tmp_path / "clip"))
    assert not student.training, "built models come in eval mode, as from_pretrained gives them"
    pixel_values, input_ids, attention_mask = _clip_inputs()
    with torch.no_grad():
        expected = tiny_clip(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, return_loss=True
        )
        got = student(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, return_loss=True)
        image_features = student.get_image_features(pixel_values=pixel_values).pooler_output
        text_features = student.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    torch.testing.assert_close(got.image_embeds, expected.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.text_embeds, expected.text_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.logits_per_image, expected.logits_per_image, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.logits_per_text, got.logits_per_image.t())
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(image_features, tiny_clip.get_image_features(pixel_values=pixel_values).pooler_output)
    assert image_features.shape == (3, 16) and text_features.shape == (3, 16)
    assert torch.equal(student.logit_scale, tiny_clip.logit_scale)


def test_to_clip_round_trip(tiny_clip, tmp_path):
    student = DCLIPModel.from_clip(tiny_clip)
    with torch.no_grad():
        student.visual_projection.weight.add_(0.5)  # a "fine-tuned" student differs from the CLIP it came from
    student.to_clip().save_pretrained(tmp_path / "exported")
    exported = CLIPModel.from_pretrained(tmp_path / "exported").eval()
    pixel_values, input_ids, attention_mask = _clip_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            exported.get_image_features(pixel_values=pixel_values).pooler_output,
            student.get_image_features(pixel_values=pixel_values).pooler_output,
            atol=1e-5,
            rtol=0,
        )
        torch.testing.assert_close(
            exported.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output,
            student.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output,
            atol=1e-5,
            rtol=0,
        )


def test_to_clip_refuses_other_towers(embedded_student):
    with pytest.raises(ValueError, match="CLIP vision and text towers"):
        embedded_student.to_clip()


def test_embedded_vision_tower_is_imagenet_pretrained(sample_photos, embedded_processor):
    classifier = load_embedded_vision_classifier()
    labels = classifier.config.id2label if len(classifier.config.id2label) == 1000 else None
    pixel_values = embedded_processor(images=[sample_photos["chelsea"], sample_photos["coffee"]])["pixel_values"]
    with torch.no_grad():
        top5 = classifier(pixel_values).logits.topk(5).indices
    cat_classes = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    coffee_classes = {967, 968, 504}  # espresso, cup, coffee mug
    assert top5[0, 0].item() in cat_classes, (top5[0].tolist(), labels)
    assert top5[1, 0].item() in coffee_classes, (top5[1].tolist(), labels)


def test_embedded_text_tower_is_pretrained():
    tower = load_text_tower(EMBEDDED_TEXT).eval()
    tokenizer = load_tokenizer(EMBEDDED_TEXT)
    sentences = ["a photo of a cat", "a picture of a kitten", "a red sports car"]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = tower(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embeddings = F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    kitten, car = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
    assert kitten > car + 0.2, (kitten.item(), car.item())


def test_embedded_student_shapes_and_loss(embedded_student, embedded_processor, sample_photos):
    inputs = embedded_processor(images=list(sample_photos.values())[:2], text=["a cat", "a cup of coffee"])
    output = embedded_student(**inputs, return_loss=True)
    assert output.logits_per_image.shape == (2, 2)
    assert output.image_embeds.shape == (2, 64) and output.text_embeds.shape == (2, 64)
    torch.testing.assert_close(output.image_embeds.norm(dim=-1), torch.ones(2))
    assert output.loss.requires_grad and torch.isfinite(output.loss)
    output.loss.backward()
    assert embedded_student.visual_projection.weight.grad is not None
    embedded_student.zero_grad(set_to_none=True)


@pytest.fixture()
def teacher_and_inputs(embedded_student, embedded_processor, sample_photos):
    teacher = DCLIPTeacherModel.from_backbone(
        embedded_student, fusion_dim=64, num_attention_heads=4, intermediate_size=96
    )
    inputs = embedded_processor(
        images=list(sample_photos.values())[:3],
        text=["a cat with whiskers", "a cup of coffee on a saucer", "an astronaut in a suit"],
        boxes=[[[0.1, 0.1, 0.6, 0.7]], [[0.3, 0.2, 0.9, 0.9]], [[0.0, 0.5, 0.5, 1.0]]],
    )
    return teacher.eval(), inputs


def test_teacher_starts_at_its_base(teacher_and_inputs, embedded_student):
    teacher, inputs = teacher_and_inputs
    with torch.no_grad():
        enriched = teacher(**inputs)
        base = embedded_student(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"]
        )
    torch.testing.assert_close(enriched.image_embeds, base.image_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(enriched.text_embeds, base.text_embeds, atol=1e-6, rtol=0)


def test_teacher_trains_only_its_fusion(teacher_and_inputs, embedded_student):
    teacher, inputs = teacher_and_inputs
    assert all(p.requires_grad for p in embedded_student.parameters()), "from_backbone must not freeze its source"
    assert teacher.base.visual_projection.weight.data_ptr() != embedded_student.visual_projection.weight.data_ptr()
    teacher.train()
    assert not teacher.base.training, "the frozen base must stay in eval mode"
    trainable = {name for name, parameter in teacher.named_parameters() if parameter.requires_grad}
    assert trainable and not any(name.startswith("base.") for name in trainable)
    base_before = {k: v.clone() for k, v in teacher.base.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in teacher.parameters() if p.requires_grad], lr=1e-2)
    region_embeds = teacher.encode_regions(inputs["region_pixel_values"], inputs["region_mask"])
    cached = {k: v for k, v in inputs.items() if k != "region_pixel_values"}
    for _ in range(3):
        loss = teacher(**cached, region_embeds=region_embeds, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert teacher.image_gate.item() != 0.0 and teacher.text_gate.item() != 0.0
    for key, value in teacher.base.state_dict().items():
        assert torch.equal(value, base_before[key]), f"frozen base changed: {key}"
    teacher.eval()
    with torch.no_grad():
        assert not torch.allclose(teacher(**inputs).image_embeds, teacher(**inputs).base_image_embeds)


def test_teacher_accepts_cached_features_and_scores_pairs(teacher_and_inputs):
    teacher, inputs = teacher_and_inputs
    with torch.no_grad():
        teacher.image_gate.fill_(0.7)
        teacher.text_gate.fill_(0.7)
        fresh = teacher(**inputs, output_attentions=True)
        region_embeds = teacher.encode_regions(inputs["region_pixel_values"], inputs["region_mask"])
        cached = teacher(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            region_boxes=inputs["region_boxes"],
            region_scores=inputs["region_scores"],
            region_mask=inputs["region_mask"],
            region_embeds=region_embeds,
            image_embeds=fresh.base_image_embeds,
        )
        text_states, text_embeds = teacher.encode_text_tokens(inputs["input_ids"], inputs["attention_mask"])
        scores = teacher.score_pairs(
            region_embeds,
            inputs["region_boxes"],
            inputs["region_scores"],
            inputs["region_mask"],
            fresh.base_image_embeds,
            text_states,
            inputs["attention_mask"],
            text_embeds,
            max_pairs_per_step=4,
        )
    torch.testing.assert_close(cached.image_embeds, fresh.image_embeds, atol=1e-5, rtol=0)
    assert scores.shape == (3, 3)
    # The diagonal of the pairwise scores is the paired forward pass.
    torch.testing.assert_close(scores.diagonal(), (fresh.image_embeds * fresh.text_embeds).sum(-1), atol=1e-5, rtol=0)
    text_to_region, region_to_text = fresh.cross_attentions[0]
    regions = inputs["region_mask"].shape[1]
    assert text_to_region.shape == (3, inputs["input_ids"].shape[1], regions)
    assert region_to_text.shape == (3, regions, inputs["input_ids"].shape[1])
    torch.testing.assert_close(text_to_region.sum(-1), torch.ones_like(text_to_region.sum(-1)))


def test_score_pairs_is_every_pair_fused(teacher_and_inputs):
    teacher, _ = teacher_and_inputs
    with torch.no_grad():
        teacher.image_gate.fill_(0.7)
        teacher.text_gate.fill_(0.7)
        features = teacher_features(teacher, images=5, texts=4, regions=6, tokens=12)
        scores = teacher.score_pairs(**features, max_pairs_per_step=10)
        image_keys = ("region_embeds", "region_boxes", "region_scores", "region_mask", "image_embeds")
        for t in range(4):
            for i in range(5):
                pair = {key: value[[i] if key in image_keys else [t]] for key, value in features.items()}
                image, text, _ = teacher.fuse(**pair)
                torch.testing.assert_close(scores[t, i], (image * text).sum(), atol=1e-5, rtol=0)


def _repeated_index_backwards(output: torch.Tensor) -> list[str]:
    """The nodes of `output`'s backward graph that index with a repeated index (their backward accumulates)."""
    found, stack, seen = [], [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "IndexBackward0":
            indices = [index for index in node._saved_indices if index is not None]
            if any(index.unique().numel() < index.numel() for index in indices):
                found.append(f"{type(node).__name__} over {[tuple(index.shape) for index in indices]}")
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def test_pairwise_training_gradients_are_reproducible(teacher_and_inputs):
    """The pairwise objective's gradients are bitwise the same every time on a multi-threaded CPU.

    Building the pairs by indexing with repeated indices made them vary from run to run, and the teacher's training
    with them: the backward of such an index adds into each image's gradient from several threads at once (atomic
    adds, in whatever order the threads happen to run). Whether a given step races depends on timing, so the check
    is twofold: the graph holds no such backward, and repeated steps give equal gradients.
    """
    teacher, _ = teacher_and_inputs
    teacher.train()
    features = teacher_features(teacher, images=24, texts=24, regions=6, tokens=12)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gradients = []
        for _ in range(5):
            teacher.zero_grad()
            torch.manual_seed(0)  # the same dropout masks each time
            scores = teacher.score_pairs(**features, max_pairs_per_step=24 * 24)
            assert not _repeated_index_backwards(scores)
            F.cross_entropy(scores / 0.05, torch.arange(24)).backward()
            gradients.append({name: p.grad.clone() for name, p in teacher.named_parameters() if p.grad is not None})
    finally:
        torch.set_num_threads(threads)
    assert "region_projection.weight" in gradients[0] and "text_token_projection.weight" in gradients[0]
    for other in gradients[1:]:
        for name, gradient in gradients[0].items():
            assert torch.equal(gradient, other[name]), f"{name}: gradient differs between identical steps"


def test_from_vision_text_pretrained_with_local_towers(tiny_clip, tmp_path):
    """Towers from local folders: a ViT backbone, a timm model through TimmWrapper, CLIP towers, a BERT encoder."""
    from transformers import BertConfig, BertModel, TimmWrapperConfig, TimmWrapperModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            image_size=30,
            patch_size=6,
        )
    ).save_pretrained(tmp_path / "vit")
    TimmWrapperModel(TimmWrapperConfig(architecture="resnet10t", num_labels=3)).save_pretrained(tmp_path / "timm")
    bert = BertModel(
        BertConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    )
    bert.save_pretrained(tmp_path / "bert")
    tiny_clip.save_pretrained(tmp_path / "clip")
    input_ids = torch.randint(3, 98, (2, 6))
    attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    pixel_values = torch.randn(2, 3, 30, 30)

    for vision in ("vit", "timm", "clip"):
        student = DCLIPModel.from_vision_text_pretrained(
            str(tmp_path / vision), str(tmp_path / "bert"), projection_dim=8
        )
        output = student(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        assert output.logits_per_image.shape == (2, 2) and output.image_embeds.shape == (2, 8)
        assert student.config.text_pooling == "mean"
        assert not student.training
        assert (
            student.config.vision_config.model_type
            == {"vit": "vit", "timm": "timm_wrapper", "clip": "clip_vision_model"}[vision]
        )

    # The text tower really is the saved BERT, mean pooled over real tokens only.
    with torch.no_grad():
        states = bert.eval()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = (states * attention_mask.unsqueeze(-1)).sum(1) / attention_mask.sum(1, keepdim=True)
        expected = student.text_projection(pooled)
        got = student.eval().get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    clip_student = DCLIPModel.from_vision_text_pretrained(str(tmp_path / "clip"), str(tmp_path / "clip"))
    assert clip_student.config.has_clip_towers and clip_student.config.text_pooling == "pooler"
