"""The previous segment of each slot's document: what a Transformer-XL layer reads beside the current one.

Per slot, one whole segment of per-position vectors (here the attention layer's inputs), and
whether there is one (a slot that has just started a document has none). Like the kNN memory it
is written only through stage/commit, so forward stays a pure function of the state before the
step, and it is emptied where a new document starts.
"""

from __future__ import annotations

import torch


class SegmentCache:
    def __init__(self, num_slots: int, length: int, width: int, *, dtype: torch.dtype, device: torch.device):
        self.length, self.width = length, width
        self.inputs = torch.zeros(num_slots, length, width, dtype=dtype, device=device)
        self.filled = torch.zeros(num_slots, dtype=torch.bool, device=device)
        self._staged: dict[tuple[int, int], torch.Tensor] = {}  # slot range -> its segment (a re-run replaces)

    @property
    def fill(self) -> torch.Tensor:
        """Positions held per slot (the kNN memory's measure, for the same bookkeeping)."""
        return self.filled.long() * self.length

    @property
    def nbytes(self) -> int:
        return self.inputs.numel() * self.inputs.element_size()

    def _range(self, slots: slice) -> tuple[int, int]:
        start, stop, step = slots.indices(self.inputs.shape[0])
        if step != 1:
            raise ValueError(f"slots must be a contiguous range, got {slots}")
        return start, stop

    def contents(self, slots: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached segments [b, length, width] of `slots`, and which of them exist [b]."""
        return self.inputs[slots], self.filled[slots]

    def stage(self, slots: slice, inputs: torch.Tensor) -> None:
        """Keep `inputs` [b, length, width] as these slots' previous segment once the step commits."""
        if inputs.shape[1:] != self.inputs.shape[1:]:
            raise ValueError(
                f"a segment of shape {tuple(inputs.shape[1:])} does not fit this cache's {tuple(self.inputs.shape[1:])}: "
                f"the XL cache holds whole segments of length {self.length}"
            )
        self._staged[self._range(slots)] = inputs.detach()

    def commit(self) -> None:
        for (start, stop), inputs in self._staged.items():
            self.inputs[start:stop] = inputs.to(self.inputs.dtype)
            self.filled[start:stop] = True
        self._staged = {}

    def reset(self, slots: torch.Tensor) -> None:
        """Forget the segment of every slot where `slots` ([num_slots] bool) is True."""
        self.filled &= ~slots.to(self.filled.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"inputs": self.inputs.clone(), "filled": self.filled.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["inputs"].shape != self.inputs.shape:
            raise ValueError(
                f"saved XL cache has shape {tuple(state['inputs'].shape)} but this model's is {tuple(self.inputs.shape)} "
                f"(slots, segment length, hidden size): resume with the saved layout"
            )
        self.inputs.copy_(state["inputs"])
        self.filled.copy_(state["filled"])
        self._staged = {}
