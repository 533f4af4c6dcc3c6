"""Building a memorizing GPTModel from a MemorizingConfig.

The model is Megatron-Core's own GPTModel; only the layer specs differ (see spec.py), and, with
YaRN, its rotary embedding's frequencies (positions.py). Under virtual pipeline parallelism a rank
holds several model chunks, as in Megatron-LM; their layers share one SlotSelection, which
`ModelMemories` drives.
"""

from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_memorizing.config import MemorizingConfig
from megatron_memorizing.positions import use_yarn_frequencies
from megatron_memorizing.slot_selection import SlotSelection
from megatron_memorizing.spec import memorizing_block_spec


def build_model_chunk(
    config: MemorizingConfig, vp_stage=None, use_transformer_engine=None, slot_selection: Optional[SlotSelection] = None
) -> GPTModel:
    transformer_config = config.transformer_config()
    slot_selection = slot_selection or SlotSelection(config.memory_slots)
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=transformer_config,
        transformer_layer_spec=memorizing_block_spec(
            config, transformer_config, slot_selection, vp_stage, use_transformer_engine
        ),
        vocab_size=config.vocab_size,
        max_sequence_length=config.segment_length,
        pre_process=first,
        post_process=last,
        share_embeddings_and_output_weights=config.share_embeddings_and_output_weights,
        position_embedding_type=config.position_embedding_type,
        **config.rotary,
        vp_stage=vp_stage,
    )
    if config.yarn is not None:  # YaRN is only ever RoPE's (MemorizingConfig.validate_yarn)
        use_yarn_frequencies(model.rotary_pos_emb, config.yarn)
    return model


def build_model(config: MemorizingConfig, use_transformer_engine=None) -> list[GPTModel]:
    """The model chunks of this rank: one, or one per virtual pipeline stage."""
    slot_selection = SlotSelection(config.memory_slots)
    stages = (
        [None] if config.virtual_pipeline_model_parallel_size is None
        else range(config.virtual_pipeline_model_parallel_size)
    )
    return [build_model_chunk(config, stage, use_transformer_engine, slot_selection) for stage in stages]
