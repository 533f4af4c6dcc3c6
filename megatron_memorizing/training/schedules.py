"""What changes with the step: the learning rate and the memory size.

Both are pure functions of the step, so a resumed run needs nothing but the step to continue them.
"""

from __future__ import annotations

import math

from megatron_memorizing.run.config import OptimizerConfig


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
