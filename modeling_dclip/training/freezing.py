"""Choosing what trains: freezing by parameter-name patterns and unlocking the last blocks of a tower."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

_PEFT_PREFIX = "base_model.model."


def freeze_by_patterns(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Set `requires_grad=False` on parameters whose name matches any `fnmatch` pattern (names are matched without
    peft's `base_model.model.` prefix, so the same patterns work with LoRA). Returns the frozen names."""
    frozen = []
    for name, parameter in model.named_parameters():
        plain = name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name
        if any(fnmatch.fnmatchcase(plain, pattern) for pattern in patterns):
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


def _block_list(tower: nn.Module) -> nn.ModuleList | None:
    """The tower's sequence of blocks: its longest `ModuleList` or `Sequential` of similar modules (transformer
    layers, CLIP encoder layers, timm EfficientNet stages)."""
    candidates = [m for m in tower.modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 1]
    return max(candidates, key=len, default=None)


def unlock_last_blocks(tower: nn.Module, count: int) -> None:
    """Make the last `count` blocks of a frozen tower trainable, with every parameter registered after them
    (final norms, heads); `count < 0` unlocks the whole tower, 0 leaves it frozen."""
    if count == 0:
        return
    if count < 0:
        tower.requires_grad_(True)
        return
    blocks = _block_list(tower)
    if blocks is None:
        raise ValueError(f"cannot find the blocks of {type(tower).__name__} to unlock")
    first = next(blocks[max(0, len(blocks) - count)].parameters())
    unlocked = False
    for parameter in tower.parameters():
        unlocked = unlocked or parameter is first
        if unlocked:
            parameter.requires_grad_(True)


def keep_frozen_norms_in_eval(model: nn.Module) -> None:
    """Put BatchNorm layers without trainable parameters in eval mode, so that frozen layers stay frozen (their
    running statistics do not drift) after `model.train()`."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()
