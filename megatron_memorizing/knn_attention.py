"""kNN-augmented core attention: the layer that gives a Memorizing Transformer its memory.

Per head, every query of the segment attends twice:
- locally, with ordinary causal attention (SegmentAttention: stock Megatron; over the previous
  segment too with the XL cache);
- to the top-k (key, value) pairs retrieved from an external memory of the same document's past,
  softmax over the k; keys and queries are L2-normalised and carry no position.
A learned per-head gate mixes the two: g = sigmoid(b_g), out = mem * g + local * (1 - g). With
memory_mixing='softmax' the gate is per query instead, g = sigmoid(b_g + LSE_mem - LSE_local) from
the logsumexp of each attention's logits: exactly one softmax over retrieved and local keys (b_g = 0).
With memory_sink_tokens=N the first N tokens of every segment (a pretrained model's attention
sinks) never come back from the memory: the search asks for enough more pairs to drop them and
still return k.

The memory is not differentiable: retrieval picks pairs without gradient, and the query attends
to them with gradient (so the layer learns what to look up), but nothing flows into the memory.
This segment's keys and values are staged and become searchable only after the step commits.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from megatron_memorizing.memory import KNNMemory, Retrieved
from megatron_memorizing.segment_attention import SegmentAttention, local_attention_logits, state_device

# The memory's own per-head parameters: the only ones a model may have that its checkpoint lacks
# (a vanilla model given memory), and the ones optimizer.memory_scalars_lr_mult applies to.
MEMORY_PARAMETERS = ("gate_bias", "memory_log_scale")


class KNNAttention(SegmentAttention):
    def __init__(
        self,
        *args,
        memory_size: int,
        top_k: int,
        gate_init: float = 0.0,
        mixing: str = "gate",
        sink_tokens: int = 0,
        memory_dtype: torch.dtype = torch.float32,
        search_chunk_size: int = 8192,
        backend: str = "torch",
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.top_k = top_k
        self.memory = KNNMemory(
            self.num_slots,
            self.heads_per_partition,
            memory_size,
            self.head_dim,
            dtype=memory_dtype,
            device=state_device(),
            search_chunk_size=search_chunk_size,
            backend=backend,
        )
        # Per-head parameters, split across tensor-parallel ranks like the heads they belong to.
        # b_g = gate_init for every head; the memory softmax starts at the usual 1/sqrt(d)
        # temperature of unit-norm vectors scaled to norm sqrt(d), i.e. a logit scale of sqrt(d).
        self.gate_bias = self._per_head_parameter(gate_init)
        self.mixing = mixing  # "gate" or "softmax" (MemorizingConfig.memory_mixing)
        self.sink_tokens = sink_tokens  # MemorizingConfig.memory_sink_tokens
        self.memory_log_scale = self._per_head_parameter(0.5 * math.log(self.head_dim))
        # Called with (layer_number, retrieved) after each search (observations.watch_retrievals).
        self.retrieval_watchers: list[Callable[[int, Retrieved], None]] = []
        # Sums of the retrieval statistics over the forward passes since `take_statistics`.
        self._statistics_sum: dict[str, torch.Tensor] = {}
        self._statistics_count = 0

    def _per_head_parameter(self, value: float) -> torch.nn.Parameter:
        param = torch.nn.Parameter(
            torch.full((self.heads_per_partition,), value, dtype=self.config.params_dtype, device=state_device())
        )
        tensor_parallel.set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
        return param

    def stateful_memories(self) -> dict[str, KNNMemory]:
        return {"memory": self.memory}

    @property
    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_bias.float())

    # ---------------------------------------------------------------------------------------------
    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        local = super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        if not self.slot_selection.memory_enabled:  # local attention only, neither reading nor writing memory
            return local
        self.slot_selection.check_batch(query.shape[1], self.layer_number)
        s, b, h, d = query.shape
        local_keys = key
        key, value = key[-s:], value[-s:]  # the current segment's (an XL cache of inputs puts the previous one first)

        # Memory keys carry no position: strip RoPE, then normalise (inner product = cosine).
        queries = F.normalize(self.unrotated(query).float(), dim=-1)
        keys = F.normalize(self.unrotated(key).float(), dim=-1)
        if self.groups_per_partition != h:  # GQA: each query head searches its own memory
            keys = keys.repeat_interleave(h // self.groups_per_partition, dim=2)
            value = value.repeat_interleave(h // self.groups_per_partition, dim=2)

        queries_bhsd = queries.permute(1, 2, 0, 3)
        if self.sink_tokens:  # every segment the memory holds has sink_tokens of them
            sinks = self.sink_tokens * -(-self.memory.capacity // s)
            retrieved = self.memory.search(queries_bhsd.detach(), min(self.top_k + sinks, self.memory.capacity),
                                           slots=self.slots)
            retrieved = without_sinks(retrieved, s, self.sink_tokens, self.top_k)
        else:
            retrieved = self.memory.search(queries_bhsd.detach(), self.top_k, slots=self.slots)
        for watch in self.retrieval_watchers:
            watch(self.layer_number, retrieved)

        scale = self.memory_log_scale.float().exp()[None, :, None, None]
        logits = torch.einsum("bhqd,bhqkd->bhqk", queries_bhsd, retrieved.keys) * scale
        logits = logits.masked_fill(~retrieved.valid, float("-inf"))
        # A query with an empty memory (first segment of a document) keeps local attention only:
        # its gate is closed rather than mixing in an average of nothing.
        has_memory = retrieved.valid.any(dim=-1, keepdim=True)
        probs = torch.softmax(logits.masked_fill(~has_memory, 0.0), dim=-1) * has_memory
        from_memory = torch.einsum("bhqk,bhqkd->bhqd", probs, retrieved.values)

        if self.mixing == "softmax":  # the weight the retrieved pairs get in one softmax with the local keys
            memory_lse = torch.logsumexp(logits.masked_fill(~has_memory, 0.0), dim=-1, keepdim=True)
            local_lse = self._local_logsumexp(query, local_keys, attention_mask)
            gate = torch.sigmoid(self.gate_bias.float()[None, :, None, None] + memory_lse - local_lse) * has_memory
        else:
            gate = self.gate[None, :, None, None] * has_memory  # [b, h, q, 1]
        # The share of the output the memory gives a query that has one (the gate's mean under "gate").
        memory_weight = gate.detach().sum() / has_memory.sum().clamp(min=1)
        self._add_statistics({**self._statistics(retrieved), "memory_weight": memory_weight})
        mixed = from_memory * gate + local.view(s, b, h, d).permute(1, 2, 0, 3).float() * (1 - gate)

        self.memory.stage(self.slots, *as_memory_layout(keys, value))
        return mixed.permute(2, 0, 1, 3).reshape(s, b, h * d).to(local.dtype)

    def _local_logsumexp(self, query, key, attention_mask) -> torch.Tensor:
        """logsumexp of local attention's logits per query [b, h, s, 1]."""
        logits = local_attention_logits(query, key, attention_mask, self.local_softmax_scale)
        return torch.logsumexp(logits, dim=-1, keepdim=True)

    def take_statistics(self) -> dict[str, float]:
        """The retrieval statistics averaged over every micro-batch since the last call (a step's,
        for the training log), then forgotten."""
        means = {name: (total / self._statistics_count).item() for name, total in self._statistics_sum.items()}
        self._statistics_sum, self._statistics_count = {}, 0
        return means

    def _add_statistics(self, values: dict[str, torch.Tensor]) -> None:
        # Kept as tensors: no device sync in forward.
        for name, value in values.items():
            self._statistics_sum[name] = self._statistics_sum.get(name, 0.0) + value
        self._statistics_count += 1

    @torch.no_grad()
    def _statistics(self, retrieved) -> dict[str, torch.Tensor]:
        """How often, how well and how far back the best match is."""
        best = retrieved.valid[..., 0]
        slots = torch.arange(self.num_slots, device=best.device)[self.slots]
        # The query at index q of this segment sits at position written + q of its slot's document.
        now = self.memory.written[slots].view(-1, 1, 1) + torch.arange(best.shape[-1], device=best.device)
        found = best.float().sum().clamp(min=1)
        return {
            "queries_with_memory": best.float().mean(),
            "top1_score": torch.where(best, retrieved.scores[..., 0], 0.0).sum() / found,
            "top1_distance": torch.where(best, (now - retrieved.positions[..., 0]).float(), 0.0).sum() / found,
        }

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: Optional[dict] = None):
        # Megatron's default treats a module's own parameters as replicated across TP ranks;
        # these are split by head, so say so (axis 0) and let dist_checkpointing reshard them.
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sharded = make_sharded_tensors_for_checkpoint(
            {"gate_bias": self.gate_bias, "memory_log_scale": self.memory_log_scale},
            prefix,
            {"gate_bias": 0, "memory_log_scale": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )
        sharded.update(
            sharded_state_dict_default(
                self.local_attention, f"{prefix}local_attention.", sharded_offsets, metadata, tp_group=self.tp_group
            )
        )
        return sharded


def without_sinks(retrieved: Retrieved, segment_length: int, sink_tokens: int, k: int) -> Retrieved:
    """The best k of `retrieved` that are not the first `sink_tokens` tokens of a segment (every
    segment writes segment_length pairs, so a pair's position in its segment is its position modulo
    that), best first; invalid entries, as from a search, where fewer are left."""
    valid = retrieved.valid & (retrieved.positions % segment_length >= sink_tokens)
    # A stable sort on "not valid" keeps the search's best-first order among the valid entries.
    order = torch.sort((~valid).to(torch.uint8), dim=-1, stable=True).indices[..., :k]
    valid = valid.gather(-1, order)
    index = order.unsqueeze(-1).expand(*order.shape, retrieved.keys.shape[-1])
    return Retrieved(
        keys=retrieved.keys.gather(-2, index).masked_fill(~valid.unsqueeze(-1), 0),
        values=retrieved.values.gather(-2, index).masked_fill(~valid.unsqueeze(-1), 0),
        valid=valid,
        positions=retrieved.positions.gather(-1, order).masked_fill(~valid, -1),
        scores=retrieved.scores.gather(-1, order).masked_fill(~valid, float("-inf")),
    )


def as_memory_layout(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[s, b, h, d] activations -> detached [b, h, s, d] memory entries (memory is not differentiable)."""
    return tuple(t.detach().permute(1, 2, 0, 3) for t in tensors)
