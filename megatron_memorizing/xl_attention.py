"""Self-attention with a Transformer-XL cache of its *inputs*, as Transformer-XL has it.

The layer keeps, per slot, the previous segment's inputs (the hidden states its QKV projection
reads) and projects them again at every step with the current weights: the cached keys and values
are as fresh as the weights, and the projection learns from the cached positions too. (A cache of
projected keys and values would hold what last step's weights made of them.)

Megatron-Core's SelfAttention does the rest unchanged. This subclass only
- projects [cached segment; current segment] to keys and values (queries: the current segment),
- gives the keys rotary positions -L..s-1, the queries 0..s-1, and
- passes core attention the mask over both: the cached part where the slot has one, causal after.
Core attention (SegmentAttention) sees keys longer than queries and applies that mask as given.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.utils import divide

from megatron_memorizing.positions import RotaryPositions
from megatron_memorizing.segment_attention import cache_then_causal_mask, state_device
from megatron_memorizing.segment_cache import SegmentCache
from megatron_memorizing.slot_selection import SlotSelection


class XLSelfAttention(SelfAttention):
    def __init__(
        self, *args, slot_selection: SlotSelection, segment_length: int, rotary: Optional[dict] = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.slot_selection = slot_selection  # which slots the running micro-batch streams
        self.segment_length = segment_length
        self.rotary = RotaryPositions(self.config, **rotary) if rotary is not None else None
        # Under sequence parallelism each rank holds (and caches) its part of the sequence; the
        # projection gathers the parts of the cached segment as it does the current one's.
        self.sequence_shards = self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1
        self.cache = SegmentCache(slot_selection.num_slots, divide(segment_length, self.sequence_shards),
                                  {"inputs": (self.config.hidden_size,)},
                                  dtype=self.config.params_dtype, device=state_device())
        self._cached_inputs: Optional[torch.Tensor] = None  # [L, b, hidden] during forward only

    def stateful_memories(self) -> dict[str, SegmentCache]:
        """Per-slot state this layer keeps across steps, by name (checkpointed by the trainer)."""
        return {"xl_inputs": self.cache}

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        if kwargs.get("inference_context") is not None or kwargs.get("packed_seq_params") is not None:
            raise NotImplementedError("the XL cache streams whole segments: no inference context or packed sequences")
        self.slot_selection.check_batch(hidden_states.shape[1], self.layer_number)
        slots = self.slot_selection.slots
        cached, filled = self.cache.contents(slots)
        cached = cached["inputs"]  # [b, L, hidden]; filled: [b]
        length, s = self.segment_length, hidden_states.shape[0] * self.sequence_shards
        if kwargs.get("rotary_pos_emb") is not None:
            query_freqs = kwargs["rotary_pos_emb"]
            query_freqs = query_freqs[0] if isinstance(query_freqs, tuple) else query_freqs
            kwargs["rotary_pos_emb"] = (query_freqs, self.rotary.freqs(length + s, -length, query_freqs.device))
        mask = cache_then_causal_mask(filled.to(hidden_states.device), length, s)
        self.cache.stage(slots, inputs=hidden_states.transpose(0, 1))
        self._cached_inputs = cached.transpose(0, 1).to(hidden_states.dtype)
        try:
            return super().forward(hidden_states, mask, **kwargs)
        finally:
            self._cached_inputs = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        if self._cached_inputs is None:  # not inside forward: plain self-attention
            return super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate, split_qkv)
        if output_gate or not split_qkv:
            raise NotImplementedError(
                "the XL cache needs separate query, key and value (no output gate, no fused QKV RoPE)"
            )
        query, key, value = super().get_query_key_value_tensors(hidden_states, key_value_states)
        _, cached_key, cached_value = super().get_query_key_value_tensors(self._cached_inputs, key_value_states)
        return query, torch.cat([cached_key, key]), torch.cat([cached_value, value])
