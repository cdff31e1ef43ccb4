"""The training loop every stage shares, written as accelerate's examples are (`examples/nlp_example.py`, with
`by_feature/gradient_accumulation.py` and `by_feature/checkpointing.py`): a `DataLoader` prepared by
`accelerator.prepare` (each process takes its slice of every global batch), `accelerator.accumulate` for gradient
accumulation, `accelerator.clip_grad_norm_`, a prepared scheduler that steps once per optimizer update,
`accelerator.save_state` checkpoints with accelerate's own naming and rotation (`ProjectConfiguration`),
`accelerator.skip_first_batches` for an exact resume in the middle of an epoch, trackers, and per-epoch validation
with best-model selection.

Accelerate keeps one mixed precision per process (`AcceleratorState` is process-wide and has no public reset): stages
run one after another in one process (as `dclip run` runs them) must share it; [`make_accelerator`] refuses another
one with a clear error instead of silently training in the first stage's precision.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, is_initialized
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..atomic import atomic_path
from .batching import PairBatches
from .config import TrainingConfig

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
"""Where `save_state` writes under `work_dir` (accelerate's `automatic_checkpoint_naming`: `checkpoint_<i>`)."""
PROGRESS_FILE = "custom_checkpoint_0.pkl"
"""The loop's [`TrainingProgress`], the one object registered for checkpointing: `save_state` writes it last, so a
checkpoint folder without it was interrupted while being written."""


class TrainingProgress:
    """The loop's own state, saved with every checkpoint: optimizer updates done, the best validation so far and
    the validation history."""

    def __init__(self) -> None:
        self.step = 0
        self.best_metric: float | None = None
        self.best_step = -1
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.best_metric, self.best_step = state["step"], state["best_metric"], state["best_step"]
        self.history = list(state.get("history", []))  # absent from checkpoints of earlier versions


def checkpoint_folders(work_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint_<i>` folders under `work_dir/checkpoints`, oldest first (complete or not)."""
    folder = Path(work_dir) / CHECKPOINTS
    found = [p for p in folder.iterdir() if re.fullmatch(r"checkpoint_\d+", p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, work_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: `latest` is the newest complete one under `work_dir/checkpoints` (None when
    there is none yet, so that `--resume_from_checkpoint latest` also starts a fresh run); any other value must be a
    checkpoint folder."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        complete = [folder for folder in checkpoint_folders(work_dir) if (folder / PROGRESS_FILE).is_file()]
        return complete[-1] if complete else None
    path = Path(resume_from_checkpoint)
    if not (path / PROGRESS_FILE).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a complete checkpoint folder")
    return path


def launched_without_accelerator() -> bool:
    """Whether a launcher (`accelerate launch --multi_gpu`, `torchrun`) started several processes on a machine
    without an accelerator.

    Accelerate must then be told `cpu=True`: otherwise it still initialises a (gloo) process group but records
    `DistributedType.NO`, so every process believes it is the only, main one, trains on the whole batch without
    synchronising gradients, and all of them write the final model into the same folder at once.
    """
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return several and not has_accelerator


def make_accelerator(config: TrainingConfig) -> Accelerator:
    """The accelerator of a stage: precision, accumulation, split global batches, checkpoints and trackers under
    `work_dir`; seeds every process.

    Raises:
        ValueError: `mixed_precision: fp16` on a CPU, or a precision other than the one this process already
            trains in.
        RuntimeError: the launcher started more processes than accelerate distributes over.
    """
    if config.mixed_precision is not None and is_initialized():
        current = AcceleratorState().mixed_precision
        if current != config.mixed_precision:
            raise ValueError(
                f"mixed_precision {config.mixed_precision!r}: this process already trains in {current!r}, and "
                "accelerate keeps one precision per process; give every stage run in one process (`dclip run`) the "
                "same mixed_precision, or run this stage in its own process (`accelerate launch trainers/...`)"
            )
    existing = checkpoint_folders(config.work_dir)
    accelerator = Accelerator(
        cpu=launched_without_accelerator(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        # One global batch of `batch_size` per step, whatever the number of processes: each takes its slice.
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        # Frozen or unused parameters (a locked tower whose features are cached, an unused pooler) are normal here.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=None if config.report_to in ("", "none") else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=config.work_dir,
            logging_dir=str(Path(config.work_dir) / "logs"),
            automatic_checkpoint_naming=True,
            total_limit=config.save_total_limit or None,
            # Number new checkpoints after the ones already there, so that `latest` is always the newest.
            iteration=int(existing[-1].name.split("_")[1]) + 1 if existing else 0,
        ),
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate would silently train in full precision: no fp16 autocast on CPU.
        raise ValueError("mixed_precision 'fp16' needs a GPU; on CPU use 'bf16' or 'no'")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        launched = torch.distributed.get_world_size()
        if launched != accelerator.num_processes:
            raise RuntimeError(
                f"{launched} processes were launched but accelerate distributes over {accelerator.num_processes} "
                f"(distributed type {accelerator.distributed_type}); check the launcher's device flags"
            )
    set_seed(config.seed)
    return accelerator


def _is_better(value: float, best: float | None, greater_is_better: bool) -> bool:
    return best is None or (value > best if greater_is_better else value < best)


def train(
    accelerator: Accelerator,
    module: torch.nn.Module,
    config: TrainingConfig,
    batches: PairBatches,
    collate: Callable[[list[tuple[int, int]]], Any],
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    stage_name: str = "train",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the parameters of `module.model` that require gradients.

    Args:
        accelerator: from [`make_accelerator`].
        module: a training step module: `module(batch)` returns the loss terms (scalars; the total under `"loss"`)
            and `module.model` is the `PreTrainedModel` being trained; only parameters with `requires_grad` are
            optimised.
        config: optimisation, checkpoint and validation settings.
        batches: the global batches of each epoch (a batch sampler over `batches.pairs`); each process collates its
            slice of every batch.
        collate: `(pairs) -> batch` for this process's `(image_row, caption_index)` pairs: tensors whose first
            dimension is the number of pairs.
        evaluate: `(unwrapped model) -> metrics`, run after each epoch on the main process; selects the best.
        stage_name: progress bar, tracker run and message name.

    Returns:
        The trained `module.model` (the best weights when `load_best_model_at_end` and validation ran) and a summary
        dict.

    Raises:
        KeyboardInterrupt: after telling (on stderr) where the run can resume from.
    """
    work_dir = Path(config.work_dir)
    best_dir = work_dir / "best"
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{stage_name}: no trainable parameters (check the freezing settings)")
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    # The batches come from `batches`' own generator; the loader draws its workers' base seed from the global RNG
    # each time an epoch starts, as a DataLoader does (the random stream, hence the dropout masks, that trained the
    # recorded benchmarks).
    loader = DataLoader(batches.pairs, batch_sampler=batches, collate_fn=collate)
    accumulation = config.gradient_accumulation_steps
    updates_per_epoch = math.ceil(len(loader) / accumulation)
    total_steps = config.max_steps or updates_per_epoch * config.num_train_epochs
    num_epochs = math.ceil(total_steps / updates_per_epoch)
    scheduler = get_scheduler(
        config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps
    )
    # With split batches the prepared scheduler steps once per optimizer update, as the one above counts them.
    model, optimizer, loader, scheduler = accelerator.prepare(module, optimizer, loader, scheduler)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)

    resume = resolve_resume_checkpoint(config.resume_from_checkpoint, work_dir)
    if resume is not None:
        accelerator.load_state(str(resume))
        logger.info("%s: resumed from %s at step %d", stage_name, resume, progress.step)
    if accelerator.log_with:
        accelerator.init_trackers(
            stage_name, config={k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
        )

    bar = tqdm(total=total_steps, initial=progress.step, desc=stage_name, disable=not accelerator.is_main_process)
    last_terms: dict[str, float] = {}
    last_checkpoint = resume
    try:
        for epoch in range(progress.step // updates_per_epoch, num_epochs):
            if progress.step >= total_steps:
                break  # resumed from the checkpoint of the last update
            model.train()
            loader.set_epoch(epoch)
            # Resuming in the middle of an epoch: skip the micro-batches of the updates already done.
            done = progress.step - epoch * updates_per_epoch
            epoch_loader = loader
            if done:
                epoch_loader = accelerator.skip_first_batches(loader, done * accumulation)
                # This epoch drew its seed before the checkpoint, whose RNG state was restored: drawing it again from
                # the global RNG would shift every dropout mask from here on against the uninterrupted run.
                epoch_loader.base_dataloader.generator = torch.Generator().manual_seed(config.seed)
            sums: dict[str, float] = {}
            micro_batches = 0
            for batch in epoch_loader:
                with accelerator.accumulate(model):
                    terms = model(batch)  # the prepared module's forward runs under the mixed-precision autocast
                    accelerator.backward(terms["loss"])  # divided by the accumulation steps
                    logs: dict[str, float] = {"lr": scheduler.get_last_lr()[0]}
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                        if grad_norm is not None:  # some backends (DeepSpeed) clip internally and report nothing
                            logs["grad_norm"] = float(grad_norm)
                    # The prepared optimizer and scheduler only act on the micro-batch that completes an update.
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float().item()
                micro_batches += 1
                if not accelerator.sync_gradients:
                    continue
                progress.step += 1
                last_terms = {name: value / micro_batches for name, value in sums.items()}
                sums, micro_batches = {}, 0
                bar.update(1)
                bar.set_postfix(loss=f"{last_terms['loss']:.4f}")
                if accelerator.log_with and progress.step % max(1, config.logging_steps) == 0:
                    accelerator.log(logs | {f"train/{k}": v for k, v in last_terms.items()}, step=progress.step)
                ends_epoch = progress.step % updates_per_epoch == 0 or progress.step >= total_steps
                # The checkpoint of an epoch's last update waits for its validation, so that a resume never skips it.
                if config.save_steps and progress.step % config.save_steps == 0 and not ends_epoch:
                    last_checkpoint = Path(accelerator.save_state())
                if progress.step >= total_steps:
                    epoch_loader.end()  # left before its end: accelerate must stop tracking it
                    break

            if evaluate is not None and progress.step > 0:
                metrics = evaluate(accelerator.unwrap_model(model).model) if accelerator.is_main_process else {}
                if accelerator.is_main_process:
                    progress.history.append({"epoch": epoch, "step": progress.step, **metrics})
                    if accelerator.log_with:
                        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=progress.step)
                    if config.metric_for_best_model not in metrics:
                        raise KeyError(
                            f"{stage_name}: metric_for_best_model {config.metric_for_best_model!r} is not among "
                            f"{sorted(metrics)}"
                        )
                    value = metrics[config.metric_for_best_model]
                    if _is_better(value, progress.best_metric, config.greater_is_better):
                        progress.best_metric, progress.best_step = value, progress.step
                        with atomic_path(best_dir) as temporary:
                            accelerator.unwrap_model(model).model.save_pretrained(temporary)
                accelerator.wait_for_everyone()
            if config.save_steps and progress.step and progress.step % config.save_steps == 0:
                last_checkpoint = Path(accelerator.save_state())
            if progress.step >= total_steps:
                break
    except KeyboardInterrupt:
        if accelerator.is_main_process:
            rerun = (
                "rerun the same command"
                if config.resume_from_checkpoint == "latest"
                else "rerun with --resume_from_checkpoint latest"
            )
            where = (
                f"{rerun} to continue from {last_checkpoint}"
                if last_checkpoint is not None
                else "no checkpoint was saved (set save_steps to save some)"
            )
            print(f"\n{stage_name}: interrupted at step {progress.step} of {total_steps}; {where}", file=sys.stderr)
        raise
    finally:
        bar.close()

    unwrapped = accelerator.unwrap_model(model).model
    if config.load_best_model_at_end and progress.best_step >= 0 and (best_dir / "model.safetensors").is_file():
        unwrapped.load_state_dict(load_file(str(best_dir / "model.safetensors")), strict=False)
    if accelerator.log_with:
        accelerator.end_training()
    summary = {
        "steps": progress.step,
        "num_processes": accelerator.num_processes,
        "best_metric": progress.best_metric,
        "best_step": progress.best_step,
        "metric_for_best_model": config.metric_for_best_model,
        "last_train_terms": last_terms,
        "history": progress.history,
    }
    return unwrapped, summary
