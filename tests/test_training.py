"""Training mechanics on tiny random towers: freezing, LoRA, the loop (precision, accumulation, warmup, clipping,
tensorboard), kill-and-resume, and two accelerate processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPVisionConfig, get_scheduler

from modeling_dclip import EMBEDDED_TEXT, DCLIPConfig, DCLIPModel, DCLIPProcessor
from modeling_dclip.towers import load_tokenizer
from modeling_dclip.training import (
    AlignConfig,
    DistillConfig,
    TeacherConfig,
    align_base,
    distill_student,
    train_teacher,
)
from modeling_dclip.training.batching import PairBatches, shard
from modeling_dclip.training.checkpointing import checkpoint_folders
from modeling_dclip.training.config import parse_stage_config

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def save_tiny_base(path: Path) -> Path:
    """A tiny random dual encoder (CLIP towers, mean-pooled text) with a real tokenizer, saved with its processor."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = CLIPTextConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=30522,
        max_position_embeddings=64,
        bos_token_id=101,
        eos_token_id=102,
        pad_token_id=0,
    )
    model = DCLIPModel(
        DCLIPConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), projection_dim=16, text_pooling="mean")
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = DCLIPProcessor(image_processor=image_processor, tokenizer=load_tokenizer(EMBEDDED_TEXT))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def scenes():
    from modeling_dclip.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(16, split="train", image_size=48)


@pytest.fixture(scope="module", autouse=True)
def cpu_one_thread():
    """The runs in this process train on the CPU (`ACCELERATE_USE_CPU`), as the subprocesses do, with one intra-op
    thread here and there (`OMP_NUM_THREADS=1`): runs in different processes then use the same kernels, so their
    weights compare to 1e-6, and on a loaded 2-core machine OpenMP threads waiting for each other cost seconds."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_USE_CPU", "true")
        # Accelerate keeps its device per process: forget one chosen by earlier tests.
        AcceleratorState._reset_state(reset_partial_state=True)
        yield
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(previous_threads)


def test_batches_are_deterministic_and_shards_partition_them():
    batches = PairBatches([2, 1, 3, 1], batch_size=2, seed=5)
    assert batches.epoch(1) == PairBatches([2, 1, 3, 1], batch_size=2, seed=5).epoch(1)
    assert batches.epoch(0) != batches.epoch(1)
    global_batch = batches.epoch(0)[0]
    assert shard(global_batch, 0, 2) + shard(global_batch, 1, 2) == global_batch
    assert shard(global_batch, 0, 2) != shard(global_batch, 1, 2)
    offsets = {0: 0, 1: 2, 2: 3, 3: 6}
    for row, caption in (pair for batch in batches.epoch(0) for pair in batch):
        assert offsets[row] <= caption < offsets[row] + [2, 1, 3, 1][row]


def test_cli_overrides_are_yaml_typed(tmp_path):
    config_file = tmp_path / "distill.yaml"
    config_file.write_text("learning_rate: 1.0e-3\nfreeze_patterns: ['text_model.*']\n")
    config = parse_stage_config(
        DistillConfig,
        [
            "--config",
            str(config_file),
            "--learning_rate",
            "2e-5",
            "--loss_weights",
            "{contrastive: 1}",
            "--output_dir",
            "123",
        ],
    )
    assert config.learning_rate == 2e-5 and config.loss_weights == {"contrastive": 1}
    assert config.freeze_patterns == ["text_model.*"] and config.output_dir == "123"
    with pytest.raises(SystemExit):
        parse_stage_config(DistillConfig, ["--no_such_field", "1"])


def test_default_freezing_keeps_text_tower_bit_identical(tiny_base, scenes, tmp_path):
    teacher_dir = train_teacher(
        TeacherConfig(
            base_model=str(tiny_base),
            output_dir=str(tmp_path / "teacher"),
            batch_size=8,
            max_steps=1,
            fusion_dim=16,
            num_attention_heads=2,
            intermediate_size=32,
        ),
        scenes,
    )
    student_dir = distill_student(
        DistillConfig(
            base_model=str(tiny_base),
            teacher_model=str(teacher_dir),
            output_dir=str(tmp_path / "student"),
            batch_size=8,
            max_steps=2,
            warmup_steps=0,
            learning_rate=1e-2,
            checkpointing_steps=2,
        ),
        scenes,
    )
    before, after = load_file(str(tiny_base / "model.safetensors")), load_file(str(student_dir / "model.safetensors"))
    text_names = [name for name in before if name.startswith("text_model.")]
    assert text_names
    for name in text_names:
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["visual_projection.weight"], after["visual_projection.weight"])

    from modeling_dclip.training.distill import build_student

    student, _ = build_student(DistillConfig(base_model=str(tiny_base)))
    trainable = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
    assert trainable and not any(name.startswith("text_model.") for name, _ in trainable)
    # The optimizer the loop trained with, as its checkpoint saved it: exactly the trainable tensors, in order.
    optimizer = torch.load(student_dir / "training" / "checkpoints" / "step_2" / "optimizer.bin", weights_only=True)
    held = [index for group in optimizer["param_groups"] for index in group["params"]]
    assert len(held) == len(trainable)
    shapes = {index: p.shape for index, (_, p) in zip(held, trainable)}
    assert optimizer["state"] and all(
        state["exp_avg"].shape == shapes[index] for index, state in optimizer["state"].items()
    )


def test_lora_adapter_loads_with_peft_and_merges(tiny_base, scenes, tmp_path):
    from peft import PeftModel

    out = distill_student(
        DistillConfig(
            base_model=str(tiny_base),
            teacher_model=None,
            loss_weights={"contrastive": 1.0},
            output_dir=str(tmp_path / "lora"),
            batch_size=8,
            max_steps=2,
            learning_rate=1e-2,
            warmup_steps=0,
            lora_r=2,
            lora_target_modules=["q_proj", "v_proj"],
        ),
        scenes,
    )
    adapted = PeftModel.from_pretrained(DCLIPModel.from_pretrained(tiny_base), out / "adapter")
    merged = DCLIPModel.from_pretrained(out)
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(
        adapted.get_image_features(pixel_values=pixels).pooler_output,
        merged.get_image_features(pixel_values=pixels).pooler_output,
        atol=1e-5,
        rtol=1e-5,
    )
    base = DCLIPModel.from_pretrained(tiny_base)
    assert not torch.allclose(
        base.get_image_features(pixel_values=pixels).pooler_output,
        merged.get_image_features(pixel_values=pixels).pooler_output,
    )


SUBPROCESS_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}

# Run as `python pause_in_step.py MARKER N trainers/<stage>.py ARGS...`: the stage runs unchanged until the forward of
# its N-th micro-batch, where it touches MARKER and sleeps, so the test can SIGKILL it exactly mid-step.
PAUSE_IN_STEP = """
import runpy, sys, time
from pathlib import Path
from modeling_dclip.training import align

marker, pause_at, calls = Path(sys.argv[1]), int(sys.argv[2]), 0
forward = align.AlignStep.forward

def forward_that_pauses(self, batch):
    global calls
    calls += 1
    if calls == pause_at:
        marker.touch()
        time.sleep(600)
    return forward(self, batch)

align.AlignStep.forward = forward_that_pauses
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _align_args(base: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--init_from",
        str(base),
        "--output_dir",
        str(out),
        "--data",
        "synthetic:?n=16&split=train",
        "--batch_size",
        "4",
        "--max_steps",
        "10",
        "--learning_rate",
        "1e-2",
        "--warmup_steps",
        "2",
        "--train_text_tower",
        "true",
        "--unlock_vision_blocks",
        "1",
        *extra,
    ]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tiny_base, tmp_path):
    reference = align_base(parse_stage_config(AlignConfig, _align_args(tiny_base, tmp_path / "reference")))

    resumed = tmp_path / "resumed"
    argv = _align_args(tiny_base, resumed, "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest")
    wrapper, marker, log = tmp_path / "pause_in_step.py", tmp_path / "paused", tmp_path / "killed.log"
    wrapper.write_text(PAUSE_IN_STEP)
    with log.open("w") as stderr:
        # 4 batches per epoch: the kill lands in step 8 of 10, in the second epoch, after the step_6 checkpoint.
        process = subprocess.Popen(
            [PYTHON, str(wrapper), str(marker), "8", str(REPO / "trainers" / "align_base.py"), *argv],
            env=SUBPROCESS_ENV,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        deadline = time.time() + 240
        while not marker.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert marker.exists(), f"the run never reached step 8: {log.read_text()[-3000:]}"
    assert process.returncode == -signal.SIGKILL
    checkpoints = resumed / "training" / "checkpoints"
    assert [folder.name for folder in checkpoint_folders(checkpoints)] == ["step_3", "step_6"]
    assert not (resumed / "model.safetensors").exists() and not (resumed / "training_complete.json").exists()

    align_base(parse_stage_config(AlignConfig, argv))  # a fresh run of the same command resumes from step_6
    summary = json.loads((resumed / "training_complete.json").read_text())
    assert summary["steps"] == 10
    assert [folder.name for folder in checkpoint_folders(checkpoints)] == ["step_6", "step_9"]
    expected, actual = _weights(reference), _weights(resumed)
    assert not torch.equal(expected["text_projection.weight"], _weights(tiny_base)["text_projection.weight"])
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=0, msg=name)


def test_bf16_accumulation_warmup_clipping_and_tensorboard(tiny_base, tmp_path):
    common = dict(
        init_from=str(tiny_base),
        data="synthetic:?n=16&split=train",
        batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-2,
        warmup_steps=2,
        lr_scheduler="cosine",
        unlock_vision_blocks=1,
    )
    base = _weights(tiny_base)
    fp32 = _weights(align_base(AlignConfig(output_dir=str(tmp_path / "fp32"), **common)))
    bf16_dir = align_base(
        AlignConfig(
            output_dir=str(tmp_path / "bf16"),
            mixed_precision="bf16",
            report_to="tensorboard",
            logging_steps=1,
            **common,
        )
    )
    bf16 = _weights(bf16_dir)
    # Clipping to a 1e-12 norm leaves AdamW steps of about lr * 1e-12 / eps: the weights barely move.
    clipped = _weights(align_base(AlignConfig(output_dir=str(tmp_path / "clipped"), max_grad_norm=1e-12, **common)))
    with pytest.raises(ValueError, match="fp16' needs a GPU"):
        align_base(AlignConfig(output_dir=str(tmp_path / "fp16"), mixed_precision="fp16", **common))

    name = "visual_projection.weight"
    assert (fp32[name] - base[name]).abs().max() > 1e-3
    assert (clipped[name] - base[name]).abs().max() < 1e-4
    assert all(torch.isfinite(tensor).all() for tensor in bf16.values())
    assert not torch.equal(bf16[name], fp32[name]), "bf16 autocast changed nothing"
    torch.testing.assert_close(bf16[name], fp32[name], atol=5e-3, rtol=0)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(bf16_dir / "training" / "logs" / "align_base"))
    events.Reload()
    assert {"train/loss", "train/contrastive", "lr", "grad_norm"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3]
    # Each step logs the learning rate it used: linear warmup from 0 over 2 steps, then the cosine schedule.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=3)
    expected_lrs = []
    for _ in range(3):
        expected_lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert [event.value for event in events.Scalars("lr")] == pytest.approx(expected_lrs)


def _distill_args(base: Path, out: Path) -> list[str]:
    # `k_proj.bias` has no gradient (softmax ignores a constant added to every key); AdamW would turn the rounding
    # noise two processes leave there into full-size steps, so it is frozen with the text tower.
    return [
        "--base_model",
        str(base),
        "--teacher_model",
        "null",
        "--loss_weights",
        "{contrastive: 1}",
        "--logit_scale",
        "0",
        "--freeze_patterns",
        "[text_model.*, '*.k_proj.bias']",
        "--output_dir",
        str(out),
        "--data",
        "synthetic:?n=16&split=train",
        "--batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--max_steps",
        "2",
        "--learning_rate",
        "1e-2",
        "--warmup_steps",
        "1",
    ]


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tiny_base, tmp_path):
    """Each process collates its half of every global batch and the contrastive loss gathers both halves, so two
    processes must train exactly as one process on the whole batch; had both seen the same examples (or the whole
    batch each), the gathered batch would hold duplicates and the weights would differ."""
    single, double = tmp_path / "one", tmp_path / "two"
    distill_student(parse_stage_config(DistillConfig, _distill_args(tiny_base, single)))
    result = subprocess.run(
        [
            ACCELERATE,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(REPO / "trainers" / "distill_student.py"),
            *_distill_args(tiny_base, double),
        ],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((double / "training_complete.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 2
    assert result.stderr.count("distill_student:   0%") == 1, "a progress bar on a process other than the main one"
    assert sorted(path.name for path in double.glob("*.safetensors")) == ["model.safetensors"]
    assert not (double / ".saving").exists()
    expected, actual, base = _weights(single), _weights(double), _weights(tiny_base)
    assert not torch.equal(
        expected["vision_model.encoder.layers.0.mlp.fc1.weight"], base["vision_model.encoder.layers.0.mlp.fc1.weight"]
    )
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=0, msg=name)
