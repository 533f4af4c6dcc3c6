"""Bad configurations fail at construction, before any process group exists, naming the fix."""

import math

import pytest

from megatron_memorizing.config import ConfigError, MemorizingConfig

YARN = dict(yarn_rotary_scaling_factor=4.0, yarn_original_max_position_embeddings=64)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_attention_heads=6, hidden_size=96, tensor_model_parallel_size=4),
         "not divisible by tensor_model_parallel_size=4"),
        (dict(num_layers=12, pipeline_model_parallel_size=5), "not divisible by pipeline_model_parallel_size=5"),
        (dict(num_layers=12, memory_layers=(13,)), r"contains \[13\], outside 1..12"),
        (dict(num_layers=12, memory_layers=(0,)), "1-based"),
        (dict(memory_size=16, knn_top_k=32), "cannot retrieve more pairs than the memory holds"),
        (dict(context_parallel_size=2), "context_parallel_size=1"),
        (dict(memory_dtype="float16"), "use one of"),
        (dict(memory_backend="annoy"), "use 'torch' or 'faiss'"),
        (dict(position_embedding_type="alibi"), "T5 relative bias is not supported yet"),
        (dict(xl_cache=True, position_embedding_type="learned_absolute"), "needs relative positions"),
        (dict(recompute="partial"), "use 'none', 'selective' or 'full'"),
        (dict(memory_mixing="sum"), "use 'gate' or 'softmax'"),
        (dict(memory_sink_tokens=512, segment_length=512), "memory_sink_tokens=512 must lie in 0..segment_length-1"),
        (dict(memory_sink_tokens=-1), "memory_sink_tokens=-1 must lie in"),
        (dict(num_layers=8, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=3),
         "divisible by pp\\*vpp=6"),
        (dict(hidden_size=100, num_attention_heads=8), "set kv_channels explicitly"),
        (dict(num_query_groups=3), "num_query_groups=3 must divide"),
        (dict(rope_scaling=True, rotary_seq_len_interpolation_factor=2.0), "two ways of scaling RoPE"),
        (dict(rotary_seq_len_interpolation_factor=0.0), "must be positive"),
        (dict(yarn_rotary_scaling_factor=4.0), "yarn_original_max_position_embeddings=None: YaRN needs"),
        (dict(**YARN, rope_scaling=True), "are ways of scaling RoPE: set one of them"),
        (dict(**YARN, rotary_seq_len_interpolation_factor=2.0), "are ways of scaling RoPE: set one of them"),
        (dict(yarn_beta_fast=16.0, yarn_mscale=1.0), "yarn_beta_fast, yarn_mscale set without yarn_rotary_scaling"),
        (dict(**YARN, position_embedding_type="learned_absolute"), "use 'rope' or leave YaRN out"),
        (dict(**YARN, yarn_attention_factor=0.0, yarn_beta_slow=-1.0),
         "yarn_beta_slow=-1, yarn_attention_factor=0: must be positive"),
        (dict(**YARN, transformer_overrides={"softmax_scale": 0.1}), "transformer_overrides sets softmax_scale"),
    ],
)
def test_bad_config_names_the_fix(fields, message):
    with pytest.raises(ConfigError, match=message):
        MemorizingConfig(**fields)


def test_unknown_field_in_a_config_file_is_refused():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['memory_sise'\] in model"):
        MemorizingConfig.from_dict({"memory_sise": 8192})


def test_round_trip_and_defaults_follow_the_paper():
    config = MemorizingConfig()
    assert config.memory_layers == (9,) and config.knn_top_k == 32
    assert MemorizingConfig.from_dict(config.to_dict()) == config
    vanilla = MemorizingConfig(memory_layers=())
    assert vanilla.memory_layers == () and not vanilla.transformer_config().hetereogenous_dist_checkpoint


def test_memory_slots_cover_every_micro_batch():
    assert MemorizingConfig(micro_batch_size=2, num_micro_batches=3).memory_slots == 6


def test_yarn_scales_attention_by_its_factor_squared_and_round_trips():
    """YaRN's attention factor (transformers' default: 0.1 ln(factor) + 1; with mscale and
    mscale_all_dim, their ratio) goes into attention's softmax scale."""
    config = MemorizingConfig(hidden_size=256, num_attention_heads=4, **YARN)
    factor = 0.1 * math.log(4.0) + 1.0
    assert config.yarn_attention_scale == factor
    assert config.transformer_config().softmax_scale == pytest.approx(factor**2 / 8.0, rel=1e-15)
    assert MemorizingConfig.from_dict(config.to_dict()) == config
    mscaled = MemorizingConfig(**YARN, yarn_mscale=0.5, yarn_mscale_all_dim=1.0)
    assert mscaled.yarn_attention_scale == (0.05 * math.log(4.0) + 1.0) / factor
    assert MemorizingConfig(**YARN, yarn_mscale=0.5).yarn_attention_scale == factor  # as transformers: both or neither
    assert MemorizingConfig(**YARN, yarn_attention_factor=1.5).yarn_attention_scale == 1.5
    unscaled = MemorizingConfig()
    assert unscaled.yarn is None and unscaled.transformer_config().softmax_scale is None


def test_a_config_saved_before_yarn_loads_without_it():
    saved = {name: value for name, value in MemorizingConfig().to_dict().items() if not name.startswith("yarn_")}
    assert MemorizingConfig.from_dict(saved) == MemorizingConfig()
