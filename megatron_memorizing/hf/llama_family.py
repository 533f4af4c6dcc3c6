"""The Llama family's Hugging Face configs (Llama, Qwen2, Mistral) as model fields, and back.

These decoders differ from each other in a few switches only, all of which a MemorizingConfig
expresses: RMSNorm, SwiGLU, RoPE with its base, grouped-query attention, tied or untied
embeddings, biases on the query/key/value projection (Qwen2), a sliding window (Mistral), RoPE
scaled as Llama 3.1 does, linearly or by YaRN. What it cannot express is refused with a reason,
never approximated.
"""

from __future__ import annotations

from megatron_memorizing.config import MemorizingConfig

# model_type -> the causal-LM class a Hugging Face directory of that type holds
FAMILY = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
# Model fields read from config.json: an import may not override them (the weights fix them).
ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "kv_channels", "num_query_groups", "ffn_hidden_size",
    "vocab_size", "position_embedding_type", "rotary_base", "rotary_percent", "normalization", "layernorm_epsilon",
    "activation", "gated_linear_unit", "add_bias_linear", "add_qkv_bias", "sliding_window",
    "share_embeddings_and_output_weights",
)


class UnsupportedModel(ValueError):
    """A Hugging Face model this project cannot represent exactly; the message says what and why."""


def model_fields(hf) -> dict:
    """MemorizingConfig fields of the architecture a Hugging Face Llama-family config describes."""
    model_type = getattr(hf, "model_type", None)
    if model_type not in FAMILY:
        architectures = ", ".join(getattr(hf, "architectures", None) or []) or "no architectures listed"
        raise UnsupportedModel(
            f"model_type {model_type!r} ({architectures}) is not in the Llama family this importer reads: "
            f"{', '.join(FAMILY.values())}."
        )
    if hf.hidden_act != "silu":
        raise UnsupportedModel(f"hidden_act={hf.hidden_act!r}: the Llama family's MLP is SwiGLU (silu).")
    theta, scaling = _rope(hf)
    if float(theta) != int(theta):
        raise UnsupportedModel(f"rope_theta={theta} is not a whole number, which Megatron's rotary_base needs.")
    heads = hf.num_attention_heads
    return dict(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=heads,
        kv_channels=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        num_query_groups=getattr(hf, "num_key_value_heads", None) or heads,
        ffn_hidden_size=hf.intermediate_size,
        vocab_size=hf.vocab_size,
        position_embedding_type="rope",
        rotary_base=int(theta),
        rotary_percent=1.0,
        **_rope_scaling_fields(scaling, max_positions(hf)),
        normalization="RMSNorm",
        layernorm_epsilon=float(hf.rms_norm_eps),
        activation="silu",
        gated_linear_unit=True,
        **_biases(hf),
        sliding_window=_sliding_window(hf),
        share_embeddings_and_output_weights=bool(hf.tie_word_embeddings),
        init_method_std=float(hf.initializer_range),
    )


def max_positions(hf) -> int:
    return int(hf.max_position_embeddings)


def _rope(hf) -> tuple[float, dict]:
    """(theta, scaling) from transformers 5's rope_parameters, or the older rope_theta/rope_scaling;
    scaling holds rope_type ("default" when unscaled) and its parameters."""
    parameters = getattr(hf, "rope_parameters", None) or {}
    scaling = {**(getattr(hf, "rope_scaling", None) or {}), **parameters}
    theta = scaling.pop("rope_theta", getattr(hf, "rope_theta", 10000.0))
    scaling["rope_type"] = scaling.get("rope_type") or scaling.pop("type", None) or "default"
    return theta, scaling


# Llama 3.1/3.2's scaling as Megatron-Core implements it: only the factor varies.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# YaRN's parameters where transformers leaves them out: (the model field, its value), as
# transformers reads a missing or null beta (its default) and a missing truncate (true).
YARN_DEFAULTS = {"beta_fast": ("yarn_beta_fast", 32.0), "beta_slow": ("yarn_beta_slow", 1.0),
                 "truncate": ("yarn_correction_range_round_to_int", True)}
YARN_OPTIONAL = {"mscale": "yarn_mscale", "mscale_all_dim": "yarn_mscale_all_dim",
                 "attention_factor": "yarn_attention_factor"}


def _rope_scaling_fields(scaling: dict, max_position_embeddings: int) -> dict:
    """Model fields of a Hugging Face rope scaling; what Megatron-Core cannot compute is refused."""
    kind = scaling["rope_type"]
    if kind == "default":
        return {}
    if kind == "linear":
        return dict(rotary_seq_len_interpolation_factor=float(scaling["factor"]))
    if kind == "llama3":
        other = {k: scaling.get(k) for k, v in LLAMA3_FIXED.items() if float(scaling.get(k, v)) != v}
        if other:
            raise UnsupportedModel(
                f"rope scaling 'llama3' with {other}: Megatron-Core computes Llama 3.1/3.2's scaling "
                f"({', '.join(f'{k}={v:g}' for k, v in LLAMA3_FIXED.items())}) with any factor, not other values."
            )
        return dict(rope_scaling=True, rope_scaling_factor=float(scaling["factor"]))
    if kind == "yarn":
        return _yarn_fields(scaling, max_position_embeddings)
    raise UnsupportedModel(
        f"rope scaling of type {kind!r} is not supported: RoPE unscaled, 'llama3' (Llama 3.1/3.2), 'linear' and "
        f"'yarn' are imported, so that positions mean what they meant in pretraining."
    )


def _yarn_fields(scaling: dict, max_position_embeddings: int) -> dict:
    """The yarn_* model fields of a Hugging Face "yarn" scaling, read as transformers reads it: an
    absent original context is max_position_embeddings, an absent factor the ratio of the two."""
    partial = scaling.get("partial_rotary_factor", 1.0)
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedModel(
            f"rope scaling 'yarn' with partial_rotary_factor={partial}: the Llama family rotates every channel "
            f"of a head, and YaRN's frequencies would cover only part of them (transformers cannot run it either)."
        )
    original = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
    factor = scaling.get("factor")
    fields = dict(
        yarn_rotary_scaling_factor=float(factor if factor is not None else max_position_embeddings / original),
        yarn_original_max_position_embeddings=original,
        yarn_beta_fast=float(scaling.get("beta_fast") or YARN_DEFAULTS["beta_fast"][1]),
        yarn_beta_slow=float(scaling.get("beta_slow") or YARN_DEFAULTS["beta_slow"][1]),
        yarn_correction_range_round_to_int=bool(scaling.get("truncate", True)),
    )
    for name, field in YARN_OPTIONAL.items():
        if scaling.get(name) is not None:
            fields[field] = float(scaling[name])
    return fields


def rope_scaling(config: MemorizingConfig) -> dict:
    """The exported model's rope scaling (rope_scaling_type, rope_scaling_factor and, for "yarn",
    the rope_yarn_* fields of MemorizingGPTConfig); empty when unscaled."""
    if config.rope_scaling:
        return dict(rope_scaling_type="llama3", rope_scaling_factor=config.rope_scaling_factor)
    if config.rotary_seq_len_interpolation_factor is not None:
        return dict(rope_scaling_type="linear", rope_scaling_factor=config.rotary_seq_len_interpolation_factor)
    if config.yarn_rotary_scaling_factor is not None:
        return dict(
            rope_scaling_type="yarn",
            rope_scaling_factor=config.yarn_rotary_scaling_factor,
            rope_yarn_original_max_position_embeddings=config.yarn_original_max_position_embeddings,
            rope_yarn_beta_fast=config.yarn_beta_fast,
            rope_yarn_beta_slow=config.yarn_beta_slow,
            rope_yarn_truncate=config.yarn_correction_range_round_to_int,
            rope_yarn_attention_factor=config.yarn_attention_scale,
        )
    return {}


def _rope_parameters(config: MemorizingConfig) -> dict:
    """transformers' rope_parameters of `config`."""
    parameters = {"rope_type": "default", "rope_theta": float(config.rotary_base)}
    if config.rope_scaling:
        parameters.update(rope_type="llama3", factor=config.rope_scaling_factor, **LLAMA3_FIXED)
    elif config.rotary_seq_len_interpolation_factor is not None:
        parameters.update(rope_type="linear", factor=config.rotary_seq_len_interpolation_factor)
    elif config.yarn_rotary_scaling_factor is not None:
        parameters.update(rope_type="yarn", factor=config.yarn_rotary_scaling_factor,
                          original_max_position_embeddings=config.yarn_original_max_position_embeddings)
        # what transformers would take for a missing parameter is left out, as a config usually has it
        parameters.update({name: getattr(config, field) for name, (field, default) in YARN_DEFAULTS.items()
                           if getattr(config, field) != default})
        parameters.update({name: getattr(config, field) for name, field in YARN_OPTIONAL.items()
                           if getattr(config, field) is not None})
    return parameters


def _biases(hf) -> dict:
    """Megatron biases either every linear layer or only the query/key/value projection."""
    if hf.model_type == "qwen2":  # q, k and v projections have biases, nothing else
        return dict(add_bias_linear=False, add_qkv_bias=True)
    attention, mlp = bool(getattr(hf, "attention_bias", False)), bool(getattr(hf, "mlp_bias", False))
    if attention != mlp:
        raise UnsupportedModel(
            f"attention_bias={attention} with mlp_bias={mlp}: Megatron adds biases to every linear layer or to "
            f"none (or to query/key/value only, as Qwen2); this mix cannot be represented."
        )
    return dict(add_bias_linear=attention, add_qkv_bias=False)


def _sliding_window(hf):
    if hf.model_type == "qwen2":
        if getattr(hf, "use_sliding_window", False):
            raise UnsupportedModel(
                "use_sliding_window=true: Qwen2's window applies to some layers only (max_window_layers), "
                "which this model does not implement. Import a checkpoint with use_sliding_window=false."
            )
        return None
    return getattr(hf, "sliding_window", None)


# --------------------------------------------------------------------------------------------------
# Back: a model without memory as the standard class it is


def standard_class(config: MemorizingConfig, imported_as: str | None = None) -> str | None:
    """The Llama-family class that computes exactly what `config` computes, or None (then only
    the remote-code export represents it): memory layers and the XL cache are this project's.
    `imported_as`, the model_type a model was imported from, is kept when it fits: a Mistral
    without a sliding window (v0.2 and later) goes back as Mistral, not as the Llama it equals."""
    plain = (
        not config.memory_layers
        and not config.xl_cache
        and config.position_embedding_type == "rope"
        and config.rotary_percent == 1.0
        and config.normalization == "RMSNorm"
        and config.activation == "silu"
        and config.gated_linear_unit
        and not config.transformer_overrides
    )
    if not plain:
        return None
    qkv_bias_only = config.add_qkv_bias and not config.add_bias_linear
    fits = {
        "llama": not qkv_bias_only and not config.sliding_window,
        "qwen2": qkv_bias_only and not config.sliding_window,
        "mistral": not config.add_bias_linear and not config.add_qkv_bias,
    }
    if fits.get(imported_as):
        return FAMILY[imported_as]
    preferred = "mistral" if config.sliding_window else "qwen2" if qkv_bias_only else "llama"
    return FAMILY[preferred] if fits[preferred] else None


def standard_config(config: MemorizingConfig, class_name: str, extra: dict):
    """The transformers config of `class_name` for `config`; `extra` holds what the model config
    does not know: bos/eos/pad token ids, max_position_embeddings."""
    import transformers

    kind = {name: model_type for model_type, name in FAMILY.items()}[class_name]
    fields = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size or 4 * config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups or config.num_attention_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        rms_norm_eps=config.layernorm_epsilon,
        rope_parameters=_rope_parameters(config),
        tie_word_embeddings=config.share_embeddings_and_output_weights,
        initializer_range=config.init_method_std,
        architectures=[class_name],
        **extra,
    )
    if kind == "llama":
        fields.update(attention_bias=config.add_bias_linear, mlp_bias=config.add_bias_linear)
    if kind == "mistral":
        fields.update(sliding_window=config.sliding_window)
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "mistral": transformers.MistralConfig}[kind]
    return config_class(**fields)
