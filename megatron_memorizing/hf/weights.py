"""A Megatron-Core GPTModel's weights (local spec, TP=1) under Hugging Face names, and back.

Llama, Qwen2, Mistral and the exported remote-code model share one naming. Megatron fuses two
things they keep apart: query, key and value in one projection (rows interleaved per query group:
the group's query heads, then its key head, then its value head), and the gated MLP's gate and up
projections (gate first: Megatron's GLU is activation(first half) * second half). Every other
tensor only changes its name. The memory's own parameters (gate_bias, memory_log_scale) exist
in the remote-code model only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

_GLOBAL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "embedding.position_embeddings.weight": "model.embed_positions.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "decoder.final_layernorm.bias": "model.norm.bias",
    "output_layer.weight": "lm_head.weight",
}
_PER_LAYER = {
    "input_layernorm": "input_layernorm",
    "pre_mlp_layernorm": "post_attention_layernorm",
    "self_attention.linear_proj": "self_attn.o_proj",
    "mlp.linear_fc2": "mlp.down_proj",
}
_MEMORY = {f"self_attention.core_attention.{name}": f"self_attn.{name}" for name in ("gate_bias", "memory_log_scale")}


class WeightsMismatch(ValueError):
    """Weights with no place in the target model; the message names some."""


@dataclass(frozen=True)
class Layout:
    """What the renaming needs to know of the architecture."""

    num_layers: int
    heads: int
    groups: int  # query groups (key/value heads)
    head_dim: int
    gated_linear_unit: bool

    @classmethod
    def of_hf_config(cls, config) -> "Layout":
        """Read from a Hugging Face config: ours, or Llama's, Qwen2's or Mistral's (always gated)."""
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            heads=heads,
            groups=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            gated_linear_unit=getattr(config, "gated_linear_unit", True),
        )


def to_hf(megatron: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Megatron names and fused layouts -> Hugging Face ones. Raises WeightsMismatch on leftovers."""
    source, out = dict(megatron), {}
    for mine, theirs in _renamings(layout):
        if mine in source:
            out[theirs] = source.pop(mine)
    for fused in _fused_tensors(layout):
        whole = source.pop(fused.megatron, None)
        if whole is not None:
            out.update(zip(fused.parts, fused.split(whole)))
    _refuse_leftovers(source)
    return {name: t.contiguous() for name, t in out.items()}


def to_megatron(
    hf: Mapping[str, torch.Tensor],
    layout: Layout,
    cast: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, t: t,
) -> dict[str, torch.Tensor]:
    """Hugging Face names and layouts -> Megatron's fused ones (the inverse of `to_hf`).

    Each tensor of `hf` is read once, when its turn comes, and `cast(megatron_name, tensor)` is all
    that is kept of it: a mapping that reads tensors from files on access is never held whole.
    """
    remaining, out = set(hf), {}

    def take(name: str) -> torch.Tensor:
        remaining.remove(name)
        return hf[name]

    for mine, theirs in _renamings(layout):
        if theirs in remaining:
            out[mine] = cast(mine, take(theirs)).contiguous()
    for fused in _fused_tensors(layout):
        present = [name in remaining for name in fused.parts]
        if all(present):
            out[fused.megatron] = cast(fused.megatron, fused.join([take(name) for name in fused.parts])).contiguous()
        elif any(present):
            missing = [name for name, there in zip(fused.parts, present) if not there]
            raise WeightsMismatch(
                f"{fused.megatron} is made of {', '.join(fused.parts)}; missing: {', '.join(missing)}"
            )
    _refuse_leftovers(remaining)
    return out


@dataclass(frozen=True)
class _Fused:
    """One Megatron tensor made of several Hugging Face ones, and the two ways between them."""

    megatron: str
    parts: tuple[str, ...]
    split: Callable[[torch.Tensor], Sequence[torch.Tensor]]
    join: Callable[[Sequence[torch.Tensor]], torch.Tensor]


def _fused_tensors(layout: Layout):
    h, g, d = layout.heads, layout.groups, layout.head_dim

    def split_qkv(qkv):
        per_group = qkv.view(g, h // g + 2, d, *qkv.shape[1:])
        return [part.reshape(-1, *qkv.shape[1:]) for part in (per_group[:, :-2], per_group[:, -2], per_group[:, -1])]

    def join_qkv(parts):
        q, k, v = parts
        rest = q.shape[1:]
        per_group = torch.cat([q.view(g, h // g, d, *rest), k.view(g, 1, d, *rest), v.view(g, 1, d, *rest)], dim=1)
        return per_group.reshape((h + 2 * g) * d, *rest)

    for i in range(layout.num_layers):
        mine, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            attention = tuple(f"{theirs}self_attn.{p}_proj.{kind}" for p in "qkv")
            yield _Fused(f"{mine}self_attention.linear_qkv.{kind}", attention, split_qkv, join_qkv)
            if layout.gated_linear_unit:
                mlp = (f"{theirs}mlp.gate_proj.{kind}", f"{theirs}mlp.up_proj.{kind}")
                yield _Fused(f"{mine}mlp.linear_fc1.{kind}", mlp, lambda t: t.chunk(2, dim=0), torch.cat)
            else:
                yield _Fused(f"{mine}mlp.linear_fc1.{kind}", (f"{theirs}mlp.up_proj.{kind}",),
                             lambda t: [t], lambda parts: parts[0])


def _renamings(layout: Layout):
    """(Megatron name, Hugging Face name) of every tensor that is only renamed."""
    yield from _GLOBAL.items()
    for i in range(layout.num_layers):
        for mine, theirs in (_PER_LAYER | _MEMORY).items():
            suffixes = ("",) if mine in _MEMORY else (".weight", ".bias")
            for suffix in suffixes:
                yield f"decoder.layers.{i}.{mine}{suffix}", f"model.layers.{i}.{theirs}{suffix}"


def _refuse_leftovers(source) -> None:
    if source:
        raise WeightsMismatch(f"{len(source)} tensor(s) have no place in the target model, e.g. {sorted(source)[:4]}")
