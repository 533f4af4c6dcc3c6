"""When a run has diverged: the test a checkpoint passes before it is called good.

A checkpoint written after step N is published (made the one a resume starts from) only once
step N + 1 has computed a loss from its weights and that loss is sane. A loss is not sane when
it is not finite, or when it has left both what a uniform guess over the vocabulary scores
(ln V) and `training.divergence_factor` times the recent average of the sane losses. A finite
loss of 1e11 is the usual sign: a learning rate far too high has thrown the weights so far that a
resume with a sane one only crashes later, so those weights must never be named good.

The run stops at such a loss, before the update, naming the last good checkpoint. The average
is part of the run's state: a resumed run judges its first steps by the same measure.
"""

from __future__ import annotations

import math
from typing import Optional

# Weight of the newest sane loss in the running average: about the last ten steps.
_NEWEST = 0.1


class DivergedError(RuntimeError):
    """The loss says the weights are broken; the message names the step and the last good checkpoint."""


class DivergenceGuard:
    def __init__(self, vocab_size: int, factor: float):
        self.uniform_loss = math.log(vocab_size)
        self.factor = factor  # 0: only a non-finite loss is divergence
        self.average: Optional[float] = None  # of the sane losses so far; None before the first

    def problem(self, loss: float) -> Optional[str]:
        """Why `loss` means the run diverged, or None if it is sane (and joins the average)."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        bound = max(self.uniform_loss, self.factor * self.average) if self.factor and self.average else None
        if bound is not None and loss > bound:
            return (
                f"the loss is {loss:.4g}, more than training.divergence_factor={self.factor:g} times the recent "
                f"average {self.average:.4g} and than a uniform guess over the vocabulary ({self.uniform_loss:.4g})"
            )
        self.average = loss if self.average is None else (1 - _NEWEST) * self.average + _NEWEST * loss
        return None

    def state_dict(self) -> dict:
        return {"average": self.average}

    def load_state_dict(self, state: dict) -> None:
        self.average = state.get("average")
