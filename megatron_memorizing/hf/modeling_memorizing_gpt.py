"""Memorizing Transformer (Wu et al., ICLR 2022) for inference with transformers.

A decoder-only GPT whose memory layers attend twice: locally (causal attention over the current
segment, plus the previous segment with the XL cache), and to the top-k (key, value) pairs
retrieved from a kNN memory of the same document's earlier segments. A learned per-head gate
mixes the two: g = sigmoid(b_g), out = memory * g + local * (1 - g).

A document is read in segments of `config.segment_length` tokens, exactly as in training:
positions restart at 0 in every segment, and only when a segment is complete do its keys and
values enter the memory (and the XL cache). Tokens of the current segment are kept as an ordinary
KV cache until then, so `generate()` decodes token by token with the same semantics.

This file is copied next to the weights of every export: it imports only torch and transformers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_memorizing_gpt import MemorizingGPTConfig

# Where outputs carry the cache: `cache` from transformers 5.24 on, `past_key_values` before.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

_ACTIVATIONS = {
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}


# --------------------------------------------------------------------------------------------------
# What the model remembers about the documents it reads


class _LayerState:
    """One layer's view of a document: raw (un-rotated) keys/values of the current segment so far,
    the previous segment (XL cache) and, in memory layers, the kNN memory of normalised keys."""

    def __init__(self):
        self.segment = None  # (keys, values) [b, groups, t, head_dim]
        self.previous = None  # (keys, values) of the last complete segment
        self.memory = None  # (unit keys, values) float32 [b, groups, n, head_dim], oldest first


class MemorizingGPTMemory:
    """The documents being read, one per batch row: pass it as `cache` (transformers >= 5.24) or
    `past_key_values` (older releases; both names work everywhere) to continue them.

    `memory_size` (pairs per layer, head group and row) may exceed the size used in training.

    generate() treats it as a cache: it reads the attributes below (the same names as
    `transformers.Cache`, which this is not a subclass of, so that no release's bookkeeping of
    per-layer key/value tensors applies to it).
    """

    # Neither compiled nor rolled back: a segment that entered the memory cannot be taken out.
    is_compileable = False
    is_croppable = False

    def __init__(self, config: MemorizingGPTConfig, memory_size: int | None = None):
        self.segment_length = config.segment_length
        self.memory_size = memory_size or config.memory_size
        if config.memory_layers and self.memory_size < config.knn_top_k:
            raise ValueError(f"memory_size={self.memory_size} is smaller than knn_top_k={config.knn_top_k}")
        self.num_layers = config.num_hidden_layers
        self.memory_layers = set(config.memory_layers)
        self.keep_previous = config.xl_cache
        self.reset()

    def reset(self):
        """Forget everything: the next tokens start new documents."""
        self.layers = [_LayerState() for _ in range(self.num_layers)]
        self.tokens_read = 0
        self.batch_size = None

    @property
    def segment_offset(self) -> int:
        """Position of the next token in its segment."""
        return self.tokens_read % self.segment_length

    @property
    def memory_fill(self) -> int:
        return max((state.memory[0].shape[2] for state in self.layers if state.memory is not None), default=0)

    # --- what generate() reads from a cache ------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens read so far: generate() feeds only the tokens after these."""
        return self.tokens_read

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no limit: the memory keeps its newest pairs

    @property
    def is_initialized(self) -> bool:
        return self.batch_size is not None

    @property
    def is_linear(self) -> list[bool]:
        # Not a recurrent state: every token read counts in get_seq_length, so generate() slices the
        # prompt to its unread part, as for a key/value cache.
        return [False] * self.num_layers

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.num_layers

    def crop(self, max_length: int):
        raise NotImplementedError(
            "the kNN memory cannot be rolled back (assisted and prompt-lookup decoding need that): "
            "generate without an assistant model"
        )

    def activate_past_recording(self):
        self.crop(0)

    def bind(self, batch_size: int):
        if self.batch_size is None:
            self.batch_size = batch_size
        elif batch_size != self.batch_size:
            raise ValueError(
                f"this memory reads {self.batch_size} documents but the input has {batch_size} rows: "
                "call reset() (or use a new memory) to start other documents"
            )

    def end_segment(self):
        """The current segment is complete: it becomes the XL cache and enters the memory."""
        for number, state in enumerate(self.layers, start=1):
            keys, values = state.segment
            if self.keep_previous:
                state.previous = (keys, values)
            if number in self.memory_layers:
                pairs = (F.normalize(keys.float(), dim=-1), values.float())
                if state.memory is not None:
                    pairs = tuple(torch.cat([old, new], dim=2) for old, new in zip(state.memory, pairs))
                # FIFO: the oldest pairs leave once the memory is full.
                state.memory = tuple(t[:, :, -self.memory_size :] for t in pairs)
            state.segment = None

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Beam search: row i continues the document of row beam_idx[i]."""
        for state in self.layers:
            for name in ("segment", "previous", "memory"):
                pair = getattr(state, name)
                if pair is not None:
                    setattr(state, name, tuple(t.index_select(0, beam_idx.to(t.device)) for t in pair))
        if self.batch_size is not None:
            self.batch_size = len(beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        """Each document continued by `repeats` rows in a row (beams, several returned sequences)."""
        if self.batch_size is not None:
            self.reorder_cache(torch.arange(self.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor):
        self.reorder_cache(torch.as_tensor(indices))


# --------------------------------------------------------------------------------------------------
# Positions and retrieval


def _rotate(x: torch.Tensor, start: int, config: MemorizingGPTConfig) -> torch.Tensor:
    """RoPE for positions start, start+1, ... of x [b, heads, t, head_dim] (rotate-half layout,
    on the first rotary_percent of the channels)."""
    if config.position_embedding_type != "rope":
        return x
    dim = int(config.head_dim * config.rotary_percent)
    if config.rope_scaling_type == "yarn":
        inv_freq = _yarn_frequencies(dim, config).to(x.device)
    else:
        inv_freq = 1.0 / (config.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim))
        inv_freq = _scaled_frequencies(inv_freq, config)
    positions = torch.arange(x.shape[2], dtype=torch.float32, device=x.device) + start
    angles = torch.outer(positions, inv_freq).repeat(1, 2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    rotary, rest = x[..., :dim], x[..., dim:]
    first, second = rotary.chunk(2, dim=-1)
    rotated = rotary * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated, rest], dim=-1)


def _scaled_frequencies(inv_freq: torch.Tensor, config: MemorizingGPTConfig) -> torch.Tensor:
    """RoPE frequencies for a context stretched `rope_scaling_factor` times. "linear" slows every
    frequency down by the factor; "llama3" (Llama 3.1/3.2) only those whose wavelength exceeds the
    original 8,192-token context, keeps those shorter than a quarter of it, and blends in between."""
    factor = config.rope_scaling_factor
    if config.rope_scaling_type == "linear":
        return inv_freq / factor
    if config.rope_scaling_type != "llama3":
        return inv_freq
    context, low_freq_factor, high_freq_factor = 8192, 1.0, 4.0
    wavelength = 2 * math.pi / inv_freq
    smooth = (context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    kept_or_blended = torch.where(wavelength < context / high_freq_factor, inv_freq, blended)
    return torch.where(wavelength > context / low_freq_factor, inv_freq / factor, kept_or_blended)


def _yarn_frequencies(dim: int, config: MemorizingGPTConfig) -> torch.Tensor:
    """YaRN's frequencies: pair i turns L * base^(-2i/dim) / (2 pi) times over the original context
    of L positions; pairs turning more than beta_fast times keep their frequency, those turning
    fewer than beta_slow times are slowed down by the factor, and a ramp over the pair index (its
    ends rounded outwards with truncate, within 0 .. dim - 1) blends the two in between."""
    base, factor = float(config.rotary_base), config.rope_scaling_factor
    context = config.rope_yarn_original_max_position_embeddings

    def index_turning(times):
        return dim * math.log(context / (times * 2 * math.pi)) / (2 * math.log(base))

    start, end = index_turning(config.rope_yarn_beta_fast), index_turning(config.rope_yarn_beta_slow)
    if config.rope_yarn_truncate:
        start, end = math.floor(start), math.ceil(end)
    start, end = max(start, 0), min(end, dim - 1)
    if start == end:
        end += 0.001
    wavelength_scale = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    keep = 1 - torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - start) / (end - start), 0, 1)
    return 1.0 / (factor * wavelength_scale) * (1 - keep) + 1.0 / wavelength_scale * keep


def top_k_inner_product(queries, keys, k: int, backend: str = "torch", chunk_size: int = 8192):
    """Exact top-k of queries [b, g, q, d] against keys [b, g, n, d]: (scores, indices) [b, g, q, k].

    The torch search scores `chunk_size` keys at a time, so a memory far larger than in training
    never materialises a full [q, n] score matrix.
    """
    if backend == "faiss" and not queries.is_cuda:
        return _faiss_top_k(queries, keys, k)
    chunk_size = max(chunk_size, k)
    best = None
    for start in range(0, keys.shape[2], chunk_size):
        scores = queries @ keys[:, :, start : start + chunk_size].transpose(-1, -2)
        scores, indices = scores.topk(min(k, scores.shape[-1]), dim=-1)
        indices = indices + start
        if best is not None:
            scores, indices = torch.cat([best[0], scores], -1), torch.cat([best[1], indices], -1)
            scores, pick = scores.topk(k, dim=-1)
            indices = indices.gather(-1, pick)
        best = scores, indices
    return best


def _faiss_top_k(queries, keys, k):
    try:
        import faiss
    except ImportError as error:
        raise ImportError("memory_backend='faiss' needs faiss: `pip install faiss-cpu`, or use 'torch'") from error
    b, g, q, _ = queries.shape
    scores = torch.empty(b, g, q, k)
    indices = torch.empty(b, g, q, k, dtype=torch.int64)
    for i in range(b):
        for j in range(g):
            found_scores, found = faiss.knn(
                queries[i, j].contiguous().numpy(), keys[i, j].contiguous().numpy(), k,
                metric=faiss.METRIC_INNER_PRODUCT
            )
            scores[i, j], indices[i, j] = torch.from_numpy(found_scores), torch.from_numpy(found)
    return scores, indices


# --------------------------------------------------------------------------------------------------
# The transformer


def _norm(config: MemorizingGPTConfig) -> nn.Module:
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class Attention(nn.Module):
    def __init__(self, config: MemorizingGPTConfig, layer_number: int):
        super().__init__()
        self.config = config
        self.heads, self.groups, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.groups * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.groups * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=config.linear_bias)
        # Local attention's logit scale (None: 1/sqrt(head_dim), scaled_dot_product_attention's own).
        # YaRN scales rotated queries and keys by its attention factor, i.e. their dot products by its
        # square. (Memory keys and queries are unit vectors: unaffected.)
        self.scale = None
        if config.rope_scaling_type == "yarn":
            self.scale = config.rope_yarn_attention_factor**2 / math.sqrt(self.head_dim)
        self.has_memory = layer_number in config.memory_layers
        if self.has_memory:
            self.gate_bias = nn.Parameter(torch.full((self.heads,), float(config.gate_init)))
            # The memory softmax's logit scale, learned per head in log space.
            self.memory_log_scale = nn.Parameter(torch.full((self.heads,), 0.5 * math.log(self.head_dim)))

    def forward(self, x: torch.Tensor, state: _LayerState, offset: int) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.groups, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.groups, self.head_dim).transpose(1, 2)
        if state.segment is not None:
            k, v = torch.cat([state.segment[0], k], dim=2), torch.cat([state.segment[1], v], dim=2)
        # The memory is not differentiable; gradients stay within one call.
        state.segment = (k.detach(), v.detach())

        # A document's first segment finds no memory and keeps local attention alone.
        with_memory = self.has_memory and state.memory is not None
        softmax_mixing = with_memory and self.config.memory_mixing == "softmax"
        out, local_lse = self._local(q, k, v, state, offset, softmax_mixing)
        if with_memory:
            from_memory, memory_lse = self._from_memory(q, state.memory)
            if softmax_mixing:  # the retrieved pairs' weight in one softmax with the local keys
                gate = torch.sigmoid(self.gate_bias.float()[None, :, None, None] + memory_lse - local_lse)
            else:
                gate = torch.sigmoid(self.gate_bias.float())[None, :, None, None]
            out = (from_memory * gate + out.float() * (1 - gate)).to(x.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _local(self, q, k, v, state, offset, with_logsumexp: bool = False):
        """Causal attention over this segment so far, preceded by the previous segment (XL cache),
        and, if asked, the logsumexp of its logits per query [b, h, t, 1]."""
        q = _rotate(q, offset, self.config)
        k = _rotate(k, 0, self.config)
        visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(offset)
        if state.previous is not None:
            previous_keys, previous_values = state.previous
            # The previous segment sits at positions -L..-1, just before this one, all visible.
            k = torch.cat([_rotate(previous_keys, -previous_keys.shape[2], self.config), k], dim=2)
            v = torch.cat([previous_values, v], dim=2)
            visible = torch.cat([visible.new_ones(q.shape[2], previous_keys.shape[2]), visible], dim=1)
        repeat = self.heads // self.groups
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if not with_logsumexp:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=self.scale), None
        # The scores once, for both the attention and its logsumexp.
        scale = self.head_dim**-0.5 if self.scale is None else self.scale
        logits = ((q.float() @ k.float().transpose(-1, -2)) * scale).masked_fill(~visible, float("-inf"))
        out = (torch.softmax(logits, dim=-1) @ v.float()).to(v.dtype)
        return out, torch.logsumexp(logits, dim=-1, keepdim=True)

    def _from_memory(self, q, memory):
        """Attention over the top-k pairs retrieved for each query (unit vectors, no positions), and
        the logsumexp of its logits per query [b, h, t, 1]."""
        memory_keys, memory_values = memory
        b, h, t, d = q.shape
        # The heads of a query group share that group's memory: search them as one longer query list.
        queries = F.normalize(q.float(), dim=-1).reshape(b, self.groups, h // self.groups * t, d)
        scores, indices = self._search(queries, memory_keys)
        k = scores.shape[-1]
        scale = self.memory_log_scale.float().exp().view(1, self.groups, -1, 1, 1)
        logits = scores.view(b, self.groups, -1, t, k) * scale
        values = memory_values.gather(2, indices.reshape(b, self.groups, -1, 1).expand(-1, -1, -1, d))
        values = values.view(b, self.groups, -1, t, k, d)
        out = torch.einsum("bgrqk,bgrqkd->bgrqd", torch.softmax(logits, dim=-1), values).reshape(b, h, t, d)
        return out, torch.logsumexp(logits, dim=-1).reshape(b, h, t, 1)

    def _search(self, queries, memory_keys):
        """The best knn_top_k memory pairs per query, (scores, indices) [b, g, q, k]; with
        memory_sink_tokens=N, the best that are not among the first N tokens of their segment: the
        search asks for as many more as the memory holds such tokens and drops them."""
        filled, s, sinks = memory_keys.shape[2], self.config.segment_length, self.config.memory_sink_tokens
        # The memory holds whole segments, the newest last (the oldest may have lost its start).
        is_sink = (torch.arange(filled, device=memory_keys.device) - filled) % s < sinks
        k = min(self.config.knn_top_k, filled - int(is_sink.sum()))
        wanted = min(k + sinks * -(-filled // s), filled)
        scores, indices = top_k_inner_product(queries, memory_keys, wanted, self.config.memory_backend)
        if wanted == k:
            return scores, indices
        scores, best = scores.masked_fill(is_sink[indices], float("-inf")).topk(k, dim=-1)
        return scores, indices.gather(-1, best)


class MLP(nn.Module):
    def __init__(self, config: MemorizingGPTConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.linear_bias)
        # Gated linear unit: activation(gate_proj(x)) * up_proj(x).
        self.gate_proj = (
            nn.Linear(config.hidden_size, config.intermediate_size, bias=config.linear_bias)
            if config.gated_linear_unit
            else None
        )
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.linear_bias)
        self.activation = _ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        if self.gate_proj is None:
            return self.down_proj(self.activation(self.up_proj(x)))
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: MemorizingGPTConfig, layer_number: int):
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attn = Attention(config, layer_number)
        self.post_attention_layernorm = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x, state, offset):
        x = x + self.self_attn(self.input_layernorm(x), state, offset)
        return x + self.mlp(self.post_attention_layernorm(x))


class MemorizingGPTPreTrainedModel(PreTrainedModel):
    config_class = MemorizingGPTConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    # The memory cannot be rolled back, so assisted decoding cannot verify candidate tokens.
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
        # transformers' init functions skip tensors already loaded from a checkpoint (some releases
        # initialise after loading); plain in-place ops would overwrite them.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, Attention) and module.has_memory:
            init.constant_(module.gate_bias, self.config.gate_init)
            init.constant_(module.memory_log_scale, 0.5 * math.log(module.head_dim))

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not create its own cache: the model hands back a MemorizingGPTMemory.
        return False


class MemorizingGPTModel(MemorizingGPTPreTrainedModel):
    def __init__(self, config: MemorizingGPTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = (
            nn.Embedding(config.segment_length, config.hidden_size)
            if config.position_embedding_type == "learned_absolute"
            else None
        )
        self.layers = nn.ModuleList(DecoderLayer(config, n + 1) for n in range(config.num_hidden_layers))
        self.norm = _norm(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor, memory: MemorizingGPTMemory, **kwargs) -> BaseModelOutputWithPast:
        """Read input_ids [b, t] on from where `memory` stopped, segment by segment."""
        memory.bind(input_ids.shape[0])
        hidden = []
        for piece in self._up_to_segment_ends(input_ids, memory):
            offset = memory.segment_offset
            x = self.embed_tokens(piece)
            if self.embed_positions is not None:
                x = x + self.embed_positions(torch.arange(offset, offset + piece.shape[1], device=piece.device))
            for layer, state in zip(self.layers, memory.layers):
                x = layer(x, state, offset)
            hidden.append(self.norm(x))
            memory.tokens_read += piece.shape[1]
            if memory.segment_offset == 0:
                memory.end_segment()
        return BaseModelOutputWithPast(last_hidden_state=torch.cat(hidden, dim=1), **{_CACHE_FIELD: memory})

    @staticmethod
    def _up_to_segment_ends(input_ids, memory):
        start, length = 0, input_ids.shape[1]
        room = memory.segment_length - memory.segment_offset
        while start < length:
            yield input_ids[:, start : start + room]
            start += room
            room = memory.segment_length


class MemorizingGPTForCausalLM(MemorizingGPTPreTrainedModel, GenerationMixin):
    def __init__(self, config: MemorizingGPTConfig):
        super().__init__(config)
        self.model = MemorizingGPTModel(config)
        # Tied models reuse the input embedding as the output layer (no separate parameter).
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.kept_memory = None
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    # --- memory across calls -------------------------------------------------------------------------
    def new_memory(self, memory_size: int | None = None) -> MemorizingGPTMemory:
        """An empty memory to pass as `past_key_values`; `memory_size` defaults to config.memory_size."""
        return MemorizingGPTMemory(self.config, memory_size)

    def keep_memory(self, keep: bool = True, memory_size: int | None = None):
        """keep=True: every later call (forward or generate) continues the same documents, e.g. read
        a book in several calls, then generate. keep=False: each call starts new documents."""
        self.kept_memory = self.new_memory(memory_size) if keep else None

    def reset_memory(self):
        """Start new documents in the kept memory."""
        if self.kept_memory is not None:
            self.kept_memory.reset()

    # -------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        cache: MemorizingGPTMemory | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        past_key_values: MemorizingGPTMemory | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Continue the documents in `cache` (else the kept memory, else new documents).

        `past_key_values` is the name transformers < 5.24 uses for `cache`: either works.
        use_cache=False reads input_ids as new documents in a throwaway memory.
        """
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "padding is not supported: each row is one document streamed through its own memory, "
                "so batch documents of equal length (or generate one at a time)"
            )
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the memory as `cache` or as `past_key_values`, not two different ones")
        memory = next((m for m in (cache, past_key_values, self.kept_memory) if m is not None), None)
        if use_cache is False or memory is None:
            memory = self.new_memory()
        hidden = self.model(input_ids, memory).last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, **{_CACHE_FIELD: None if use_cache is False else memory}
        )
        return output if return_dict is not False else output.to_tuple()
