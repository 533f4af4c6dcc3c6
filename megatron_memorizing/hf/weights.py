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
    h, g, d = layout.heads, layout.groups, layout.head_dim
    for i in range(layout.num_layers):
        mine, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = source.pop(f"{mine}self_attention.linear_qkv.{kind}", None)
            if qkv is not None:
                per_group = qkv.view(g, h // g + 2, d, *qkv.shape[1:])
                out[f"{theirs}self_attn.q_proj.{kind}"] = per_group[:, :-2].reshape(h * d, *qkv.shape[1:])
                out[f"{theirs}self_attn.k_proj.{kind}"] = per_group[:, -2].reshape(g * d, *qkv.shape[1:])
                out[f"{theirs}self_attn.v_proj.{kind}"] = per_group[:, -1].reshape(g * d, *qkv.shape[1:])
            fc1 = source.pop(f"{mine}mlp.linear_fc1.{kind}", None)
            if fc1 is not None and layout.gated_linear_unit:
                out[f"{theirs}mlp.gate_proj.{kind}"], out[f"{theirs}mlp.up_proj.{kind}"] = fc1.chunk(2, dim=0)
            elif fc1 is not None:
                out[f"{theirs}mlp.up_proj.{kind}"] = fc1
    _refuse_leftovers(source)
    return {name: t.contiguous() for name, t in out.items()}


def to_megatron(hf: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Hugging Face names and layouts -> Megatron's fused ones (the inverse of `to_hf`)."""
    source, out = dict(hf), {}
    for mine, theirs in _renamings(layout):
        if theirs in source:
            out[mine] = source.pop(theirs)
    h, g, d = layout.heads, layout.groups, layout.head_dim
    for i in range(layout.num_layers):
        mine, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = (source.pop(f"{theirs}self_attn.{p}_proj.{kind}", None) for p in "qkv")
            if q is not None and k is not None and v is not None:
                rest = q.shape[1:]
                per_group = torch.cat(
                    [q.view(g, h // g, d, *rest), k.view(g, 1, d, *rest), v.view(g, 1, d, *rest)], dim=1
                )
                out[f"{mine}self_attention.linear_qkv.{kind}"] = per_group.reshape((h + 2 * g) * d, *rest)
            elif q is not None or k is not None or v is not None:
                raise WeightsMismatch(f"layer {i} has some of q_proj, k_proj, v_proj.{kind} but not all three.")
            gate, up = (source.pop(f"{theirs}mlp.{p}_proj.{kind}", None) for p in ("gate", "up"))
            if layout.gated_linear_unit and gate is not None and up is not None:
                out[f"{mine}mlp.linear_fc1.{kind}"] = torch.cat([gate, up], dim=0)
            elif not layout.gated_linear_unit and gate is None and up is not None:
                out[f"{mine}mlp.linear_fc1.{kind}"] = up
            elif gate is not None or up is not None:
                raise WeightsMismatch(f"layer {i}: mlp gate_proj/up_proj.{kind} do not fit gated_linear_unit={layout.gated_linear_unit}.")
    _refuse_leftovers(source)
    return {name: t.contiguous() for name, t in out.items()}


def _renamings(layout: Layout):
    """(Megatron name, Hugging Face name) of every tensor that is only renamed."""
    yield from _GLOBAL.items()
    for i in range(layout.num_layers):
        for mine, theirs in (_PER_LAYER | _MEMORY).items():
            suffixes = ("",) if mine in _MEMORY else (".weight", ".bias")
            for suffix in suffixes:
                yield f"decoder.layers.{i}.{mine}{suffix}", f"model.layers.{i}.{theirs}{suffix}"


def _refuse_leftovers(source: dict) -> None:
    if source:
        raise WeightsMismatch(f"{len(source)} tensor(s) have no place in the target model, e.g. {sorted(source)[:4]}")
