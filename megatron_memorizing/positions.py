"""Taking rotary positions off keys and queries, and putting them back at other offsets.

Megatron-Core's SelfAttention hands core attention queries and keys already rotated by RoPE for
positions 0..s-1 of the segment. Two things need them otherwise:
- the kNN memory: stored keys must carry no position (a key written 20 segments ago would
  otherwise look like it sat inside the current segment), so keys and queries are un-rotated
  before they are normalised, stored and searched;
- the Transformer-XL cache: the previous segment's keys sit at positions -s..-1 relative to the
  current segment (the cache of inputs projects them afresh and rotates them with `freqs`).
A rotation by -theta undoes a rotation by theta exactly (up to float rounding), so this is exact.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.transformer_config import TransformerConfig


class RotaryPositions:
    """The rotary frequencies GPTModel uses, available to core attention.

    Built from the same settings as GPTModel's RotaryEmbedding (`MemorizingConfig.rotary`: base,
    percent, scaling), so the angles are identical.
    """

    def __init__(self, config: TransformerConfig, **rotary):
        self.config = config
        self.embedding = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_interleaved=config.rotary_interleaved,
            use_cpu_initialization=not torch.cuda.is_available(),
            **rotary,
        )

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

