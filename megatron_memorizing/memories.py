"""The trainer's one handle on the per-slot state of a model: kNN memories and XL caches.

Layers never reach into the trainer, and the trainer never reaches into a layer: it drives
their state through this handle, which selects slots through the layers' shared SlotSelection:

    memories = ModelMemories(model_chunks, micro_batch_size)
    memories.reset(batch.new_document)          # a slot that starts a new document forgets the old one
    for j, micro_batch in enumerate(...):       # inside Megatron's forward_step_func
        memories.use_micro_batch(j)             # micro-batch j streams slots [j*b, (j+1)*b)
        output = memories.keep_for_backward(model(...), j)
    optimizer.step()
    memories.commit()                           # this step's keys/values become searchable

Everything is local to the rank: under TP each rank's layers hold their own heads, under PP only
the stages with memory layers hold any, under DP each rank holds its own slots.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch

from megatron_memorizing.knn_attention import KNNAttention
from megatron_memorizing.memory import KNNMemory
from megatron_memorizing.segment_attention import SegmentAttention
from megatron_memorizing.segment_cache import SegmentCache
from megatron_memorizing.slot_selection import SlotSelection
from megatron_memorizing.xl_attention import XLSelfAttention


class ModelMemories:
    def __init__(self, model_chunks: torch.nn.Module | Iterable[torch.nn.Module], micro_batch_size: int):
        chunks = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)
        # Every module with per-slot state: core attentions (the kNN memory, in KNNAttention) and
        # self-attentions with the XL cache.
        self.layers: list[SegmentAttention | XLSelfAttention] = [
            m for chunk in chunks for m in chunk.modules() if isinstance(m, (SegmentAttention, XLSelfAttention))
        ]
        self.micro_batch_size = micro_batch_size
        selections = {id(layer.slot_selection): layer.slot_selection for layer in self.layers}
        if len(selections) > 1:
            raise ValueError("the model chunks do not share one SlotSelection: build them together with build_model()")
        # None for a model without per-slot state (no memory, no XL cache): nothing to select.
        self.slot_selection: SlotSelection | None = next(iter(selections.values()), None)

    def named_memories(self) -> Iterable[tuple[str, KNNMemory | SegmentCache]]:
        for layer in self.layers:
            for name, memory in layer.stateful_memories().items():
                yield f"layer{layer.layer_number}.{name}", memory

    @property
    def knn_layers(self) -> list[KNNAttention]:
        return [layer for layer in self.layers if isinstance(layer, KNNAttention)]

    # --- the step ---------------------------------------------------------------------------------
    def use_micro_batch(self, index: int) -> None:
        if self.slot_selection is not None:
            self.slot_selection.select(slice(index * self.micro_batch_size, (index + 1) * self.micro_batch_size))

    def keep_for_backward(self, output: torch.Tensor, index: int) -> torch.Tensor:
        """Make backward of this micro-batch's output select its slots again.

        Pipeline schedules run backward of micro-batch j after forwards of later micro-batches,
        and activation recompute re-runs forward inside that backward: without this, the
        recomputed forward would read (and stage into) the slots of whichever micro-batch ran last.
        """
        return _SelectOnBackward.apply(output, lambda: self.use_micro_batch(index))

    def reset(self, new_document: torch.Tensor) -> None:
        """Empty every slot whose sequence starts a new document ([num_slots] bool)."""
        if bool(new_document.any()):
            for _, memory in self.named_memories():
                memory.reset(new_document.to(memory.fill.device))

    def commit(self) -> None:
        for _, memory in self.named_memories():
            memory.commit()

    # --- curricula and sizing ----------------------------------------------------------------------
    def resize(self, memory_size: int) -> None:
        """Grow (or shrink) every kNN memory to `memory_size`, keeping its contents."""
        for layer in self.knn_layers:
            if memory_size < layer.top_k:
                raise ValueError(f"memory_size={memory_size} is smaller than knn_top_k={layer.top_k}.")
            if layer.memory.capacity != memory_size:
                layer.memory.resize(memory_size)

    @property
    def nbytes(self) -> int:
        return sum(memory.nbytes for _, memory in self.named_memories())

    def stats(self) -> dict[str, float]:
        """Mean fill, gate and retrieval statistics (over the micro-batches since the last call) per
        memory layer of this rank, for logging."""
        out = {}
        for layer in self.knn_layers:
            n = layer.layer_number
            out[f"memory/layer{n}/fill"] = layer.memory.fill.float().mean().item()
            out[f"memory/layer{n}/gate"] = layer.gate.mean().item()
            out.update({f"memory/layer{n}/{k}": v for k, v in layer.take_statistics().items()})
        return out

    # --- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {name: memory.state_dict() for name, memory in self.named_memories()}

    def load_state_dict(self, state: dict) -> None:
        mine = dict(self.named_memories())
        if set(state) != set(mine):
            kinds = {name.split(".")[1] for name in set(state) ^ set(mine)}
            hint = ""
            if {"xl_cache", "xl_inputs"} <= kinds:
                hint = (" (its XL cache of projected keys and values, model.xl_cache_contents: keys_values, was "
                        "removed: start from its weights with checkpoint.init_from)")
            raise ValueError(
                f"saved memory state has {sorted(state)} but this model keeps {sorted(mine)}: it was "
                f"saved by a model with other memory layers or XL cache settings{hint}."
            )
        for name, memory in mine.items():
            # A kNN memory's size is part of its state: a curriculum may have grown it since start-up.
            if isinstance(memory, KNNMemory) and state[name]["keys"].shape[2] != memory.capacity:
                memory.resize(state[name]["keys"].shape[2])
            memory.load_state_dict(state[name])

    def snapshot(self) -> dict:
        """A copy of every memory, to restore after an evaluation pass that streams other documents."""
        return {name: {k: v.clone() for k, v in sd.items()} for name, sd in self.state_dict().items()}

    @contextlib.contextmanager
    def disabled(self):
        """Local attention only inside the block: the model as if it had no memory."""
        if self.slot_selection is None:
            yield
            return
        self.slot_selection.memory_enabled = False
        try:
            yield
        finally:
            self.slot_selection.memory_enabled = True


class _SelectOnBackward(torch.autograd.Function):
    """Identity whose backward first calls `select` (see ModelMemories.keep_for_backward)."""

    @staticmethod
    def forward(ctx, output, select):
        ctx.select = select
        # A fresh tensor, not a view: pipeline schedules free output tensors' storage after sending.
        return output.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.select()
        return grad, None
