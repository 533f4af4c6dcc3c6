"""One validated dataclass describes a memorizing GPT, composed of three parts: the transformer
architecture (what a stock Megatron GPT would be), the memory settings (what the plugin adds) and
the execution layout (parallelism, slots, precision: how it is run).

Everything Megatron-Core needs is derived from it (`transformer_config()`), so a model, its
checkpoint and its export can never disagree about, say, which layer has memory.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # Megatron is imported where a model is built: a config is checked without it
    from megatron.core.transformer.transformer_config import TransformerConfig


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field and the fix."""


def checked_fields(cls, values: dict, where: str) -> dict:
    """`values` for dataclass `cls`, refusing unknown names and values of the wrong type (naming the
    field), and reading "3e-4"-style strings as floats.

    (YAML 1.1, which PyYAML reads, takes 3e-4 for a string; a float field should still accept it.)
    """
    values = without_removed_fields(values, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown} in {where}; valid fields are {sorted(fields)}.")
    hints = typing.get_type_hints(cls)
    return {name: _checked_value(f"{where}.{name}", value, hints[name]) for name, value in values.items()}


# Fields that were removed but that config files, every checkpoint's config.yaml among them, may
# still hold: "section.field" -> (the value that means what the code does now, which is dropped
# without a word; the refusal of any other value, which would ask for what no longer exists).
_XL_CAMPAIGN = "docs/campaigns/2026-12-01-stdlib-xl-cache-and-memory.md"
REMOVED_FIELDS = {
    "model.xl_cache_contents": (
        "inputs",
        f"the XL cache of projected keys and values was removed (it trained worse than the cache of layer "
        f"inputs, {_XL_CAMPAIGN}); model.xl_cache=true now always caches the inputs. A checkpoint saved with it "
        f"cannot be resumed, but its weights fit the inputs cache: start a run from them with "
        f"checkpoint.init_from=<that checkpoint> and a fresh checkpoint.dir, in a config without this line "
        f"(to evaluate or export that checkpoint, delete the line from its config.yaml).",
    ),
    "training.xl_cache_dropout": (
        0.0,
        f"XL cache dropout was removed (it did not help, {_XL_CAMPAIGN}): delete this line from the config "
        f"(and from the config.yaml of a checkpoint saved with it, to resume or evaluate that checkpoint).",
    ),
}


def without_removed_fields(values: dict, where: str) -> dict:
    """`values` of config section `where` without the REMOVED_FIELDS it may hold; a ConfigError
    naming the field and the fix if one of them asks for what was removed."""
    kept = dict(values)
    for name, value in values.items():
        if f"{where}.{name}" in REMOVED_FIELDS:
            harmless, refusal = REMOVED_FIELDS[f"{where}.{name}"]
            if value != harmless:
                raise ConfigError(f"{where}.{name}={value!r}: {refusal}")
            del kept[name]
    return kept


_TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
               list: "a list, e.g. [1, 2]", tuple: "a list, e.g. [1, 2]", dict: "a mapping"}


def _checked_value(name: str, value, hint):
    """`value` as field `name` of type `hint` takes it, or a ConfigError naming the field."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        optional = len(options) < len(typing.get_args(hint))
        if value is None and optional:
            return None
        hint = options[0] if len(options) == 1 else object
    kind = typing.get_origin(hint) or hint
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a number.") from None
    accepted = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, (list, tuple)),
        tuple: lambda v: isinstance(v, (list, tuple)),
        dict: lambda v: isinstance(v, dict),
    }.get(kind)
    if accepted is not None and not accepted(value):
        raise ConfigError(
            f"{name}={value!r} ({type(value).__name__}): expected {_TYPE_NAMES[kind]}{' or null' if optional else ''}."
        )
    return float(value) if kind is float else value


_MEMORY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}
_POSITION_EMBEDDINGS = ("rope", "learned_absolute", "none")


@dataclass
class TransformerArchitecture:
    """The network a stock Megatron-Core GPT would be: what the weights are and what they compute."""

    num_layers: int = 12
    hidden_size: int = 1024
    num_attention_heads: int = 8
    kv_channels: Optional[int] = None  # head dim; None -> hidden_size // num_attention_heads
    num_query_groups: Optional[int] = None  # GQA; None -> one group per head
    ffn_hidden_size: Optional[int] = None  # None -> 4 * hidden_size
    vocab_size: int = 32000
    segment_length: int = 512  # tokens per training segment (Megatron's seq_length)
    position_embedding_type: str = "rope"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    # RoPE stretched beyond the pretraining context, as Megatron-LM's flags of the same names:
    # rope_scaling/rope_scaling_factor give Llama 3.1/3.2's frequencies ("llama3" in Hugging Face;
    # low/high frequency factors 1 and 4 over an original context of 8,192), and
    # rotary_seq_len_interpolation_factor divides positions by itself ("linear").
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    rotary_seq_len_interpolation_factor: Optional[float] = None
    # YaRN ("yarn" in Hugging Face; Peng et al. 2023), on when yarn_rotary_scaling_factor is set. The
    # fields (Megatron-LM's names) mean what transformers' rope parameters of the same meaning do:
    # factor, original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim,
    # attention_factor, truncate. Frequencies turning fewer than beta_slow times over the original
    # context are slowed down by the factor, those turning more than beta_fast times are kept, and
    # those in between blended; queries and keys are scaled by the attention factor (given, or derived
    # from the factor, and from mscale/mscale_all_dim when both are set), i.e. the attention logits by
    # its square, which the model folds into attention's softmax scale.
    yarn_rotary_scaling_factor: Optional[float] = None
    yarn_original_max_position_embeddings: Optional[int] = None
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: Optional[float] = None
    yarn_mscale_all_dim: Optional[float] = None
    yarn_attention_factor: Optional[float] = None
    yarn_correction_range_round_to_int: bool = True  # transformers' `truncate`
    normalization: str = "LayerNorm"  # or "RMSNorm"
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"  # "gelu", "silu" or "relu"
    gated_linear_unit: bool = False  # MLP is activation(x W_gate) * (x W_up), e.g. SwiGLU with silu
    add_bias_linear: bool = True  # biases in every linear layer (Llama-family models have none)
    add_qkv_bias: bool = False  # biases in the query/key/value projection only (Qwen2)
    # Local attention may span at most this many tokens (Mistral); a model whose segment (plus XL
    # cache) is no longer never reaches the limit, and a longer one is refused. None: no limit.
    sliding_window: Optional[int] = None
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    share_embeddings_and_output_weights: bool = True

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def rotary(self) -> dict:
        """The rotary settings, as Megatron's GPTModel and RotaryEmbedding take them."""
        return dict(
            rotary_base=self.rotary_base,
            rotary_percent=self.rotary_percent,
            rope_scaling=self.rope_scaling,
            rope_scaling_factor=self.rope_scaling_factor,
            seq_len_interpolation_factor=self.rotary_seq_len_interpolation_factor,
        )

    @property
    def yarn(self) -> Optional[dict]:
        """YaRN's frequency settings, as `positions.yarn_inverse_frequencies` takes them; None without YaRN."""
        if self.yarn_rotary_scaling_factor is None:
            return None
        return dict(
            dim=int(self.head_dim * self.rotary_percent) if self.rotary_percent < 1.0 else self.head_dim,
            base=float(self.rotary_base),
            factor=self.yarn_rotary_scaling_factor,
            original_max_position_embeddings=self.yarn_original_max_position_embeddings,
            beta_fast=self.yarn_beta_fast,
            beta_slow=self.yarn_beta_slow,
            round_to_int=self.yarn_correction_range_round_to_int,
        )

    @property
    def yarn_attention_scale(self) -> float:
        """What YaRN multiplies rotated queries and keys by (1 without YaRN), as transformers derives it:
        the given attention factor; else, with m(w) = 0.1 w ln(factor) + 1 (1 for a factor up to 1),
        m(mscale) / m(mscale_all_dim) when both are set (non-zero), and m(1) otherwise."""
        factor = self.yarn_rotary_scaling_factor
        if factor is None:
            return 1.0
        if self.yarn_attention_factor is not None:
            return self.yarn_attention_factor

        def magnitude(weight):
            return 1.0 if factor <= 1 else 0.1 * weight * math.log(factor) + 1.0

        if self.yarn_mscale and self.yarn_mscale_all_dim:
            return float(magnitude(self.yarn_mscale) / magnitude(self.yarn_mscale_all_dim))
        return magnitude(1)

    @property
    def attention_softmax_scale(self) -> Optional[float]:
        """The scale of attention logits where it is not Megatron's default 1/sqrt(head_dim) (None):
        with YaRN, the square of its attention factor over sqrt(head_dim). (Hugging Face scales the
        rotated queries and keys by the factor; their dot product carries it squared.)"""
        if self.yarn_rotary_scaling_factor is None:
            return None
        return self.yarn_attention_scale**2 / math.sqrt(self.head_dim)

    def validate_architecture(self) -> None:
        if self.hidden_size % self.num_attention_heads and self.kv_channels is None:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}: change one of them or set kv_channels explicitly."
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ConfigError(f"num_query_groups={groups} must divide num_attention_heads={self.num_attention_heads}.")
        if self.position_embedding_type not in _POSITION_EMBEDDINGS:
            raise ConfigError(
                f"position_embedding_type={self.position_embedding_type!r}: use one of "
                f"{list(_POSITION_EMBEDDINGS)}. (The paper's T5 relative bias is not supported yet.)"
            )
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r}: use one of {sorted(_ACTIVATIONS)}.")
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ConfigError(f"normalization={self.normalization!r}: use 'LayerNorm' or 'RMSNorm'.")
        if self.segment_length < 1:
            raise ConfigError(f"segment_length={self.segment_length} must be positive.")
        interpolation = self.rotary_seq_len_interpolation_factor
        if self.rope_scaling_factor <= 0 or (interpolation is not None and interpolation <= 0):
            raise ConfigError("rope_scaling_factor and rotary_seq_len_interpolation_factor must be positive.")
        if self.rope_scaling and self.rotary_seq_len_interpolation_factor is not None:
            raise ConfigError(
                "rope_scaling and rotary_seq_len_interpolation_factor are two ways of scaling RoPE: set one of them."
            )
        self.validate_yarn()

    def validate_yarn(self) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(TransformerArchitecture)
                    if f.name.startswith("yarn_")}
        if self.yarn_rotary_scaling_factor is None:
            changed = sorted(name for name, default in defaults.items() if getattr(self, name) != default)
            if changed:
                raise ConfigError(
                    f"{', '.join(changed)} set without yarn_rotary_scaling_factor: YaRN is on when its factor is "
                    f"set; set it, or leave these out."
                )
            return
        if self.rope_scaling or self.rotary_seq_len_interpolation_factor is not None:
            raise ConfigError(
                "yarn_rotary_scaling_factor, rope_scaling and rotary_seq_len_interpolation_factor are ways of "
                "scaling RoPE: set one of them."
            )
        if self.position_embedding_type != "rope":
            raise ConfigError(
                f"yarn_rotary_scaling_factor scales RoPE, but position_embedding_type="
                f"{self.position_embedding_type!r}: use 'rope' or leave YaRN out."
            )
        original = self.yarn_original_max_position_embeddings
        if original is None or original < 1:
            raise ConfigError(
                f"yarn_original_max_position_embeddings={original}: YaRN needs the context the model was "
                f"pretrained for (a positive number of positions)."
            )
        positive = {name: getattr(self, name) for name in
                    ("yarn_rotary_scaling_factor", "yarn_beta_fast", "yarn_beta_slow", "yarn_attention_factor")}
        bad = {name: value for name, value in positive.items() if value is not None and value <= 0}
        if bad:
            raise ConfigError(f"{', '.join(f'{k}={v:g}' for k, v in bad.items())}: must be positive.")


@dataclass
class MemorySettings:
    """What the plugin adds to the network: which layers read a kNN memory, how large it is, how it
    is searched and mixed in; and the Transformer-XL cache of the previous segment."""

    # 1-based global layer numbers with kNN memory; None -> the layer at 3/4 depth (the paper's 9 of 12);
    # an empty tuple builds a vanilla model (the same checkpoint layout without memory parameters).
    memory_layers: Optional[tuple[int, ...]] = None
    memory_size: int = 8192  # M: (key, value) pairs kept per slot and head, FIFO
    knn_top_k: int = 32
    memory_dtype: str = "float32"  # "bfloat16" halves memory; search then re-ranks in fp32
    memory_search_chunk: int = 8192  # memory entries scored at once: bounds the score matrix
    memory_backend: str = "torch"  # "torch" or "faiss" (exact brute force either way)
    gate_init: float = 0.0  # b_g; g = sigmoid(b_g) weighs memory against local attention
    # How memory and local attention mix: "gate", the paper's g = sigmoid(b_g), one per head; or
    # "softmax", the retrieved pairs join local attention's softmax (as in the Focused Transformer):
    # g = sigmoid(b_g + logsumexp of the memory logits - logsumexp of the local ones), per query,
    # so a query whose retrieval matches nothing well keeps its local attention.
    memory_mixing: str = "gate"
    # The first N tokens of every segment are kept out of what the memory returns: a pretrained
    # model reading segments that each start at position 0 makes those tokens attention sinks, keys
    # that match every query, and the memory's best matches would be the sinks of its segments
    # (eval.memory_lookups shows it). The search asks for k plus the sinks the memory can hold, drops
    # the sinks and keeps the best k.
    memory_sink_tokens: int = 0
    # Transformer-XL: every layer also attends to the previous segment, whose inputs (the layer's
    # input hidden states) it keeps and projects afresh every step with the current weights.
    xl_cache: bool = False

    @property
    def torch_memory_dtype(self) -> torch.dtype:
        return _MEMORY_DTYPES[self.memory_dtype]

    def has_memory(self, layer_number: int) -> bool:
        return layer_number in self.memory_layers

    def validate_memory(self) -> None:
        if self.memory_layers:
            if self.memory_size < 1:
                raise ConfigError(f"memory_size={self.memory_size} must be positive (the paper uses 1536 to 262144).")
            if not 1 <= self.knn_top_k <= self.memory_size:
                raise ConfigError(
                    f"knn_top_k={self.knn_top_k} must be between 1 and memory_size={self.memory_size}: "
                    f"a query cannot retrieve more pairs than the memory holds."
                )
        if self.memory_dtype not in _MEMORY_DTYPES:
            raise ConfigError(f"memory_dtype={self.memory_dtype!r}: use one of {sorted(_MEMORY_DTYPES)}.")
        if self.memory_backend not in ("torch", "faiss"):
            raise ConfigError(f"memory_backend={self.memory_backend!r}: use 'torch' or 'faiss'.")
        if self.memory_search_chunk < 1:
            raise ConfigError(f"memory_search_chunk={self.memory_search_chunk} must be positive.")
        if not 0 <= self.memory_sink_tokens < self.segment_length:
            raise ConfigError(f"memory_sink_tokens={self.memory_sink_tokens} must lie in 0..segment_length-1 "
                              f"(segment_length={self.segment_length}).")
        if self.memory_mixing not in ("gate", "softmax"):
            raise ConfigError(f"memory_mixing={self.memory_mixing!r}: use 'gate' or 'softmax'.")


# The layout of a whole model in one process, as evaluation, export and import build it (the
# weights are resharded on load).
ONE_PROCESS = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
               "virtual_pipeline_model_parallel_size": None, "sequence_parallel": False}


@dataclass
class ExecutionLayout:
    """How a step is spread over ranks and memory slots, and computed: parallelism, batch layout,
    precision, recompute. None of it changes what the model is."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    micro_batch_size: int = 1  # sequences (= memory slots) per micro-batch, per data-parallel rank
    num_micro_batches: int = 1  # micro-batches per step; each has its own memory slots
    bf16: bool = False
    # "none", "selective" (core attention only) or "full" (whole layers, uniform)
    recompute: str = "none"
    # How local attention is computed: "stock", the base layer spec's core attention (Megatron's
    # DotProductAttention, or Transformer Engine's when installed); or "sdpa", PyTorch's fused
    # scaled_dot_product_attention, in memory linear in the segment (sdpa_attention.py).
    core_attention: str = "stock"

    @property
    def memory_slots(self) -> int:
        """Slots each rank's memory holds: one per sequence of every micro-batch of a step."""
        return self.micro_batch_size * self.num_micro_batches

    def validate_layout(self) -> None:
        if self.context_parallel_size != 1:
            raise ConfigError(
                f"context_parallel_size={self.context_parallel_size} is not supported: kNN attention "
                f"searches a memory of whole past segments, which context parallelism would split "
                f"across ranks. Set context_parallel_size=1 and use tensor/pipeline/data parallelism."
            )
        if self.recompute not in ("none", "selective", "full"):
            raise ConfigError(f"recompute={self.recompute!r}: use 'none', 'selective' or 'full'.")
        if self.core_attention not in ("stock", "sdpa"):
            raise ConfigError(f"core_attention={self.core_attention!r}: use 'stock' or 'sdpa'.")
        if self.micro_batch_size < 1 or self.num_micro_batches < 1:
            raise ConfigError("micro_batch_size and num_micro_batches must be at least 1.")


@dataclass
class MemorizingConfig(ExecutionLayout, MemorySettings, TransformerArchitecture):
    """A memorizing GPT: its architecture, its memory and how it is run, one flat set of fields
    (the run config's `model:` section), checked together."""

    # Extra TransformerConfig fields, passed through untouched (e.g. {"masked_softmax_fusion": True}).
    transformer_overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.memory_layers is None:
            self.memory_layers = (max(1, round(0.75 * self.num_layers)),)
        self.memory_layers = tuple(sorted(set(int(n) for n in self.memory_layers)))
        self.validate()

    def holding_weights_only(self) -> MemorizingConfig:
        """This model whole in one process, as small as it gets around its weights: one micro-batch
        of one sequence, no recompute, the smallest memory (its contents are not weights). What
        export and import build."""
        return dataclasses.replace(self, **ONE_PROCESS, micro_batch_size=1, num_micro_batches=1, recompute="none",
                                   memory_size=self.knn_top_k)

    @property
    def local_attention_span(self) -> int:
        """Tokens a query may attend to locally: its segment, and the previous one with the XL cache."""
        return self.segment_length * (2 if self.xl_cache else 1)

    def validate(self) -> None:
        """Each part's own checks, then those that tie them together."""
        self.validate_architecture()
        self.validate_memory()
        self.validate_layout()

        def fail(message: str):
            raise ConfigError(message)

        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if self.num_attention_heads % tp:
            fail(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"tensor_model_parallel_size={tp}: each tensor-parallel rank must own whole heads "
                f"(and their memory). Use a TP size that divides the head count."
            )
        if self.vocab_size % tp:
            fail(
                f"vocab_size={self.vocab_size} is not divisible by tensor_model_parallel_size={tp}: each "
                f"tensor-parallel rank holds an equal slice of the embeddings. Pad the vocabulary to a multiple "
                f"of {tp}."
            )
        groups = self.num_query_groups or self.num_attention_heads
        if groups % tp:
            fail(
                f"num_query_groups={groups} must divide num_attention_heads="
                f"{self.num_attention_heads} and be divisible by tensor_model_parallel_size={tp}."
            )
        if self.num_layers % pp:
            fail(
                f"num_layers={self.num_layers} is not divisible by pipeline_model_parallel_size="
                f"{pp}: every stage must build the same number of layers."
            )
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (pp < 2 or self.num_layers % (pp * vpp)):
            fail(
                f"virtual_pipeline_model_parallel_size={vpp} needs pipeline_model_parallel_size >= 2 "
                f"and num_layers divisible by pp*vpp={pp * vpp} (num_layers={self.num_layers})."
            )
        bad = [n for n in self.memory_layers if not 1 <= n <= self.num_layers]
        if bad:
            fail(
                f"memory_layers={list(self.memory_layers)} contains {bad}, outside 1..{self.num_layers} "
                f"(layer numbers are 1-based); the paper puts memory at layer 9 of 12."
            )
        if self.xl_cache and self.position_embedding_type == "learned_absolute":
            fail(
                "xl_cache=True needs relative positions: the cached segment has no absolute position "
                "in the current one. Use position_embedding_type='rope' (or 'none')."
            )
        span = self.local_attention_span
        if self.sliding_window is not None and span > self.sliding_window:
            fail(
                f"sliding_window={self.sliding_window} is shorter than the {span} tokens local attention spans "
                f"(segment_length={self.segment_length}{', doubled by the XL cache' if self.xl_cache else ''}): "
                f"the window would cut attention inside a segment, which this model does not implement. "
                f"Use a segment_length of at most {self.sliding_window // (2 if self.xl_cache else 1)}."
            )
        first_class = sorted(set(self.transformer_overrides) & {f.name for f in dataclasses.fields(self)})
        if first_class:
            fail(f"transformer_overrides sets {first_class}, which are model fields: set them as model.<field>.")
        if self.attention_softmax_scale is not None and "softmax_scale" in self.transformer_overrides:
            fail(
                "transformer_overrides sets softmax_scale, which YaRN sets (its attention factor squared over "
                "sqrt(head_dim)): leave it out, or set model.yarn_attention_factor."
            )

    # ---------------------------------------------------------------------------------------------
    def transformer_config(self) -> "TransformerConfig":
        """The Megatron-Core TransformerConfig this model is built from."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        cpu = not torch.cuda.is_available()
        recompute = {
            "none": {},
            "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
            "full": {
                "recompute_granularity": "full",
                "recompute_method": "uniform",
                "recompute_num_layers": 1,
            },
        }[self.recompute]
        kwargs = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            kv_channels=self.head_dim,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            normalization=self.normalization,
            layernorm_epsilon=self.layernorm_epsilon,
            activation_func=_ACTIVATIONS[self.activation],
            gated_linear_unit=self.gated_linear_unit,
            add_bias_linear=self.add_bias_linear,
            add_qkv_bias=self.add_qkv_bias,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            init_method_std=self.init_method_std,
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
            context_parallel_size=self.context_parallel_size,
            sequence_parallel=self.sequence_parallel,
            bf16=self.bf16,
            params_dtype=torch.bfloat16 if self.bf16 else torch.float32,
            pipeline_dtype=torch.bfloat16 if self.bf16 else torch.float32,
            # The memory gate and scale exist in some layers only: dist_checkpointing must not
            # assume every layer has the same parameters.
            hetereogenous_dist_checkpoint=bool(self.memory_layers),
            # Fused kernels and CUDA-side initialisation need Apex/TE or a GPU.
            use_cpu_initialization=cpu,
            # With virtual stages over two ranks both neighbours are one rank, and batched p2p
            # matches sends to receives by order: tensors land in the wrong buffers, silently.
            batch_p2p_comm=self.virtual_pipeline_model_parallel_size is None,
            masked_softmax_fusion=False,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
            **recompute,
        )
        if self.attention_softmax_scale is not None:
            kwargs["softmax_scale"] = self.attention_softmax_scale
        kwargs.update(self.transformer_overrides)
        return TransformerConfig(**kwargs)

    # ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["memory_layers"] = list(self.memory_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MemorizingConfig":
        d = checked_fields(cls, d, "model")
        if d.get("memory_layers") is not None:
            d["memory_layers"] = tuple(d["memory_layers"])
        return cls(**d)
