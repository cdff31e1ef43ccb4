"""`dclip eval` on tiny saved models (student, teacher, plain CLIP) over small datasets written to tmp_path: the
metrics in results.json equal a direct computation with the models and `modeling_dclip.evaluation`, and bad
inputs fail with an error that names them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TEXT, TINY_TOWER, tiny_image_processor, tiny_student
from PIL import Image
from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
)

from modeling_dclip import DCLIPModel, DCLIPProcessor, DCLIPTeacherModel
from modeling_dclip.cli import main
from modeling_dclip.data import load_dataset_spec
from modeling_dclip.evaluation import (
    RECALL_AT_K,
    caption_pairs,
    compositional_accuracy,
    get_templates,
    retrieval_metrics,
    zeroshot_classification,
)

SCENES = "synthetic:?n=6&seed=1"
RETRIEVAL_KEYS = {f"{direction}_R@{k}" for direction in ("text_to_image", "image_to_text") for k in RECALL_AT_K} | {
    f"{direction}_{measure}" for direction in ("text_to_image", "image_to_text") for measure in ("mAP", "MRR")
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A tiny student, a teacher over it (gates opened so the fusion counts), a plain CLIPModel and a BertModel."""
    root = tmp_path_factory.mktemp("models")
    student, processor = tiny_student()
    tokenizer = processor.tokenizer
    teacher = DCLIPTeacherModel.from_backbone(student, fusion_dim=16, num_attention_heads=2, intermediate_size=32)
    with torch.no_grad():
        teacher.image_gate.fill_(0.7)
        teacher.text_gate.fill_(0.7)
    clip = CLIPModel(
        CLIPConfig(
            vision_config=student.config.vision_config.to_dict(),
            text_config={**TINY_TOWER, **TINY_TEXT},
            projection_dim=16,
        )
    )
    paths = {name: root / name for name in ("student", "teacher", "clip", "bert")}
    for name, model, model_processor in (
        ("student", student, processor),
        ("teacher", teacher, processor),
        ("clip", clip, CLIPProcessor(image_processor=tiny_image_processor(), tokenizer=tokenizer)),
    ):
        model.save_pretrained(paths[name])
        model_processor.save_pretrained(paths[name])
    BertModel(BertConfig(**TINY_TOWER, vocab_size=99)).save_pretrained(paths["bert"])
    return paths


def write_images(folder: Path, count: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{index}.png"
        Image.fromarray(rng.integers(0, 256, (24 + 4 * index, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def caption_table(tmp_path_factory) -> str:
    """A hand-written JSONL caption table (2 captions per image, no labels, no hard negatives): its spec."""
    root = tmp_path_factory.mktemp("table")
    lines = []
    for index, path in enumerate(write_images(root / "images", 4, seed=1)):
        for caption in (f"picture number {index}", f"a noisy image with {index} colours"):
            lines.append(json.dumps({"image": str(path), "caption": caption, "split": "test"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return f"jsonl:{root / 'pairs.jsonl'}"


@pytest.fixture(scope="module", autouse=True)
def subprocess_runs(saved, tmp_path_factory) -> dict[str, tuple[subprocess.Popen, Path]]:
    """`python -m modeling_dclip.cli eval` on the student and on the teacher, started side by side before the
    other tests of this file, which run meanwhile; `finished` collects them."""
    out = tmp_path_factory.mktemp("runs")
    runs = {}
    for name in ("student", "teacher"):
        command = [
            sys.executable,
            "-m",
            "modeling_dclip.cli",
            "eval",
            "--model",
            str(saved[name]),
            "--dataset",
            SCENES,
            "--task",
            "retrieval",
            "compositional",
            "zeroshot",
            "--output-dir",
            str(out / name),
            "--feature-store",
            str(out / "store"),
        ]
        # Outside the repository, so that `-m` imports the installed package, not the source tree.
        runs[name] = (
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out),
            out / name,
        )
    yield runs
    for process, _ in runs.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def finished(run: tuple[subprocess.Popen, Path]) -> dict:
    """The results.json of a finished run, after checking its exit status and printed table."""
    process, out = run
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "text_to_image_R@1" in stdout and "compositional_accuracy" in stdout
    return json.loads((out / "results.json").read_text())


def scene_inputs(processor) -> tuple:
    dataset = load_dataset_spec(SCENES)
    pairs = caption_pairs(dataset, with_hard_negatives=True)
    images = [image.convert("RGB") for image in dataset["image"]]
    return dataset, pairs, images


def assert_metrics_equal(found: dict[str, float], expected: dict[str, float]) -> None:
    assert set(found) == set(expected)
    for name, value in expected.items():
        assert found[name] == pytest.approx(value, abs=1e-6), name


def check_common_fields(results: dict, model_path: Path, kind: str) -> None:
    assert results["task"] == ["retrieval", "compositional", "zeroshot"]
    assert results["model"]["name_or_path"] == str(model_path) and results["model"]["kind"] == kind
    assert results["dataset"] == {
        "spec": SCENES,
        "split": "test",
        "images": 6,
        "captions": 30,
        "hard_negatives": 30,
        "classes": 8,
    }
    assert results["seed"] == 0 and results["versions"]["torch"] == torch.__version__.split("+")[0]
    assert results["wall_time_s"]["total"] > 0
    assert set(results["metrics"]) == RETRIEVAL_KEYS | {"compositional_accuracy", "zeroshot_top1", "zeroshot_top5"}


@torch.no_grad()
def test_clip_checkpoint_retrieval_on_a_caption_table(saved, caption_table, tmp_path):
    output = tmp_path / "clip.json"
    assert main(["eval", "--model", str(saved["clip"]), "--dataset", caption_table, "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["model"]["kind"] == "dual encoder" and results["model"]["class"] == "CLIPModel"
    assert results["dataset"]["images"] == 4 and results["dataset"]["captions"] == 8
    clip, processor = CLIPModel.from_pretrained(saved["clip"]), CLIPProcessor.from_pretrained(saved["clip"])
    dataset = load_dataset_spec(caption_table)
    pairs = caption_pairs(dataset)
    pixel_values = processor(images=[image.convert("RGB") for image in dataset["image"]], return_tensors="pt")[
        "pixel_values"
    ]
    text = processor(text=pairs.captions, return_tensors="pt", padding=True, truncation=True)
    image_embeds = F.normalize(clip.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
    text_embeds = F.normalize(
        clip.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output, dim=-1
    )
    assert_metrics_equal(results["metrics"], retrieval_metrics(text_embeds @ image_embeds.T, pairs.caption_to_image))


def test_zeroshot_on_an_image_folder_uses_its_class_names_and_named_templates(saved, tmp_path):
    for offset, name in enumerate(("bird", "cat", "dog")):
        write_images(tmp_path / "classes" / name, 2, seed=10 + offset)
    spec = f"imagefolder:{tmp_path / 'classes'}?split=test"
    assert (
        main(
            [
                "eval",
                "--model",
                str(saved["student"]),
                "--dataset",
                spec,
                "--task",
                "zeroshot",
                "--templates",
                "cifar10",
                "--output-dir",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["dataset"]["classes"] == 3 and results["zeroshot"]["classnames"] == ["bird", "cat", "dog"]
    assert results["zeroshot"]["num_templates"] == len(get_templates("cifar10")) == 18
    model, processor = DCLIPModel.from_pretrained(saved["student"]), DCLIPProcessor.from_pretrained(saved["student"])
    expected = zeroshot_classification(model, processor, load_dataset_spec(spec), templates=get_templates("cifar10"))
    assert_metrics_equal(results["metrics"], {"zeroshot_top1": expected["top1"], "zeroshot_top5": expected["top5"]})


def run_failing(capsys, *arguments: str) -> str:
    assert main(["eval", *arguments]) == 2
    return capsys.readouterr().err


def test_bad_inputs_are_named(saved, caption_table, tmp_path, capsys):
    out = ["--output-dir", str(tmp_path)]
    missing = tmp_path / "no-such-model"
    assert f"model '{missing}': no such folder" in run_failing(
        capsys, "--model", str(missing), "--dataset", SCENES, *out
    )
    assert "BertModel, not a dual encoder" in run_failing(
        capsys, "--model", str(saved["bert"]), "--dataset", SCENES, *out
    )
    error = run_failing(capsys, "--model", str(saved["student"]), "--dataset", SCENES, "--split", "val", *out)
    assert f"dataset {SCENES} has no rows of split 'val'; its splits are ['test']" in error
    error = run_failing(
        capsys, "--model", str(saved["student"]), "--dataset", caption_table, "--task", "zeroshot", *out
    )
    assert caption_table in error and "no 'label' column" in error
    error = run_failing(
        capsys, "--model", str(saved["student"]), "--dataset", caption_table, "--task", "compositional", *out
    )
    assert caption_table in error and "no 'hard_negatives' column" in error
    error = run_failing(capsys, "--model", str(saved["teacher"]), "--dataset", SCENES, "--regions", "yolo", *out)
    assert "--regions 'yolo' is not one of" in error
    assert not (tmp_path / "results.json").exists()


@torch.no_grad()
def test_student_results_equal_direct_embeddings(saved, subprocess_runs):
    results = finished(subprocess_runs["student"])
    check_common_fields(results, saved["student"], "student")
    model, processor = DCLIPModel.from_pretrained(saved["student"]), DCLIPProcessor.from_pretrained(saved["student"])
    dataset, pairs, images = scene_inputs(processor)
    image_embeds = F.normalize(
        model.get_image_features(pixel_values=processor(images=images)["pixel_values"]).pooler_output, dim=-1
    )

    def embed(texts):
        inputs = processor(text=texts)
        return F.normalize(
            model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ).pooler_output,
            dim=-1,
        )

    captions, negatives = embed(pairs.captions), embed(pairs.hard_negatives)
    paired_images = image_embeds[pairs.caption_to_image]
    zeroshot = zeroshot_classification(model, processor, dataset)
    expected = {
        **retrieval_metrics(captions @ image_embeds.T, pairs.caption_to_image),
        "compositional_accuracy": compositional_accuracy(
            (captions * paired_images).sum(-1), (negatives * paired_images).sum(-1)
        ),
        "zeroshot_top1": zeroshot["top1"],
        "zeroshot_top5": zeroshot["top5"],
    }
    assert_metrics_equal(results["metrics"], expected)


@torch.no_grad()
def test_teacher_results_equal_direct_pairwise_scores(saved, subprocess_runs):
    results = finished(subprocess_runs["teacher"])
    check_common_fields(results, saved["teacher"], "teacher")
    assert results["regions"]["type"] == "grid"
    teacher = DCLIPTeacherModel.from_pretrained(saved["teacher"])
    processor = DCLIPProcessor.from_pretrained(saved["teacher"])
    dataset, pairs, images = scene_inputs(processor)
    regions = processor(images=images, regions=True)
    region_embeds = teacher.encode_regions(regions["region_pixel_values"], regions["region_mask"])
    image_args = (
        region_embeds,
        regions["region_boxes"],
        regions["region_scores"],
        regions["region_mask"],
        region_embeds[:, 0],
    )

    def text_args(texts):
        tokens = processor(text=texts)
        states, embeds = teacher.encode_text_tokens(tokens["input_ids"], tokens["attention_mask"])
        return states, tokens["attention_mask"], embeds

    def paired_scores(texts):
        rows = pairs.caption_to_image
        image, text, _ = teacher.fuse(*(tensor[rows] for tensor in image_args), *text_args(texts))
        return (image * text).sum(-1)

    classnames = dataset.features["label"].names
    prompt_scores = teacher.score_pairs(*image_args, *text_args([f"a photo of a {name}." for name in classnames]))
    top = prompt_scores.T.topk(5, dim=1).indices
    labels = torch.tensor(dataset["label"])
    expected = {
        **retrieval_metrics(teacher.score_pairs(*image_args, *text_args(pairs.captions)), pairs.caption_to_image),
        "compositional_accuracy": compositional_accuracy(
            paired_scores(pairs.captions), paired_scores(pairs.hard_negatives)
        ),
        "zeroshot_top1": (top[:, 0] == labels).double().mean().item(),
        "zeroshot_top5": (top == labels[:, None]).any(1).double().mean().item(),
    }
    assert_metrics_equal(results["metrics"], expected)


def test_an_unwritable_output_fails_before_the_evaluation(saved, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    output = blocker / "results.json"
    error = run_failing(capsys, "--model", str(saved["student"]), "--dataset", SCENES, "--output", str(output))
    assert f"cannot write the results to {output}" in error
    assert "Loading weights" not in error  # nothing was loaded: the check comes first
    error = run_failing(capsys, "--model", str(saved["student"]), "--dataset", SCENES, "--output", str(tmp_path))
    assert f"cannot write the results to {tmp_path}: it is a folder" in error


def test_a_failed_write_keeps_the_printed_metrics_and_leaves_no_temporary_file(saved, tmp_path):
    """The disk fills up after the evaluation: a real write failure (RLIMIT_FSIZE: `File too large`), not a mock.
    A first run fills the feature store, so that the second one only reads it and writes nothing but its results."""
    import resource

    def small_files_only() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))  # the check's empty file fits, results.json does not

    def evaluate(output: Path, **limits) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "modeling_dclip.cli", "eval", "--model", str(saved["student"])]
        command += ["--dataset", SCENES, "--feature-store", str(tmp_path / "store"), "--output", str(output)]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, **limits)

    assert evaluate(tmp_path / "first" / "results.json").returncode == 0
    out = tmp_path / "out"
    result = evaluate(out / "results.json", preexec_fn=small_files_only)
    assert result.returncode == 1, result.stderr
    assert "text_to_image_R@1" in result.stdout  # the metrics were printed before the write was tried
    assert f"the metrics above could not be written to {out / 'results.json'}: File too large" in result.stderr
    assert list(out.iterdir()) == []  # no results.json, no temporary file


@torch.no_grad()
def test_teacher_reranking_a_first_stage_scores_only_its_shortlist(saved):
    """`evaluate_model(teacher, first_stage=...)`: with a shortlist as long as the gallery it is the full pairwise
    evaluation; with two candidates, each query's top-1 is the one of its first stage's two that the teacher scores
    higher."""
    from modeling_dclip import encoding
    from modeling_dclip.evaluation import evaluate_model

    teacher = DCLIPTeacherModel.from_pretrained(saved["teacher"])
    processor = DCLIPProcessor.from_pretrained(saved["teacher"])
    dataset, pairs, photos = scene_inputs(processor)
    full = evaluate_model(teacher, processor, dataset, ["retrieval"])
    student = DCLIPModel.from_pretrained(saved["student"])
    texts = processor(text=pairs.captions)
    first_stage = (
        F.normalize(encoding.encode_texts(student, processor, pairs.captions), dim=-1)
        @ F.normalize(encoding.encode_images(student, processor, dataset), dim=-1).T
    )

    everything = evaluate_model(teacher, processor, dataset, ["retrieval"], first_stage=first_stage, rerank_top_k=99)
    assert_metrics_equal(everything, full)

    two = evaluate_model(teacher, processor, dataset, ["retrieval"], first_stage=first_stage, rerank_top_k=2)
    regions = processor(images=photos, regions=True)
    region_embeds = teacher.encode_regions(regions["region_pixel_values"], regions["region_mask"])
    states, embeds = teacher.encode_text_tokens(texts["input_ids"], texts["attention_mask"])
    teacher_scores = teacher.score_pairs(
        region_embeds,
        regions["region_boxes"],
        regions["region_scores"],
        regions["region_mask"],
        region_embeds[:, 0],
        states,
        texts["attention_mask"],
        embeds,
    )
    shortlist = first_stage.topk(2, dim=1).indices
    best_image = shortlist.gather(1, teacher_scores.gather(1, shortlist).argmax(1, keepdim=True))[:, 0]
    assert two["text_to_image_R@1"] == pytest.approx((best_image == pairs.caption_to_image).double().mean().item())
    shortlist = first_stage.T.topk(2, dim=1).indices
    best_caption = shortlist.gather(1, teacher_scores.T.gather(1, shortlist).argmax(1, keepdim=True))[:, 0]
    expected = (pairs.caption_to_image[best_caption] == torch.arange(len(dataset))).double().mean().item()
    assert two["image_to_text_R@1"] == pytest.approx(expected)
    assert two != full  # the shortlist changes what the teacher can reach
    with pytest.raises(ValueError, match="first_stage has shape"):
        evaluate_model(teacher, processor, dataset, ["retrieval"], first_stage=first_stage[:-1])
