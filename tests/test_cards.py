"""`dclip card`: model cards written from a `dclip run` output must carry exactly the numbers of its results.json."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard import REGEX_YAML_BLOCK
from huggingface_hub.repocard_data import eval_results_to_model_index
from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

from modeling_dclip import EMBEDDED_TEXT, EMBEDDED_VISION, DCLIPConfig, DCLIPModel, DCLIPProcessor, DCLIPTeacherModel
from modeling_dclip.cli import main as dclip_main
from modeling_dclip.evaluation import compositional_accuracy_from_embeddings, retrieval_metrics
from modeling_dclip.publishing.cards import base_models_from_config, write_model_cards
from modeling_dclip.towers import load_tokenizer

CAPTIONS = {
    "chelsea": ["a cat looking at the camera", "a tabby cat with green eyes"],
    "coffee": ["a cup of coffee on a saucer", "an espresso in a red cup"],
    "astronaut": ["an astronaut in a space suit", "a woman in front of a flag"],
    "rocket": ["a rocket on a launch pad", "a space rocket at night"],
}
# Hard negatives: the same words, swapped roles.
NEGATIVES = {
    "chelsea": "a camera looking at the cat",
    "coffee": "a saucer of coffee on a cup",
    "astronaut": "a space suit in an astronaut",
    "rocket": "a launch pad on a rocket",
}
LABELS = ["cat", "coffee", "astronaut", "rocket", "dog", "car"]
LABEL_OF = {"chelsea": "cat", "coffee": "coffee", "astronaut": "astronaut", "rocket": "rocket"}
ROLES = ("base", "teacher", "student")


def tiny_student(seed: int) -> DCLIPModel:
    """A student with tiny CLIP towers; its text tower reads the embedded MiniLM tokenizer's ids."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30, patch_size=6
    )
    text = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=30522,
        max_position_embeddings=64,  # MiniLM's vocabulary; [CLS], [SEP], [PAD]:
        bos_token_id=101,
        eos_token_id=102,
        pad_token_id=0,
    )
    config = DCLIPConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), projection_dim=16)
    return DCLIPModel(config).eval()


def tiny_processor() -> DCLIPProcessor:
    image_processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    return DCLIPProcessor(image_processor=image_processor, tokenizer=load_tokenizer(EMBEDDED_TEXT))


@torch.no_grad()
def evaluate_student(model: DCLIPModel, processor: DCLIPProcessor, photos: dict) -> dict[str, float]:
    """The run's metrics, measured for real on the sample photos with the project's evaluation functions."""
    names = list(CAPTIONS)
    captions = [caption for name in names for caption in CAPTIONS[name]]
    caption_to_image = torch.tensor([index for index, name in enumerate(names) for _ in CAPTIONS[name]])
    inputs = processor(images=[photos[name] for name in names], text=captions)
    image_embeds = F.normalize(model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output, dim=-1)

    def embed(texts: list[str]) -> torch.Tensor:
        encoded = processor(text=texts)
        features = model.get_text_features(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
        return F.normalize(features.pooler_output, dim=-1)

    metrics = retrieval_metrics(embed(captions) @ image_embeds.T, caption_to_image)
    metrics["compositional_accuracy"] = compositional_accuracy_from_embeddings(
        image_embeds, embed([CAPTIONS[name][0] for name in names]), embed([NEGATIVES[name] for name in names])
    )
    label_scores = image_embeds @ embed([f"a photo of a {label}." for label in LABELS]).T
    truth = torch.tensor([LABELS.index(LABEL_OF[name]) for name in names])
    ranking = label_scores.argsort(dim=1, descending=True)
    metrics["zeroshot_top1"] = (ranking[:, 0] == truth).double().mean().item()
    metrics["zeroshot_top5"] = (ranking[:, :5] == truth[:, None]).any(dim=1).double().mean().item()
    return metrics


@torch.no_grad()
def evaluate_teacher(teacher: DCLIPTeacherModel, processor: DCLIPProcessor, photos: dict) -> dict[str, float]:
    names = list(CAPTIONS)
    captions = [caption for name in names for caption in CAPTIONS[name]]
    caption_to_image = torch.tensor([index for index, name in enumerate(names) for _ in CAPTIONS[name]])
    images = processor(images=[photos[name] for name in names], regions=True)
    texts = processor(text=captions)
    region_embeds = teacher.encode_regions(images["region_pixel_values"], images["region_mask"])
    image_embeds = F.normalize(
        teacher.base.get_image_features(pixel_values=images["pixel_values"]).pooler_output, dim=-1
    )
    text_states, text_embeds = teacher.encode_text_tokens(texts["input_ids"], texts["attention_mask"])
    scores = teacher.score_pairs(
        region_embeds,
        images["region_boxes"],
        images["region_scores"],
        images["region_mask"],
        image_embeds,
        text_states,
        texts["attention_mask"],
        text_embeds,
    )
    return retrieval_metrics(scores, caption_to_image)


def build_run(run_dir: Path, photos: dict) -> dict:
    """A `dclip run` output: base, teacher and student folders with processors, and a measured results.json."""
    processor = tiny_processor()
    base = tiny_student(seed=0)
    student = tiny_student(seed=1)
    teacher = DCLIPTeacherModel.from_backbone(base, fusion_dim=16, num_attention_heads=2, intermediate_size=32).eval()
    for role, model in (("base", base), ("teacher", teacher), ("student", student)):
        model.save_pretrained(run_dir / role)
        processor.save_pretrained(run_dir / role)
    results = {
        "models": {
            "base": evaluate_student(base, processor, photos),
            "teacher": evaluate_teacher(teacher, processor, photos),
            "student": evaluate_student(student, processor, photos),
        },
        # As `dclip run` writes them: one dataset spec, and each stage's config.
        "dataset": {"spec": "../data/skimage-photos", "splits": {"train": 32, "test": 4}, "evaluated_on": "test"},
        # As `dclip run` writes them: the preset, and each model's stage record (its stage.json's inputs: the
        # resolved config without local paths, and the fingerprints of what the stage read).
        "preset": {"seed": 0, "image_size": 30, "regions": {"type": "grid", "scales": [2]}},
        "stages": {
            "base": {
                "fingerprint": "f0",
                "config": {"vision_model": EMBEDDED_VISION, "text_model": EMBEDDED_TEXT, "learning_rate": 2e-3},
                "towers": {"vision_model": "d1", "text_model": "d2"},
                "data": {"rows": 32},
            },
            "teacher": {
                "fingerprint": "f1",
                "config": {"learning_rate": 5e-4, "temperature": 0.05},
                "base": "f0",
                "data": {"rows": 32},
                "regions": {"type": "grid", "scales": [2]},
            },
            "student": {
                "fingerprint": "f2",
                "config": {"learning_rate": 1e-6, "loss_weights": {"contrastive": 1.0, "image_distill": 1.0}},
                "base": "f0",
                "teacher": "f1",
                "data": {"rows": 32},
            },
        },
        "versions": {"dclip": "0.1.0", "torch": torch.__version__},
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    (run_dir / "results.md").write_text("# results\n")
    return results


@pytest.fixture(scope="module")
def run_output(tmp_path_factory, sample_photos) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, build_run(run_dir, sample_photos)


def _split_card(path: Path) -> tuple[dict, str]:
    text = path.read_text(encoding="utf-8")
    match = REGEX_YAML_BLOCK.search(text)
    assert match, f"{path} has no YAML header"
    return yaml.safe_load(match.group(2)), text[match.end() :]


def _results_table(body: str) -> tuple[list[str], dict[str, list[str]]]:
    """The roles (columns) and metric rows of the card's 'Results measured by this run' table."""
    section = body.split("## Results measured by this run", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return [re.sub(r" \(this model\)$", "", role) for role in header[1:]], rows


def test_dclip_card_metadata_equals_results_json(run_output):
    run_dir, results = run_output
    assert dclip_main(["card", "--run", str(run_dir)]) == 0

    for role in ROLES:
        card = ModelCard.load(run_dir / role / "README.md")  # parses and validates the metadata, or raises
        measured = {result.metric_type: result.metric_value for result in card.data.eval_results}
        assert measured == results["models"][role]  # same metric names, exactly the same floats
        assert len(card.data.eval_results) == len(results["models"][role])
        for result in card.data.eval_results:
            assert (result.dataset_type, result.dataset_name, result.dataset_split) == ("skimage-photos",) * 2 + (
                "test",
            )
            assert result.task_type
        assert card.data.pipeline_tag == "zero-shot-image-classification"
        assert card.data.library_name == "transformers"
        assert card.data.license == "apache-2.0"
        assert card.data.datasets == ["skimage-photos"]
        # The embedded text tower is exactly this Hub model; the EfficientNet-Lite0 weights have no Hub repository.
        assert card.data.base_model == ["sentence-transformers/all-MiniLM-L6-v2"]
        assert "dclip" in card.data.tags and f"dclip-{role}" in card.data.tags

        # The metadata round-trips through huggingface_hub's own model-index parser and writer.
        metadata, body = _split_card(run_dir / role / "README.md")
        reparsed = ModelCardData(**metadata)
        assert eval_results_to_model_index(reparsed.model_name, reparsed.eval_results) == metadata["model-index"]

        # Every number of the body's results table is the results.json value (4 decimals, as the card says).
        columns, rows = _results_table(body)
        assert columns == list(ROLES)
        assert set(rows) == {metric for model in results["models"].values() for metric in model}
        for metric, cells in rows.items():
            for column, cell in zip(columns, cells):
                expected = results["models"][column].get(metric)
                assert cell == ("-" if expected is None else f"{expected:.4f}"), (role, metric, column)

        # The settings of the stages that made this model appear as recorded, without the local folders it used.
        assert "| align_base.learning_rate | 0.002 |" in body
        assert ("| distill_student.learning_rate | 1e-06 |" in body) == (role == "student")
        assert ("| train_teacher.temperature | 0.05 |" in body) == (role == "teacher")
        assert str(run_dir) not in body


def test_card_says_what_was_measured_and_what_is_the_papers(run_output):
    run_dir, _ = run_output
    write_model_cards(run_dir)
    student_body = _split_card(run_dir / "student" / "README.md")[1]
    assert "Every figure below was measured by the `dclip run` that produced this model" in student_body
    assert "Text-to-image retrieval: skimage-photos, split `test`, 4 images" in student_body
    assert "Training data of this run: skimage-photos, split `train`, 32 images" in student_body
    assert "## What the DCLIP paper reports (not measured here)" in student_body
    assert "about 94% of that CLIP's zero-shot classification accuracy" in student_body
    # CLIP towers: the card shows the export to a plain CLIPModel.
    assert "model.to_clip().save_pretrained" in student_body
    teacher_body = _split_card(run_dir / "teacher" / "README.md")[1]
    assert "regions=True" in teacher_body and "score_pairs" in teacher_body


def test_usage_snippets_run_against_the_saved_folders(run_output, tmp_path, monkeypatch, sample_photos):
    run_dir, _ = run_output
    repo_ids = {role: str(run_dir / role) for role in ROLES}
    write_model_cards(run_dir, repo_ids=repo_ids)
    monkeypatch.chdir(tmp_path)
    sample_photos["chelsea"].save("your_image.jpg")
    for role, expected in (("student", "probabilities"), ("teacher", "scores")):
        body = _split_card(run_dir / role / "README.md")[1]
        snippets = re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)
        assert snippets, f"no usage snippet in the {role} card"
        namespace: dict = {}
        for snippet in snippets:
            exec(compile(snippet, f"<{role} card snippet>", "exec"), namespace)
        assert expected in namespace
    # The plain-CLIP export loads in transformers' CLIPModel and gives the student's own logits.
    assert (tmp_path / "dclip-as-clip" / "config.json").is_file()
    clip = CLIPModel.from_pretrained(tmp_path / "dclip-as-clip").eval()
    clip_processor = CLIPProcessor.from_pretrained(tmp_path / "dclip-as-clip")
    student = DCLIPModel.from_pretrained(run_dir / "student").eval()
    inputs = clip_processor(
        images=sample_photos["coffee"], text=["a cup of coffee", "a cat"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        clip_logits = clip(**inputs).logits_per_image
        student_logits = student(**inputs).logits_per_image
    torch.testing.assert_close(clip_logits, student_logits)


def test_embedded_tower_student_has_no_clip_export(run_output, tmp_path):
    run_dir, _ = run_output
    other = tmp_path / "run"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("base", "teacher"))
    config = json.loads((other / "student" / "config.json").read_text())
    config["vision_config"] = {"model_type": "timm_wrapper", "architecture": "efficientnet_lite0"}
    config["text_config"] = {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6}
    (other / "student" / "config.json").write_text(json.dumps(config))
    (path,) = write_model_cards(other)
    body = _split_card(path)[1]
    assert "to_clip" not in body
    assert "timm `efficientnet_lite0`" in body and "`bert` (hidden_size 384, num_hidden_layers 6)" in body


def test_base_models_from_run_config(tmp_path):
    assert base_models_from_config({"vision_model": EMBEDDED_VISION, "text_model": EMBEDDED_TEXT}) == [
        "sentence-transformers/all-MiniLM-L6-v2"
    ]
    assert base_models_from_config({"base_model": "openai/clip-vit-base-patch16"}) == ["openai/clip-vit-base-patch16"]
    # Local folders are not Hub ids.
    assert base_models_from_config({"vision_model": str(tmp_path), "text_model": EMBEDDED_TEXT}) == [
        "sentence-transformers/all-MiniLM-L6-v2"
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda r: r["models"]["student"].update({"zeroshot_top1": 52.3}),
            r"models\.student\.zeroshot_top1: 52\.3 is not a fraction",
        ),
        (
            lambda r: r["models"]["base"].update({"text_to_image_R@1": "high"}),
            r"models\.base\.text_to_image_R@1: expected a finite number",
        ),
        (
            lambda r: r.update(dataset={"retrieval": "flickr8k-1k", "compositional": "scenes"}),
            r"'dataset' names no data for the zeroshot metrics",
        ),
        (lambda r: r.pop("dataset"), r"missing 'dataset'"),
    ],
)
def test_bad_results_json_is_refused_naming_the_key_and_nothing_is_written(run_output, tmp_path, change, message):
    run_dir, results = run_output
    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    for role in ROLES:
        (other / role / "README.md").unlink(missing_ok=True)
    broken = json.loads(json.dumps(results))
    change(broken)
    (other / "results.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=message) as error:
        write_model_cards(other)
    assert str(other / "results.json") in str(error.value)
    assert not any((other / role / "README.md").exists() for role in ROLES)


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ("flickr8k-1k", {"retrieval": ("flickr8k-1k", "test"), "zeroshot": ("flickr8k-1k", "test")}),
        (
            {
                "retrieval": {"name": "Flickr8k 1k", "id": "flickr8k-1k", "split": "test", "num_images": 125},
                "zeroshot": {"name": "CIFAR-10", "id": "cifar10", "split": "test"},
                "compositional": "synthetic scenes (seed 0)",
                "train": {"name": "Flickr8k 1k", "id": "flickr8k-1k", "split": "train"},
            },
            {
                "retrieval": ("flickr8k-1k", "test"),
                "zeroshot": ("cifar10", "test"),
                "compositional": ("synthetic-scenes-seed-0", "test"),
            },
        ),
    ],
)
def test_other_forms_of_the_dataset_entry(run_output, tmp_path, dataset, expected):
    run_dir, results = run_output
    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    (other / "results.json").write_text(json.dumps({**results, "dataset": dataset}))
    card = ModelCard.load(write_model_cards(other)[2])
    example = {
        "retrieval": "text_to_image_R@1",
        "zeroshot": "zeroshot_top1",
        "compositional": "compositional_accuracy",
    }
    by_metric = {result.metric_type: result for result in card.data.eval_results}
    for group, (dataset_id, split) in expected.items():
        assert (by_metric[example[group]].dataset_type, by_metric[example[group]].dataset_split) == (dataset_id, split)
    assert card.data.datasets == ["flickr8k-1k"]


def _edit_results(run_dir: Path, change) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    change(results)
    (run_dir / "results.json").write_text(json.dumps(results))


@pytest.mark.parametrize(
    "base_record",
    [
        # `dclip run --base-model openai/clip-vit-base-patch16`: the CLIP imported unchanged as the base.
        {
            "fingerprint": "f0",
            "base_model": "openai/clip-vit-base-patch16",
            "content": "hub:openai/clip-vit-base-patch16",
        },
        # align_base started from the CLIP (init_from): the default tower names in its config are not used.
        {
            "fingerprint": "f0",
            "config": {"vision_model": EMBEDDED_VISION, "text_model": EMBEDDED_TEXT, "projection_dim": 256},
            "towers": {"init_from": "hub:openai/clip-vit-base-patch16"},
        },
    ],
)
def test_a_run_from_a_clip_checkpoint_names_that_checkpoint(run_output, tmp_path, base_record):
    run_dir, _ = run_output
    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    _edit_results(other, lambda r: r["stages"].update(base=base_record))
    for path in write_model_cards(other):
        card = ModelCard.load(path)
        assert card.data.base_model == ["openai/clip-vit-base-patch16"], path
        body = _split_card(path)[1]
        assert "| align_base.vision_model |" not in body
        assert "dclip-embedded/" not in body
        assert "all-MiniLM" not in str(card.data.to_dict())


def test_a_base_started_from_an_unrecorded_local_folder_gets_no_guessed_base_model(run_output, tmp_path):
    run_dir, _ = run_output
    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    record = {"fingerprint": "f0", "config": {"learning_rate": 2e-3}, "towers": {"init_from": "0123abcd"}}
    _edit_results(other, lambda r: r["stages"].update(base=record))
    for path in write_model_cards(other):
        assert ModelCard.load(path).data.base_model is None, path


def _single_stage_outputs(run_dir: Path, root: Path, with_stage_records: bool) -> Path:
    """Model folders without a results.json: as the three single-stage trainers write them (training_complete.json
    naming the stage), or as `dclip run` leaves them before its evaluation (each with its stage.json)."""
    stages = {"base": "align_base", "teacher": "train_teacher", "student": "distill_student"}
    configs = {
        "align_base": {"vision_model": EMBEDDED_VISION, "text_model": EMBEDDED_TEXT, "learning_rate": 0.002},
        "train_teacher": {"temperature": 0.05},
        "distill_student": {"learning_rate": 1e-6},
    }
    for role, stage in stages.items():
        shutil.copytree(run_dir / role, root / role, ignore=shutil.ignore_patterns("README.md"))
        (root / role / "training_complete.json").write_text(json.dumps({"stage": stage, "steps": 4}))
        if with_stage_records:
            record = {"stage": stage, "fingerprint": "f", "inputs": {"config": configs[stage], "data": {"rows": 8}}}
            (root / role / "stage.json").write_text(json.dumps(record))
    return root


@pytest.mark.parametrize("with_stage_records", [False, True])
def test_cards_for_single_stage_trainer_outputs(run_output, tmp_path, with_stage_records):
    run_dir, _ = run_output
    outputs = _single_stage_outputs(run_dir, tmp_path / "outputs", with_stage_records)
    assert dclip_main(["card", "--run", str(outputs)]) == 0
    assert dclip_main(["card", "--run", str(outputs / "student")]) == 0  # one model folder works too
    for role in ROLES:
        card = ModelCard.load(outputs / role / "README.md")
        body = _split_card(outputs / role / "README.md")[1]
        assert f"dclip-{role}" in card.data.tags
        assert not card.data.eval_results
        assert "No evaluation was recorded with this model" in body
        if with_stage_records:
            # The student's and the teacher's base_model is traced through the base folder to its towers.
            assert card.data.base_model == ["sentence-transformers/all-MiniLM-L6-v2"], role
            assert "| align_base.learning_rate | 0.002 |" in body
            assert str(outputs) not in body
        else:
            assert card.data.base_model is None
            assert "No training settings were recorded with this model." in body


def test_card_states_the_detector_and_its_license(run_output, tmp_path):
    run_dir, _ = run_output
    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    processor_config = json.loads((other / "teacher" / "processor_config.json").read_text())
    processor_config["region_config"] = {"type": "yolo", "weights": "region_detector/detector.pt"}
    (other / "teacher" / "processor_config.json").write_text(json.dumps(processor_config))
    (other / "teacher" / "region_detector").mkdir()
    (other / "teacher" / "region_detector" / "detector.pt").write_bytes(b"weights")
    write_model_cards(other)
    body = _split_card(other / "teacher" / "README.md")[1]
    assert "Region detector: ultralytics YOLO weights `region_detector/detector.pt` (saved in this repository)" in body
    assert "AGPL-3.0" in body
    assert "Region detector" not in _split_card(other / "student" / "README.md")[1]
