"""The previous segment of each slot's document: what a Transformer-XL layer reads beside the current one.

Per slot, one whole segment of per-position tensors, by name (the attention layer's inputs),
and whether there is one (a slot that has just started a
document has none). Like the kNN memory it is written only through stage/commit, so forward stays
a pure function of the state before the step, and it is emptied where a new document starts.
"""

from __future__ import annotations

import torch


class SegmentCache:
    def __init__(self, num_slots: int, length: int, shapes: dict[str, tuple[int, ...]], *,
                 dtype: torch.dtype, device: torch.device):
        """`shapes`: name -> shape of one position's tensor, e.g. {"inputs": (hidden,)}."""
        self.length = length
        self.segments = {name: torch.zeros(num_slots, length, *shape, dtype=dtype, device=device)
                         for name, shape in shapes.items()}
        self.filled = torch.zeros(num_slots, dtype=torch.bool, device=device)
        # slot range -> its segment (a re-run replaces)
        self._staged: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    @property
    def fill(self) -> torch.Tensor:
        """Positions held per slot (the kNN memory's measure, for the same bookkeeping)."""
        return self.filled.long() * self.length

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.segments.values())

    def _range(self, slots: slice) -> tuple[int, int]:
        start, stop, step = slots.indices(self.filled.shape[0])
        if step != 1:
            raise ValueError(f"slots must be a contiguous range, got {slots}")
        return start, stop

    def contents(self, slots: slice) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The cached segments of `slots` by name ([b, length, ...] each), and which exist [b]."""
        return {name: t[slots] for name, t in self.segments.items()}, self.filled[slots]

    def stage(self, slots: slice, **segment: torch.Tensor) -> None:
        """Keep `segment` (every name, [b, length, ...]) as these slots' previous segment once the step commits."""
        if segment.keys() != self.segments.keys():
            raise ValueError(f"a segment of {sorted(segment)} does not fit this cache of {sorted(self.segments)}")
        for name, tensor in segment.items():
            if tensor.shape[1:] != self.segments[name].shape[1:]:
                raise ValueError(
                    f"a segment's {name} of shape {tuple(tensor.shape[1:])} does not fit this cache's "
                    f"{tuple(self.segments[name].shape[1:])}: the XL cache holds whole segments of length {self.length}"
                )
        self._staged[self._range(slots)] = {name: t.detach() for name, t in segment.items()}

    def commit(self) -> None:
        for (start, stop), segment in self._staged.items():
            for name, tensor in segment.items():
                self.segments[name][start:stop] = tensor.to(self.segments[name].dtype)
            self.filled[start:stop] = True
        self._staged = {}

    def reset(self, slots: torch.Tensor) -> None:
        """Forget the segment of every slot where `slots` ([num_slots] bool) is True."""
        self.filled &= ~slots.to(self.filled.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{name: t.clone() for name, t in self.segments.items()}, "filled": self.filled.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        saved = {name: tuple(t.shape) for name, t in state.items() if name != "filled"}
        mine = {name: tuple(t.shape) for name, t in self.segments.items()}
        if saved != mine:
            raise ValueError(
                f"saved XL cache holds {saved} but this model's holds {mine} (slots, segment length, ...): "
                f"resume with the saved layout and XL cache settings"
            )
        for name, tensor in self.segments.items():
            tensor.copy_(state[name])
        self.filled.copy_(state["filled"])
        self._staged = {}
