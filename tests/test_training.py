"""Training mechanics on tiny random towers: the stage configs (YAML, command line, `--help`), freezing, LoRA, WiSE-FT,
the loop (precision, accumulation, warmup, clipping, tensorboard, checkpoint rotation), kill-and-resume, Ctrl-C, and
two accelerate processes."""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, accelerate_launch, tiny_student
from safetensors.torch import load_file, save_file
from transformers import get_scheduler

from modeling_dclip import DCLIPModel
from modeling_dclip.training import (
    AlignConfig,
    DistillConfig,
    TeacherConfig,
    align_base,
    distill_student,
    train_teacher,
)
from modeling_dclip.training.batching import PairBatches
from modeling_dclip.training.config import TrainingConfig, load_stage_config, parse_stage_config, stage_parser
from modeling_dclip.training.loop import PROGRESS_FILE, checkpoint_folders, make_accelerator, train

PYTHON = sys.executable


def save_tiny_base(path: Path) -> Path:
    """A tiny random dual encoder (CLIP towers, mean-pooled text) with a real tokenizer, saved with its processor."""
    model, processor = tiny_student(layers=2)
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
    weights compare to 1e-6, and on a loaded 2-core machine OpenMP threads waiting for each other cost seconds.
    Accelerate keeps one device and one precision per process, so every run in this process trains in full precision
    on the CPU; the other precisions run in processes of their own."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_USE_CPU", "true")
        yield
    torch.set_num_threads(previous_threads)


def _epoch(batches: PairBatches, epoch: int) -> list[list[tuple[int, int]]]:
    batches.set_epoch(epoch)
    return [[batches.pairs[caption] for caption in batch] for batch in batches]


def test_batches_depend_on_seed_and_epoch_only():
    counts = [2, 1, 3, 1, 2, 2, 1]
    batches = PairBatches(counts, batch_size=2, seed=5)
    # The order the loop had before it became a batch sampler, so that runs of a seed keep their results.
    assert _epoch(batches, 0) == [[(4, 8), (3, 6)], [(6, 11), (1, 2)], [(5, 10), (2, 5)]]
    assert _epoch(batches, 1) == [[(3, 6), (1, 2)], [(5, 9), (6, 11)], [(2, 5), (0, 0)]]
    assert _epoch(PairBatches(counts, batch_size=2, seed=5), 1) == _epoch(batches, 1)
    offsets = [0, 2, 3, 6, 7, 9, 11]
    for row, caption in (pair for batch in _epoch(batches, 3) for pair in batch):
        assert offsets[row] <= caption < offsets[row] + counts[row]
    with pytest.raises(ValueError, match="row 1 has no caption"):
        PairBatches([1, 0, 1], batch_size=1, seed=0)


def test_yaml_then_command_line_then_typed_values(tmp_path):
    config_file = tmp_path / "distill.yaml"
    config_file.write_text(
        "learning_rate: 2e-3\nnum_train_epochs: 7\nfreeze_patterns: ['text_model.*']\noutput_dir: 456\n"
    )
    config = parse_stage_config(
        DistillConfig,
        [
            "--config",
            str(config_file),
            "--learning_rate",
            "2e-5",
            "--loss_weights",
            "{contrastive: 1}",
            "--teacher_model",
            "null",
            "--lora_target_modules",
            "q_proj",
            "--no_freeze_batchnorm_stats",
        ],
    )
    # The command line wins over the file, the file over the defaults; YAML's `2e-3` (a string to YAML 1.1) and a
    # numeric `output_dir` take their field's type.
    assert config.learning_rate == 2e-5 and config.num_train_epochs == 7 and config.output_dir == "456"
    assert config.loss_weights == {"contrastive": 1} and config.freeze_patterns == ["text_model.*"]
    assert config.teacher_model is None and config.lora_target_modules == ["q_proj"]
    assert config.freeze_batchnorm_stats is False and config.warmup_steps == 10  # DistillConfig's own default
    assert config.work_dir == "456-training"  # beside the model folder, never inside it
    loaded = load_stage_config(DistillConfig, config_file, learning_rate=3e-4, loss_weights="conaclip")
    assert loaded.learning_rate == 3e-4 and loaded.num_train_epochs == 7 and loaded.loss_weights == "conaclip"
    with pytest.raises(SystemExit):
        parse_stage_config(DistillConfig, ["--no_such_field", "1"])
    with pytest.raises(ValueError, match=r"unknown DistillConfig field\(s\) \['epochs'\]"):
        load_stage_config(DistillConfig, config_file, epochs=3)
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        AlignConfig(lr_scheduler_type="cosinus")


def test_help_describes_every_field(capsys):
    for config_class in (AlignConfig, TeacherConfig, DistillConfig):
        actions = {action.dest: action for action in stage_parser(config_class)._actions}
        for field in dataclasses.fields(config_class):
            assert len(actions[field.name].help or "") > 10, f"{config_class.__name__}.{field.name} has no help"
    trainer = runpy.run_path(str(REPO / "trainers" / "distill_student.py"))
    with pytest.raises(SystemExit) as exit_info:
        trainer["main"](["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for name in ("--num_train_epochs", "--save_total_limit", "--load_best_model_at_end", "--loss_weights", "--config"):
        assert name in usage
    assert "Checkpoints kept (accelerate's `total_limit`" in " ".join(usage.split())


def test_one_mixed_precision_per_process(tmp_path):
    make_accelerator(TrainingConfig(output_dir=str(tmp_path / "a"), mixed_precision="no"))
    with pytest.raises(ValueError, match="accelerate keeps one precision per process"):
        make_accelerator(TrainingConfig(output_dir=str(tmp_path / "b"), mixed_precision="bf16"))
    from modeling_dclip.pipeline import load_preset

    with pytest.raises(ValueError, match="must share one mixed_precision"):
        load_preset("tiny", distill={"mixed_precision": "bf16"})


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
            save_steps=2,
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
    checkpoint = Path(f"{student_dir}-training") / "checkpoints" / "checkpoint_0"
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
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


def subprocess_env() -> dict[str, str]:
    """The environment of a run in a subprocess, read when it starts (the tests' feature store included): CPU, one
    thread."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


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
    argv = _align_args(tiny_base, resumed, "--save_steps", "3", "--resume_from_checkpoint", "latest")
    wrapper, marker, log = tmp_path / "pause_in_step.py", tmp_path / "paused", tmp_path / "killed.log"
    wrapper.write_text(PAUSE_IN_STEP)
    with log.open("w") as stderr:
        # 4 batches per epoch: the kill lands in step 8 of 10, in the middle of the second epoch, after the
        # checkpoint of step 6, so the resumed run skips the first 2 batches of that epoch.
        process = subprocess.Popen(
            [PYTHON, str(wrapper), str(marker), "8", str(REPO / "trainers" / "align_base.py"), *argv],
            env=subprocess_env(),
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
    work_dir = Path(f"{resumed}-training")
    assert [folder.name for folder in checkpoint_folders(work_dir)] == ["checkpoint_0", "checkpoint_1"]  # steps 3, 6
    assert not (resumed / "model.safetensors").exists() and not (resumed / "training_complete.json").exists()

    align_base(parse_stage_config(AlignConfig, argv))  # a fresh run of the same command resumes from step 6
    summary = json.loads((resumed / "training_complete.json").read_text())
    assert summary["steps"] == 10
    assert [folder.name for folder in checkpoint_folders(work_dir)] == ["checkpoint_1", "checkpoint_2"]  # 6, 9
    expected, actual = _weights(reference), _weights(resumed)
    assert not torch.equal(expected["text_projection.weight"], _weights(tiny_base)["text_projection.weight"])
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=0, msg=name)


def _launch(*args: str, mixed_precision: str = "no", timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` one process of the script and arguments `args`."""
    command = [*accelerate_launch(1, mixed_precision), *args]
    return subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def test_ctrl_c_says_where_the_run_resumes_from(tiny_base, tmp_path):
    out, marker = tmp_path / "interrupted", tmp_path / "paused"
    wrapper = tmp_path / "pause_in_step.py"
    wrapper.write_text(PAUSE_IN_STEP)
    argv = _align_args(tiny_base, out, "--save_steps", "2")
    process = subprocess.Popen(
        [PYTHON, str(wrapper), str(marker), "4", str(REPO / "trainers" / "align_base.py"), *argv],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 130, stderr[-3000:]
    checkpoint = Path(f"{out}-training") / "checkpoints" / "checkpoint_0"
    assert (
        f"align_base: interrupted at step 3 of 10; rerun with --resume_from_checkpoint latest to continue from "
        f"{checkpoint}" in stderr
    ), stderr[-3000:]
    assert "Traceback" not in stderr
    assert not (out / "training_complete.json").exists()


def test_wise_ft_interpolates_with_the_base(tiny_base, scenes, tmp_path):
    def distill(name: str, wise_alpha: float) -> dict[str, torch.Tensor]:
        config = DistillConfig(
            base_model=str(tiny_base),
            teacher_model=None,
            loss_weights={"contrastive": 1.0},
            output_dir=str(tmp_path / name),
            batch_size=8,
            max_steps=2,
            learning_rate=1e-2,
            warmup_steps=0,
            wise_alpha=wise_alpha,
        )
        return _weights(distill_student(config, scenes))

    fine_tuned, halfway, base = distill("fine_tuned", 1.0), distill("halfway", 0.5), _weights(tiny_base)
    name = "visual_projection.weight"
    assert not torch.allclose(fine_tuned[name], base[name])
    for name, tensor in halfway.items():
        torch.testing.assert_close(tensor, (base[name] + fine_tuned[name]) / 2, atol=1e-6, rtol=0, msg=name)


def test_bf16_accumulation_warmup_clipping_and_tensorboard(tiny_base, tmp_path):
    common = dict(
        init_from=str(tiny_base),
        data="synthetic:?n=16&split=train",
        batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-2,
        warmup_steps=2,
        lr_scheduler_type="cosine",
        unlock_vision_blocks=1,
    )
    base = _weights(tiny_base)
    fp32 = _weights(align_base(AlignConfig(output_dir=str(tmp_path / "fp32"), **common)))
    # Clipping to a 1e-12 norm leaves AdamW steps of about lr * 1e-12 / eps: the weights barely move.
    clipped = _weights(align_base(AlignConfig(output_dir=str(tmp_path / "clipped"), max_grad_norm=1e-12, **common)))
    # Other precisions run in processes of their own; bf16 is the launcher's flag, the config leaves it unset.
    arguments = [f"--{name}={value}" for name, value in common.items()]
    bf16_dir = tmp_path / "bf16"
    result = _launch(
        str(REPO / "trainers" / "align_base.py"),
        *arguments,
        f"--output_dir={bf16_dir}",
        "--report_to=tensorboard",
        "--logging_steps=1",
        mixed_precision="bf16",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    bf16 = _weights(bf16_dir)
    fp16 = subprocess.run(
        [PYTHON, str(REPO / "trainers" / "align_base.py"), *arguments, f"--output_dir={tmp_path / 'fp16'}"]
        + ["--mixed_precision", "fp16"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fp16.returncode != 0 and "mixed_precision 'fp16' needs a GPU" in fp16.stderr, fp16.stderr[-3000:]

    name = "visual_projection.weight"
    assert (fp32[name] - base[name]).abs().max() > 1e-3
    assert (clipped[name] - base[name]).abs().max() < 1e-4
    assert all(torch.isfinite(tensor).all() for tensor in bf16.values())
    assert not torch.equal(bf16[name], fp32[name]), "bf16 autocast changed nothing"
    torch.testing.assert_close(bf16[name], fp32[name], atol=5e-3, rtol=0)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "bf16-training" / "logs" / "align_base"))
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


class SavableLinear(torch.nn.Linear):
    def save_pretrained(self, folder: str) -> None:
        """What the loop calls on the model of a new best epoch."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(Path(folder) / "model.safetensors"))


class Regression(torch.nn.Module):
    """A loop step whose loss is a mean over the examples (unlike a contrastive loss, whose in-batch negatives change
    with the batch), so that accumulating micro-batches must equal one larger batch exactly; with `dropout` on its
    inputs, drawn from the global random stream as the towers' dropout is."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.model = SavableLinear(3, 1)
        self.dropout = dropout

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = torch.nn.functional.dropout(batch["x"], self.dropout, self.training)
        loss = torch.nn.functional.mse_loss(self.model(x).squeeze(-1), batch["y"])
        return {"loss": loss, "mse": loss}


def _regress(work: Path, validate: bool = False, dropout: float = 0.0, **settings) -> tuple[torch.nn.Module, dict]:
    """Train [`Regression`] on 16 fixed examples through the loop (validated after each epoch on 8 others, as
    `neg_mse`, when `validate`); returns the model and the summary."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=generator), torch.randn(16, generator=generator)
    val_x, val_y = torch.randn(8, 3, generator=generator), torch.randn(8, generator=generator)
    config = TrainingConfig(output_dir=str(work), learning_rate=0.1, warmup_steps=1, **settings)

    def collate(pairs: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        rows = [row for row, _ in pairs]
        return {"x": x[rows], "y": y[rows]}

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"neg_mse": -torch.nn.functional.mse_loss(model(val_x).squeeze(-1), val_y).item()}

    batches = PairBatches([1] * 16, config.batch_size, config.seed)
    return train(
        make_accelerator(config),
        Regression(dropout),
        config,
        batches,
        collate,
        evaluate=evaluate if validate else None,
        stage_name="regress",
    )


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    # 3 updates, across an epoch boundary; the pairs of a batch of 8 are those of two micro-batches of 4.
    large, large_summary = _regress(tmp_path / "large", batch_size=8, max_steps=3, max_grad_norm=0.05)
    small, small_summary = _regress(
        tmp_path / "small", batch_size=4, gradient_accumulation_steps=2, max_steps=3, max_grad_norm=0.05
    )
    assert large_summary["steps"] == small_summary["steps"] == 3
    assert not torch.allclose(large.weight, Regression().model.weight)
    torch.testing.assert_close(small.weight, large.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(small.bias, large.bias, atol=1e-6, rtol=0)
    # An epoch of 3 batches with 2 per update: the second update takes the one batch that remains.
    _, odd = _regress(tmp_path / "odd", batch_size=5, gradient_accumulation_steps=2, num_train_epochs=2)
    assert odd["steps"] == 4


def test_each_epoch_draws_the_loaders_seed_from_the_global_random_stream(tmp_path):
    # A DataLoader draws its workers' base seed from the global RNG when an epoch starts: the random stream (the
    # dropout masks) that trained the recorded real-photo benchmark, kept so that its command still trains its
    # figures. Two epochs of a step that draws nothing itself: two draws after the model's initialisation.
    _regress(tmp_path / "run", batch_size=8, num_train_epochs=2)
    after_training = torch.get_rng_state()
    Regression()  # seeds 0 and initialises its layer, as in `_regress`
    for _ in range(2):
        torch.empty((), dtype=torch.int64).random_()
    assert torch.equal(after_training, torch.get_rng_state())


def test_resume_mid_epoch_with_accumulation_and_dropout_equals_the_uninterrupted_run(tmp_path):
    # 8 micro-batches of 2 per epoch, 2 per update: the checkpoint of update 1 is 2 micro-batches into epoch 0. The
    # resumed epoch must not draw its loader's seed again (it did before the checkpoint): the dropout masks would move.
    settings = dict(
        batch_size=2, gradient_accumulation_steps=2, max_steps=6, save_steps=1, save_total_limit=0, dropout=0.5
    )
    uninterrupted, _ = _regress(tmp_path / "uninterrupted", **settings)
    checkpoint = Path(f"{tmp_path / 'uninterrupted'}-training") / "checkpoints" / "checkpoint_0"
    resumed, summary = _regress(tmp_path / "resumed", **settings, resume_from_checkpoint=str(checkpoint))
    assert summary["steps"] == 6
    torch.testing.assert_close(resumed.weight, uninterrupted.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(resumed.bias, uninterrupted.bias, atol=1e-6, rtol=0)
    # Resumed from the checkpoint of the last update (killed before the model was saved): nothing more to train.
    finished, summary = _regress(
        tmp_path / "finished", **settings, resume_from_checkpoint=str(checkpoint.parent / "checkpoint_5")
    )
    assert summary["steps"] == 6
    torch.testing.assert_close(finished.weight, uninterrupted.weight, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint folder"):
        _regress(tmp_path / "missing", **settings, resume_from_checkpoint=str(tmp_path / "nowhere"))


def test_a_resume_from_an_epochs_last_checkpoint_neither_skips_nor_repeats_its_validation(tmp_path):
    # 4 updates per epoch and a checkpoint every 4: each is written after its epoch's validation, and holds the
    # validation history, so the resumed run's history, best epoch and weights are the uninterrupted run's.
    settings = dict(batch_size=4, num_train_epochs=3, save_steps=4, save_total_limit=0, metric_for_best_model="neg_mse")
    uninterrupted, summary = _regress(tmp_path / "uninterrupted", validate=True, **settings)
    assert [entry["step"] for entry in summary["history"]] == [4, 8, 12]
    checkpoint = Path(f"{tmp_path / 'uninterrupted'}-training") / "checkpoints" / "checkpoint_0"
    resumed, resumed_summary = _regress(
        tmp_path / "resumed", validate=True, resume_from_checkpoint=str(checkpoint), **settings
    )
    assert resumed_summary["history"] == summary["history"]
    assert resumed_summary["best_step"] == summary["best_step"]
    torch.testing.assert_close(resumed.weight, uninterrupted.weight, atol=1e-6, rtol=0)


def test_save_total_limit_keeps_the_newest_checkpoints_and_latest_resumes(tmp_path):
    work = tmp_path / "regression"
    _regress(work, batch_size=4, max_steps=5, save_steps=1, save_total_limit=2)
    work_dir = Path(f"{work}-training")
    assert [folder.name for folder in checkpoint_folders(work_dir)] == ["checkpoint_3", "checkpoint_4"]
    # A checkpoint whose save was interrupted (no progress file) is not `latest`: the run resumes from step 4.
    (work_dir / "checkpoints" / "checkpoint_4" / PROGRESS_FILE).unlink()
    _, summary = _regress(
        work, batch_size=4, max_steps=6, save_steps=1, save_total_limit=2, resume_from_checkpoint="latest"
    )
    assert summary["steps"] == 6
    assert [folder.name for folder in checkpoint_folders(work_dir)] == ["checkpoint_5", "checkpoint_6"]
    unlimited = tmp_path / "unlimited"
    _regress(unlimited, batch_size=4, max_steps=3, save_steps=1, save_total_limit=0)
    assert len(checkpoint_folders(Path(f"{unlimited}-training"))) == 3


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
            *accelerate_launch(2),
            str(REPO / "trainers" / "distill_student.py"),
            *_distill_args(tiny_base, double),
        ],
        env=subprocess_env(),
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
