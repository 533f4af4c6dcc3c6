"""Turning stock Megatron-Core GPT layer specs into memorizing ones.

Megatron-Core builds layers from `ModuleSpec`s; the plugin changes the core attention of
self-attention (and, with the XL cache, self-attention's class, to XLSelfAttention) and
leaves everything else (projections, MLP, norms, TE or local implementations) exactly as the
stock spec has it (with `core_attention=sdpa`, the stock core attention is PyTorch's fused one).
A layer with neither memory nor XL cache keeps the stock spec untouched. Layers with per-slot
state all receive the model's one SlotSelection (slot_selection.py).
"""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_memorizing.config import MemorizingConfig
from megatron_memorizing.knn_attention import KNNAttention
from megatron_memorizing.sdpa_attention import SDPAttention
from megatron_memorizing.segment_attention import SegmentAttention
from megatron_memorizing.slot_selection import SlotSelection
from megatron_memorizing.xl_attention import XLSelfAttention


def stock_layer_spec(config: MemorizingConfig, use_transformer_engine: Optional[bool] = None) -> ModuleSpec:
    """Megatron-Core's own GPT layer spec: Transformer Engine when installed, else local modules;
    with `core_attention=sdpa`, its core attention is PyTorch's fused one (sdpa_attention.py)."""
    if use_transformer_engine is None:
        use_transformer_engine = gpt_layer_specs.HAVE_TE
    if use_transformer_engine:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization=config.normalization)
    if config.core_attention == "sdpa":
        spec = copy.deepcopy(spec)
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def memorizing_layer_spec(
    layer_spec: ModuleSpec, config: MemorizingConfig, layer_number: int, slot_selection: SlotSelection
) -> ModuleSpec:
    """`layer_spec` with kNN attention (if `layer_number` has memory) or the XL cache (if on)."""
    with_memory = config.has_memory(layer_number)
    if not with_memory and not config.xl_cache:
        return layer_spec
    spec = copy.deepcopy(layer_spec)
    attention = spec.submodules.self_attention.submodules
    rotary = {**config.rotary, "yarn": config.yarn} if config.position_embedding_type == "rope" else None
    if config.xl_cache:  # self-attention itself keeps and re-projects the previous segment
        self_attention = spec.submodules.self_attention
        self_attention.module = XLSelfAttention
        self_attention.params = {
            **self_attention.params, "slot_selection": slot_selection, "segment_length": config.segment_length,
            "rotary": rotary,
        }
    params = dict(
        local_attention=attention.core_attention,
        slot_selection=slot_selection,
        rotary=rotary,
    )
    if with_memory:
        params.update(
            memory_size=config.memory_size,
            top_k=config.knn_top_k,
            gate_init=config.gate_init,
            mixing=config.memory_mixing,
            sink_tokens=config.memory_sink_tokens,
            memory_dtype=config.torch_memory_dtype,
            search_chunk_size=config.memory_search_chunk,
            backend=config.memory_backend,
        )
    attention.core_attention = ModuleSpec(module=KNNAttention if with_memory else SegmentAttention, params=params)
    return spec


def memorizing_block_spec(
    config: MemorizingConfig,
    transformer_config: TransformerConfig,
    slot_selection: SlotSelection,
    vp_stage: Optional[int] = None,
    use_transformer_engine: Optional[bool] = None,
) -> TransformerBlockSubmodules:
    """Layer specs of the layers this pipeline stage (and virtual stage) builds.

    Layer numbers are global and 1-based on every pipeline layout, so whether a layer has memory
    does not depend on how the model is split.
    """
    base = stock_layer_spec(config, use_transformer_engine)
    offset = get_transformer_layer_offset(transformer_config, vp_stage=vp_stage)
    count = get_num_layers_to_build(transformer_config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=[memorizing_layer_spec(base, config, offset + i + 1, slot_selection) for i in range(count)],
        layer_norm=base.submodules.input_layernorm,
    )
