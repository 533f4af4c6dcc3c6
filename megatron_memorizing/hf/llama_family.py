"""The Llama family's Hugging Face configs (Llama, Qwen2, Mistral) as model fields, and back.

These decoders differ from each other in a few switches only, all of which a MemorizingConfig
expresses: RMSNorm, SwiGLU, RoPE with its base, grouped-query attention, tied or untied
embeddings, biases on the query/key/value projection (Qwen2), a sliding window (Mistral). What
it cannot express is refused with a reason, never approximated.
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
    if scaling != "default":
        raise UnsupportedModel(
            f"rope scaling of type {scaling!r} is not supported: only unscaled RoPE (rope_type 'default') is "
            f"imported, so that positions mean what they meant in pretraining. Models with scaled RoPE "
            f"(e.g. Llama 3.1's 'llama3') cannot be imported yet."
        )
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


def _rope(hf) -> tuple[float, str]:
    """(theta, rope type) from transformers 5's rope_parameters, or the older rope_theta/rope_scaling."""
    parameters = getattr(hf, "rope_parameters", None) or {}
    scaling = getattr(hf, "rope_scaling", None) or {}
    theta = parameters.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    kind = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return theta, kind


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


def standard_class(config: MemorizingConfig) -> str | None:
    """The Llama-family class that computes exactly what `config` computes, or None (then only
    the remote-code export represents it): memory layers and the XL cache are this project's."""
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
    if config.add_qkv_bias and not config.add_bias_linear:
        return None if config.sliding_window else FAMILY["qwen2"]
    return FAMILY["mistral"] if config.sliding_window else FAMILY["llama"]


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
        rope_theta=float(config.rotary_base),
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
