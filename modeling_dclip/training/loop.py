"""The training loop every stage shares: accelerate for devices and processes, accumulation, clipping, warmup and
schedule, `save_state` checkpoints with resume, trackers, and per-epoch validation with best-model selection."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from .batching import PairBatches, shard
from .checkpointing import checkpoint_folders, resolve_resume_checkpoint
from .config import TrainingConfig

logger = logging.getLogger(__name__)


class TrainingProgress:
    """The loop's own state, saved with every checkpoint."""

    def __init__(self) -> None:
        self.step = 0
        self.best_metric: float | None = None
        self.best_step = -1

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "best_metric": self.best_metric, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.best_metric, self.best_step = state["step"], state["best_metric"], state["best_step"]


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
    """The accelerator of a stage: mixed precision, trackers under `work_dir/logs`; seeds every process.

    Raises:
        ValueError: `mixed_precision: fp16` on a CPU.
        RuntimeError: the launcher started more processes than accelerate distributes over.
    """
    if AcceleratorState._shared_state.get("_mixed_precision", config.mixed_precision) != config.mixed_precision:
        # Accelerate keeps one precision per process; a stage run after another in the same process (as `dclip run`
        # does) may choose another. The process group (PartialState) is kept.
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=launched_without_accelerator(),
        mixed_precision=config.mixed_precision,
        # Frozen or unused parameters (a locked tower whose features are cached, an unused pooler) are normal here.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=config.report_to or None,
        project_config=ProjectConfiguration(
            project_dir=config.work_dir, logging_dir=str(Path(config.work_dir) / "logs")
        ),
    )
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
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
    """Train the parameters of `model` that require gradients.

    Args:
        accelerator: from [`make_accelerator`].
        module: a training step module: `module(batch)` returns the loss terms (the total under `"loss"`) and
            `module.model` is the `PreTrainedModel` being trained; only parameters with `requires_grad` are optimised.
        config: optimisation, checkpoint and validation settings.
        batches: the global batches of each epoch; each process collates its shard of them.
        collate: `(pairs) -> batch` for this process's pairs.
        evaluate: `(unwrapped model) -> metrics`, run each epoch on the main process' view; selects the best.
        stage_name: tracker run name.

    Returns:
        The trained `module.model` (best weights when `load_best_at_end` and validation ran) and a summary dict.
    """
    work_dir = Path(config.work_dir)
    checkpoints_dir, best_dir = work_dir / "checkpoints", work_dir / "best"
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{stage_name}: no trainable parameters (check the freezing settings)")
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = batches.batches_per_epoch // config.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"{stage_name}: an epoch has {batches.batches_per_epoch} batches, fewer than gradient_accumulation_steps"
        )
    total_steps = config.max_steps or steps_per_epoch * config.num_epochs
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    # The scheduler is not prepared: prepared schedulers step once per process, ours steps once per update.
    scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps
    )
    model, optimizer = accelerator.prepare(module, optimizer)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(scheduler, progress)

    resume = resolve_resume_checkpoint(config.resume_from_checkpoint, checkpoints_dir)
    if resume is not None:
        accelerator.load_state(str(resume))
        logger.info("%s: resumed from %s at step %d", stage_name, resume, progress.step)
    if config.report_to:
        accelerator.init_trackers(
            stage_name, config={k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
        )

    bar = tqdm(total=total_steps, initial=progress.step, desc=stage_name, disable=not accelerator.is_main_process)
    history: list[dict[str, float]] = []
    last_terms: dict[str, float] = {}
    rank, world = accelerator.process_index, accelerator.num_processes
    for epoch in range(progress.step // steps_per_epoch, num_epochs):
        model.train()
        epoch_batches = batches.epoch(epoch)
        for step_in_epoch in range(steps_per_epoch):
            if epoch * steps_per_epoch + step_in_epoch < progress.step:
                continue  # done before the checkpoint we resumed from
            if progress.step >= total_steps:
                break
            step_terms: dict[str, float] = {}
            for micro in range(config.gradient_accumulation_steps):
                pairs = shard(epoch_batches[step_in_epoch * config.gradient_accumulation_steps + micro], rank, world)
                batch = collate(pairs)
                last_micro = micro == config.gradient_accumulation_steps - 1
                sync = contextlib.nullcontext() if last_micro else accelerator.no_sync(model)
                with sync:
                    # The prepared module's forward already runs under the mixed-precision autocast.
                    terms = model(batch)
                    accelerator.backward(terms["loss"] / config.gradient_accumulation_steps)
                for name, value in terms.items():
                    share = value.detach().float().item() / config.gradient_accumulation_steps
                    step_terms[name] = step_terms.get(name, 0.0) + share
            logs = {f"train/{name}": value for name, value in step_terms.items()} | {"lr": scheduler.get_last_lr()[0]}
            if config.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                if grad_norm is not None:  # some backends (DeepSpeed) clip internally and report nothing
                    logs["grad_norm"] = float(grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            last_terms = step_terms
            bar.update(1)
            bar.set_postfix(loss=f"{last_terms['loss']:.4f}")
            if config.report_to and progress.step % max(1, config.logging_steps) == 0:
                accelerator.log(logs, step=progress.step)
            if config.checkpointing_steps and progress.step % config.checkpointing_steps == 0:
                _save_checkpoint(accelerator, checkpoints_dir, progress.step, config.keep_checkpoints)

        if evaluate is not None and progress.step > 0:
            metrics = evaluate(accelerator.unwrap_model(model).model) if accelerator.is_main_process else {}
            if accelerator.is_main_process:
                history.append({"epoch": epoch, "step": progress.step, **metrics})
                if config.report_to:
                    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=progress.step)
                if config.eval_metric not in metrics:
                    raise KeyError(f"{stage_name}: eval_metric {config.eval_metric!r} is not among {sorted(metrics)}")
                value = metrics[config.eval_metric]
                if _is_better(value, progress.best_metric, config.greater_is_better):
                    progress.best_metric, progress.best_step = value, progress.step
                    _save_best(accelerator.unwrap_model(model).model, best_dir)
            accelerator.wait_for_everyone()
        if progress.step >= total_steps:
            break
    bar.close()

    unwrapped = accelerator.unwrap_model(model).model
    if config.load_best_at_end and progress.best_step >= 0 and (best_dir / "model.safetensors").is_file():
        unwrapped.load_state_dict(load_file(str(best_dir / "model.safetensors")), strict=False)
    if config.report_to:
        accelerator.end_training()
    summary = {
        "steps": progress.step,
        "num_processes": accelerator.num_processes,
        "best_metric": progress.best_metric,
        "best_step": progress.best_step,
        "eval_metric": config.eval_metric,
        "last_train_terms": last_terms,
        "history": history,
    }
    return unwrapped, summary


def _save_checkpoint(accelerator: Accelerator, checkpoints_dir: Path, step: int, keep: int) -> None:
    # Written under a temporary name and renamed once complete, so `latest` never points to half a checkpoint.
    final, temporary = checkpoints_dir / f"step_{step}", checkpoints_dir / f"step_{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        temporary.rename(final)
        for old in checkpoint_folders(checkpoints_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _save_best(model: torch.nn.Module, best_dir: Path) -> None:
    temporary = best_dir.with_name(best_dir.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    shutil.rmtree(best_dir, ignore_errors=True)
    temporary.rename(best_dir)
