"""`dclip run --preset tiny` end to end on the embedded towers: outputs, results layout, reuse of finished stages,
a failing stage named; and the teacher's pairwise objective, which trains the score the teacher is evaluated with."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import teacher_features
from huggingface_hub import ModelCard

from modeling_dclip import DCLIPModel, DCLIPProcessor, DCLIPTeacherModel
from modeling_dclip.cli import main
from modeling_dclip.training.checkpointing import is_complete
from modeling_dclip.training.teacher import TeacherStep

METRIC_KEYS = {
    "text_to_image_R@1",
    "text_to_image_R@5",
    "text_to_image_R@10",
    "image_to_text_R@1",
    "image_to_text_R@5",
    "image_to_text_R@10",
    "text_to_image_mAP",
    "image_to_text_mAP",
    "text_to_image_MRR",
    "image_to_text_MRR",
    "compositional_accuracy",
    "zeroshot_top1",
    "zeroshot_top5",
}


@pytest.mark.slow
def test_tiny_run_writes_loadable_models_and_results(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--preset", "tiny", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"models", "dataset", "stages", "versions"}
    assert set(results["models"]) == {"base", "teacher", "student"}
    for metrics in results["models"].values():
        assert METRIC_KEYS <= set(metrics)
        assert all(0.0 <= metrics[key] <= 1.0 for key in METRIC_KEYS)
    assert "| text_to_image_R@1 |" in (out / "results.md").read_text()
    DCLIPModel.from_pretrained(out / "base")
    DCLIPModel.from_pretrained(out / "student")
    DCLIPTeacherModel.from_pretrained(out / "teacher")
    for name in ("base", "teacher", "student"):
        DCLIPProcessor.from_pretrained(out / name)

    capsys.readouterr()
    assert main(["run", "--preset", "tiny", "--output-dir", str(out)]) == 0
    log = capsys.readouterr().out
    assert "align_base: reusing" in log and "distill_student: reusing" in log

    # `dclip card` on this very output: each card's model-index carries exactly the run's measured numbers.
    assert main(["card", "--run", str(out)]) == 0
    for name in ("base", "teacher", "student"):
        card = ModelCard.load(out / name / "README.md")
        assert {result.metric_type: result.metric_value for result in card.data.eval_results} == results["models"][name]
        assert {result.dataset_split for result in card.data.eval_results} == {"test"}


def test_unknown_preset_is_a_clear_error(tmp_path, capsys):
    assert main(["run", "--preset", "huge", "--output-dir", str(tmp_path)]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err


def test_failing_stage_is_named_and_finished_stages_are_kept(tmp_path, capsys):
    config = tmp_path / "bad_teacher.yaml"
    config.write_text("teacher: {objective: bogus}\n")
    out = tmp_path / "run"
    assert main(["run", "--preset", "tiny", "--config", str(config), "--output-dir", str(out)]) == 1
    error = capsys.readouterr().err
    assert "stage 'train_teacher' failed" in error and "bogus" in error
    assert is_complete(out / "base") and not is_complete(out / "teacher")


def test_pairwise_teacher_objective_trains_the_evaluation_score(tiny_clip):
    teacher = DCLIPTeacherModel.from_backbone(
        DCLIPModel.from_clip(tiny_clip), fusion_dim=16, num_attention_heads=2, intermediate_size=32, dropout=0.0
    )
    with torch.no_grad():
        teacher.image_gate.fill_(0.5)
        teacher.text_gate.fill_(0.5)
    batch = teacher_features(teacher, images=4, texts=4)
    image_inputs = {
        k: batch[k] for k in ("region_embeds", "region_boxes", "region_scores", "region_mask", "image_embeds")
    }
    text_inputs = {k: batch[k] for k in ("text_states", "attention_mask", "text_embeds")}
    with torch.no_grad():
        scores = teacher.score_pairs(**image_inputs, **text_inputs, max_pairs_per_step=3)  # several steps
        paired_image, paired_text, _ = teacher.fuse(**batch)
    # Row t, column i: caption t read with image i, exactly as evaluation scores it.
    torch.testing.assert_close(scores.diagonal(), (paired_image * paired_text).sum(-1), atol=1e-5, rtol=0)
    logits, labels = scores / teacher.config.temperature, torch.arange(4)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2

    terms = TeacherStep(teacher, "pairwise")(batch)
    torch.testing.assert_close(terms["loss"], expected, atol=1e-5, rtol=1e-5)
    terms["loss"].backward()
    assert teacher.image_gate.grad is not None and teacher.layers[0].text_to_region.in_proj_weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.base.parameters())
    with pytest.raises(ValueError, match="objective"):
        TeacherStep(teacher, "bogus")
