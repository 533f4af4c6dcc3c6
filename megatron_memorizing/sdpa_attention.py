"""Core attention through PyTorch's scaled_dot_product_attention.

Megatron-Core's local DotProductAttention (what a layer runs without Transformer Engine) writes
out every score: heads x s x s floats per sequence, 2.4 GB for SmolLM2's nine heads at 8K tokens,
then masks and softmaxes them in separate passes. `torch.nn.functional.scaled_dot_product_attention`
computes the same attention in tiles (flash attention on GPUs, a tiled kernel on CPUs), in memory
linear in s and five to seven times faster on a CPU at 8K (benchmarks/bench_core_attention.py).
Selected with `model.core_attention=sdpa`, it replaces the stock core attention in every layer's
spec; it has no parameters, so checkpoints are the same either way.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """DotProductAttention's arguments, scale, dropout and output layout; the attention itself in
    one fused call. Causal attention over a segment needs no mask tensor; a given mask (True: masked
    out, as Megatron's) is honoured, e.g. the XL cache's over [previous segment; current segment]."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"model.core_attention=sdpa computes the plain softmax; softmax_type={config.softmax_type!r} needs "
                f"model.core_attention=stock."
            )
        # What the stock attention scales its scores by in all (apply_query_key_layer_scaling divides
        # softmax_scale by the layer number, and its softmax multiplies it back).
        self.scores_scale = self.softmax_scale * (self.layer_number if config.apply_query_key_layer_scaling else 1)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("model.core_attention=sdpa takes neither packed sequences nor attention biases.")
        repeats = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if repeats > 1:  # grouped-query attention: each query head reads its group's key and value
            key, value = key.repeat_interleave(repeats, dim=2), value.repeat_interleave(repeats, dim=2)
        # [s, b, heads, head_dim] -> [b, heads, s, head_dim]
        query, key, value = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        dropout = self.attention_dropout.p if self.training else 0.0
        # Dropout draws from the stock attention's random stream (one per tensor-parallel rank).
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout and not self.config.sequence_parallel else None
        with rng or nullcontext():
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=None if attention_mask is None else ~attention_mask,
                dropout_p=dropout, is_causal=causal, scale=self.scores_scale,
            )
        # [b, heads, s, head_dim] -> [s, b, heads * head_dim]
        return context.permute(2, 0, 1, 3).reshape(context.shape[2], context.shape[0], self.hidden_size_per_partition)
