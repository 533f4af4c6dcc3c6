"""Which memory slots the running micro-batch streams, and whether kNN memory is read at all.

Layers with per-slot state (kNN attention, the XL caches) hold one row of state per slot, and
a micro-batch streams only some of the slots. One SlotSelection is built with the model, handed
to every such layer through its layer spec (`megatron_memorizing.spec`), and driven by the
model's memory handle (`ModelMemories`); the layers only read it. So the trainer never reaches
into a layer, and every layer of every model chunk sees the same selection.
"""

from __future__ import annotations


class SlotSelection:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.slots = slice(0, num_slots)  # the slots of the micro-batch being run
        self.memory_enabled = True  # False: kNN attention computes local attention only

    def select(self, slots: slice) -> None:
        if not 0 <= slots.start < slots.stop <= self.num_slots:
            raise IndexError(f"slots {slots.start}..{slots.stop - 1} are outside the model's {self.num_slots} slots")
        self.slots = slots

    def check_batch(self, sequences: int, layer_number: int) -> None:
        """A layer's check that its input has one sequence per selected slot."""
        selected = self.slots.stop - self.slots.start
        if sequences != selected:
            raise RuntimeError(
                f"layer {layer_number}: the micro-batch has {sequences} sequences but {selected} memory slots "
                f"are selected ({self.slots}); select the micro-batch's slots with "
                f"ModelMemories.use_micro_batch() before the forward pass."
            )
