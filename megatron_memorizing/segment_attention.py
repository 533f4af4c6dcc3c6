"""Core attention over one segment of a streamed document (and the previous one, with the XL cache).

This is the base of every core attention the plugin puts into a Megatron-Core layer:
- the attention itself is the stock core attention of the base layer spec (DotProductAttention,
  or TEDotProductAttention when Transformer Engine is installed), built unchanged, so a layer with
  nothing switched on computes exactly what stock Megatron computes;
- a subclass may own per-slot state that outlives a step (KNNAttention: the memory), addressed
  by the slots of the micro-batch being run, read from the model's SlotSelection. (The XL cache
  is kept by self-attention itself, XLSelfAttention in xl_attention.py.)

State is never written during forward. Forward only *stages* what it would write, and the handle
commits after the optimizer step, so forward is a pure function of (parameters, inputs, state
before the step): activation recompute, pipeline schedules and gradient accumulation all see the
same state however often and in whatever order they run forward.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_memorizing.positions import RotaryPositions
from megatron_memorizing.slot_selection import SlotSelection


def state_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class SegmentAttention(MegatronModule):
    """Causal attention over the current segment (and the previous one, with the XL cache on).

    Built by SelfAttention with Megatron's core-attention arguments; the keyword arguments after
    `pg_collection` come from the layer spec's params (see `megatron_memorizing.spec`).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        cp_comm_type: Optional[str] = None,
        softmax_scale: Optional[float] = None,
        pg_collection=None,
        *,
        local_attention: ModuleSpec,
        slot_selection: SlotSelection,
        rotary: Optional[dict] = None,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.local_attention = build_module(
            local_attention,
            config=config,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            attention_type=attention_type,
            cp_comm_type=cp_comm_type,
            softmax_scale=softmax_scale,
            pg_collection=pg_collection,
        )
        self.tp_group = (
            pg_collection.tp if pg_collection is not None else parallel_state.get_tensor_model_parallel_group()
        )
        tp_size = self.tp_group.size()
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels
        # The scale stock core attention gives its logits (what a caller reproducing them needs).
        self.local_softmax_scale = softmax_scale if softmax_scale is not None else self.head_dim**-0.5
        self.slot_selection = slot_selection  # which slots the running micro-batch streams
        # `rotary` is None unless the model uses RoPE: q/k then carry no position to remove.
        self.rotary = RotaryPositions(config, **rotary) if rotary is not None else None

    @property
    def num_slots(self) -> int:
        return self.slot_selection.num_slots

    @property
    def slots(self) -> slice:
        return self.slot_selection.slots

    def stateful_memories(self) -> dict:
        """Per-slot state this layer keeps across steps, by name (checkpointed by the trainer): none here."""
        return {}

    # ---------------------------------------------------------------------------------------------
    def unrotated(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotary.unrotate(x) if self.rotary is not None else x

    def local(self, query, key, value, attention_mask, attn_mask_type=None, **kwargs) -> torch.Tensor:
        """Local causal attention, over [previous segment; current segment] when the XL cache is on.

        Keys longer than the queries come from the XL cache (XLSelfAttention): the previous
        segment's keys are already in front, and `attention_mask` covers both.
        """
        if key.shape[0] > query.shape[0]:
            return self.local_attention(
                query, key, value, attention_mask, attn_mask_type=AttnMaskType.arbitrary, **kwargs
            )
        return self.local_attention(query, key, value, attention_mask, attn_mask_type=attn_mask_type, **kwargs)

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if packed_seq_params is not None:
            raise NotImplementedError(
                "packed sequences mix documents in one row; memorizing models stream one document "
                "per slot. Train without sequence packing."
            )
        return self.local(
            query, key, value, attention_mask, attn_mask_type=attn_mask_type, attention_bias=attention_bias
        )


def cache_then_causal_mask(filled: torch.Tensor, cached: int, length: int) -> torch.Tensor:
    """The attention mask [b, 1, s, L+s] (True = masked) of s = `length` queries over an XL cache
    of L = `cached` positions, then their own segment: the cached segment where the slot has one
    (`filled` [b]), their own segment causally."""
    b = filled.shape[0]
    cache = (~filled)[:, None, None, None].expand(b, 1, length, cached)
    causal = torch.ones(length, length, dtype=torch.bool, device=filled.device).triu(1)
    return torch.cat([cache, causal.expand(b, 1, length, length)], dim=-1)


def local_attention_logits(query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor],
                           scale: float) -> torch.Tensor:
    """Local attention's logits [b, h, s, t] as stock core attention computes them from its inputs
    (query [s, b, h, d], key [t, b, g, d]): scaled dot products, -inf where a query may not look.
    Keys as many as the queries are one segment, seen causally; more keys carry an XL cache in
    front, and `attention_mask` ([b, 1, s, t], True = masked) says which of them a query sees."""
    s, h = query.shape[0], query.shape[2]
    if key.shape[2] != h:  # grouped-query attention: each group's key serves h / g query heads
        key = key.repeat_interleave(h // key.shape[2], dim=2)
    logits = torch.einsum("sbhd,tbhd->bhst", query.float(), key.float()) * scale
    if key.shape[0] == s:
        masked = torch.ones(s, s, dtype=torch.bool, device=query.device).triu(1)
    else:
        masked = attention_mask
    return logits.masked_fill(masked, float("-inf"))
