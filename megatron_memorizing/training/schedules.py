"""What changes with the step: the learning rate, the memory size and which XL caches are dropped.

All are pure functions of the step, so a resumed run needs nothing but the step to continue them.
"""

from __future__ import annotations

import math

import torch

from megatron_memorizing.training.config import OptimizerConfig


def learning_rate(step: int, config: OptimizerConfig, total_steps: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` (Megatron's default shape)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = config.decay_steps or max(total_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / decay_steps, 1.0)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def memory_size(step: int, curriculum: list, default: int) -> int:
    """The memory size in force at `step`: the last curriculum entry at or before it."""
    size = default
    for start, entry_size in curriculum:
        if step >= start:
            size = entry_size
    return size


def xl_cache_dropped(step: int, share: float, seed: int, slots_per_rank: int, dp_rank: int, dp_size: int) -> torch.Tensor:
    """Which of this data-parallel rank's slots read an empty XL cache at `step` ([slots_per_rank] bool).

    Drawn for all slots of all data-parallel ranks from (seed, step) alone, so every tensor- and
    pipeline-parallel rank of a slot, a recomputed forward and a resumed run draw the same."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    dropped = torch.rand(dp_size * slots_per_rank, generator=generator) < share
    return dropped[dp_rank * slots_per_rank : (dp_rank + 1) * slots_per_rank]
