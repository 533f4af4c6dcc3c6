"""Taking rotary positions off keys and queries, and putting them back at other offsets.

Megatron-Core's SelfAttention hands core attention queries and keys already rotated by RoPE for
positions 0..s-1 of the segment. Two things need them otherwise:
- the kNN memory: stored keys must carry no position (a key written 20 segments ago would
  otherwise look like it sat inside the current segment), so keys and queries are un-rotated
  before they are normalised, stored and searched;
- the Transformer-XL cache: the previous segment's keys sit at positions -s..-1 relative to the
  current segment (the cache of inputs projects them afresh and rotates them with `freqs`).
A rotation by -theta undoes a rotation by theta exactly (up to float rounding), so this is exact.

YaRN's frequencies (`yarn_inverse_frequencies`) are given to Megatron-Core's stock RotaryEmbedding
(`use_yarn_frequencies`), in GPTModel as here: Megatron-Core's own YaRN embedding runs on CUDA only
and its GPT model drops YaRN's attention factor, which this model folds into the softmax scale
(`MemorizingConfig.attention_softmax_scale`) instead.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.transformer_config import TransformerConfig


def yarn_inverse_frequencies(
    dim: int, base: float, factor: float, original_max_position_embeddings: int, beta_fast: float,
    beta_slow: float, round_to_int: bool,
) -> torch.Tensor:
    """YaRN's rotary frequencies [dim // 2] (float32), computed as transformers computes them.

    Channel pair i turns at base^(-2i/dim) radians per position. Over the original context of L
    positions a pair turns L * base^(-2i/dim) / (2 pi) times: pairs turning more than beta_fast
    times keep their frequency, pairs turning fewer than beta_slow times get it divided by
    `factor`, and a linear ramp over the pair index blends the two in between. The ramp's ends are
    the (fractional) pair indices at which a pair turns beta_fast and beta_slow times, rounded
    outwards to whole indices with `round_to_int`, and kept within 0 .. dim - 1.
    """

    def index_turning(times: float) -> float:
        return dim * math.log(original_max_position_embeddings / (times * 2 * math.pi)) / (2 * math.log(base))

    start, end = index_turning(beta_fast), index_turning(beta_slow)
    if round_to_int:
        start, end = math.floor(start), math.ceil(end)
    start, end = max(start, 0), min(end, dim - 1)
    if start == end:
        end += 0.001  # a ramp of no width would divide by zero
    # On the CPU, as transformers computes them, whatever device (or meta device) a model is built on.
    wavelength_scale = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    kept = 1.0 / wavelength_scale
    slowed = 1.0 / (factor * wavelength_scale)
    ramp = (torch.arange(dim // 2, dtype=torch.float32, device="cpu") - start) / (end - start)
    keep = 1 - torch.clamp(ramp, 0, 1)
    return slowed * (1 - keep) + kept * keep


def use_yarn_frequencies(embedding: RotaryEmbedding, yarn: Optional[dict]) -> None:
    """Give a stock RotaryEmbedding YaRN's frequencies (`MemorizingConfig.yarn`; None: leave it as
    it is). Call it before the embedding's first forward, which caches its results."""
    if yarn is not None:
        embedding.inv_freq = yarn_inverse_frequencies(**yarn).to(embedding.inv_freq.device)


class RotaryPositions:
    """The rotary frequencies GPTModel uses, available to core attention.

    Built from the same settings as GPTModel's RotaryEmbedding (`MemorizingConfig.rotary`: base,
    percent, scaling; and `yarn`, `MemorizingConfig.yarn`), so the angles are identical.
    """

    def __init__(self, config: TransformerConfig, yarn: Optional[dict] = None, **rotary):
        self.config = config
        self.embedding = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_interleaved=config.rotary_interleaved,
            use_cpu_initialization=not torch.cuda.is_available(),
            **rotary,
        )
        use_yarn_frequencies(self.embedding, yarn)

    def freqs(self, length: int, offset: int, device: torch.device) -> torch.Tensor:
        """Rotary angles [length, 1, 1, d] of positions offset .. offset+length-1 (as GPTModel hands
        them to its layers)."""
        # RotaryEmbedding caches by (length, offset): cheap to call every step.
        return self.embedding(length, offset=offset).to(device)

    def rotate(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate x [s, b, h, d] to positions offset .. offset+s-1."""
        freqs = self.freqs(x.shape[0], offset, x.device)
        return apply_rotary_pos_emb(x, freqs, self.config).to(x.dtype)

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the rotation GPTModel applied for positions 0..s-1."""
        freqs = self.freqs(x.shape[0], 0, x.device)
        return apply_rotary_pos_emb(x, -freqs, self.config).to(x.dtype)

