"""Configuration of an exported memorizing GPT (Memorizing Transformers, Wu et al. 2022).

This file is copied next to the weights of every export, so it imports nothing but transformers.
"""

from transformers import PretrainedConfig

_NORMALIZATIONS = ("LayerNorm", "RMSNorm")
_POSITION_EMBEDDINGS = ("rope", "learned_absolute", "none")
_ACTIVATIONS = ("gelu", "silu", "relu")


class MemorizingGPTConfig(PretrainedConfig):
    """A decoder-only transformer whose `memory_layers` also attend to a kNN memory of the document's past.

    The document is read in segments of `segment_length` tokens. Positions restart at 0 in every
    segment; the memory (and, with `xl_cache`, the previous segment) carries what came before.
    """

    model_type = "memorizing_gpt"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int | None = None,
        hidden_act: str = "gelu",
        gated_linear_unit: bool = False,
        normalization: str = "LayerNorm",
        layernorm_epsilon: float = 1e-5,
        attention_bias: bool = True,
        linear_bias: bool = True,
        position_embedding_type: str = "rope",
        rotary_base: float = 10000.0,
        rotary_percent: float = 1.0,
        rope_scaling_type: str | None = None,
        rope_scaling_factor: float = 1.0,
        rope_yarn_original_max_position_embeddings: int | None = None,
        rope_yarn_beta_fast: float = 32.0,
        rope_yarn_beta_slow: float = 1.0,
        rope_yarn_truncate: bool = True,
        rope_yarn_attention_factor: float = 1.0,
        segment_length: int = 512,
        memory_layers: list[int] | None = None,
        memory_size: int = 8192,
        knn_top_k: int = 32,
        memory_backend: str = "torch",
        xl_cache: bool = False,
        gate_init: float = 0.0,
        memory_mixing: str = "gate",
        memory_sink_tokens: int = 0,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.hidden_act = hidden_act
        self.gated_linear_unit = gated_linear_unit
        self.normalization = normalization
        self.layernorm_epsilon = layernorm_epsilon
        self.attention_bias = attention_bias
        self.linear_bias = linear_bias
        self.position_embedding_type = position_embedding_type
        self.rotary_base = rotary_base
        self.rotary_percent = rotary_percent
        # RoPE stretched beyond the pretraining context: "llama3" (Llama 3.1/3.2's frequencies, an
        # original context of 8,192, low/high frequency factors 1 and 4), "linear" (positions / factor)
        # or "yarn" (YaRN, with the rope_yarn_* fields: frequencies turning fewer than beta_slow times
        # over the original context slowed down by the factor, those turning more than beta_fast times
        # kept, a ramp between them, its ends rounded outwards with truncate; attention logits
        # multiplied by attention_factor squared).
        self.rope_scaling_type = rope_scaling_type
        self.rope_scaling_factor = rope_scaling_factor
        self.rope_yarn_original_max_position_embeddings = rope_yarn_original_max_position_embeddings
        self.rope_yarn_beta_fast = rope_yarn_beta_fast
        self.rope_yarn_beta_slow = rope_yarn_beta_slow
        self.rope_yarn_truncate = rope_yarn_truncate
        self.rope_yarn_attention_factor = rope_yarn_attention_factor
        self.segment_length = segment_length
        # 1-based layer numbers, as in training configs (the paper's memory layer is 9 of 12).
        self.memory_layers = (
            list(memory_layers) if memory_layers is not None else [max(1, round(0.75 * num_hidden_layers))]
        )
        self.memory_size = memory_size
        self.knn_top_k = knn_top_k
        self.memory_backend = memory_backend
        self.xl_cache = xl_cache
        self.gate_init = gate_init
        self.memory_mixing = memory_mixing  # "gate" or "softmax": see the training config's model.memory_mixing
        # The first tokens of every segment (attention sinks) never come back from the memory:
        # see the training config's model.memory_sink_tokens.
        self.memory_sink_tokens = memory_sink_tokens
        self.initializer_range = initializer_range
        self._check()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _check(self):
        problems = []
        if self.normalization not in _NORMALIZATIONS:
            problems.append(f"normalization={self.normalization!r} (use one of {_NORMALIZATIONS})")
        if self.position_embedding_type not in _POSITION_EMBEDDINGS:
            problems.append(
                f"position_embedding_type={self.position_embedding_type!r} (use one of {_POSITION_EMBEDDINGS})"
            )
        if self.rope_scaling_type not in (None, "llama3", "linear", "yarn"):
            problems.append(f"rope_scaling_type={self.rope_scaling_type!r} (use 'llama3', 'linear', 'yarn' or null)")
        if self.rope_scaling_type == "yarn" and not (self.rope_yarn_original_max_position_embeddings or 0) >= 1:
            problems.append(
                f"rope_yarn_original_max_position_embeddings={self.rope_yarn_original_max_position_embeddings} "
                f"(YaRN needs the pretraining context, a positive number)"
            )
        if self.hidden_act not in _ACTIVATIONS:
            problems.append(f"hidden_act={self.hidden_act!r} (use one of {_ACTIVATIONS})")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if any(not 1 <= n <= self.num_hidden_layers for n in self.memory_layers):
            problems.append(f"memory_layers={self.memory_layers} must lie in 1..{self.num_hidden_layers}")
        if self.memory_layers and not 1 <= self.knn_top_k <= self.memory_size:
            problems.append(f"knn_top_k={self.knn_top_k} must lie in 1..memory_size={self.memory_size}")
        if not 0 <= self.memory_sink_tokens < self.segment_length:
            problems.append(f"memory_sink_tokens={self.memory_sink_tokens} must lie in "
                            f"0..segment_length-1={self.segment_length - 1}")
        if self.memory_mixing not in ("gate", "softmax"):
            problems.append(f"memory_mixing={self.memory_mixing!r} (use 'gate' or 'softmax')")
        if self.memory_backend not in ("torch", "faiss"):
            problems.append(f"memory_backend={self.memory_backend!r} (use 'torch' or 'faiss')")
        if self.xl_cache and self.position_embedding_type == "learned_absolute":
            problems.append("xl_cache needs relative positions (position_embedding_type 'rope' or 'none')")
        if problems:
            raise ValueError("invalid MemorizingGPTConfig: " + "; ".join(problems))
