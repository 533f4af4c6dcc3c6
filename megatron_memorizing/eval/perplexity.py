"""Perplexity of held-out documents, streamed exactly as in training: memory filled, reset per document.

Besides the overall number it keeps token losses by position in the document, where the paper's
effect shows: the further into a document, the more of it the memory holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core import parallel_state
from tqdm import tqdm

from megatron_memorizing.data import DocumentStream
from megatron_memorizing.eval.long_range import DISTANCE_EDGES, REPEATED_LOCALLY, LongRangeTokens
from megatron_memorizing.memories import ModelMemories
from megatron_memorizing.step import forward_backward, sum_over_data_parallel

# Position buckets (tokens into the document): [0, 1), [1, 2), [2, 4), ... [2^23, longer).
POSITION_EDGES = [0] + [2**i for i in range(24)]


def perplexity_of(loss: float) -> float:
    """exp(loss); inf where that exceeds the largest float (a loss above ~709, from a diverged but
    finite model), a perplexity to report, not an error."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@dataclass
class Perplexity:
    loss_sum: float
    tokens: float
    # bucket start -> (loss_sum, tokens); bucket b covers positions [edges[b], edges[b+1])
    by_position: dict[int, tuple[float, float]] = field(default_factory=dict)
    text_bytes: float = 0.0  # UTF-8 bytes of text the predicted tokens stand for (0: not counted)
    # long-range tokens (eval/long_range.py): distance bucket start (segments back) -> (loss_sum, tokens)
    long_range: dict[int, tuple[float, float]] = field(default_factory=dict)
    # (loss_sum, tokens) of the tokens repeated inside local attention's view (eval/long_range.py)
    repeated_locally: tuple[float, float] = (0.0, 0.0)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1.0)

    @property
    def perplexity(self) -> float:
        return perplexity_of(self.loss)

    @property
    def bits_per_byte(self) -> Optional[float]:
        """The loss in bits per byte of text: comparable across tokenizers and corpora."""
        return self.loss_sum / math.log(2) / self.text_bytes if self.text_bytes else None

    def position_table(self) -> list[tuple[int, float, float]]:
        """(bucket start, perplexity, tokens) rows for buckets with tokens."""
        return [(start, perplexity_of(s / n), n) for start, (s, n) in sorted(self.by_position.items()) if n > 0]


@torch.no_grad()
def evaluate(
    model_chunks: list[torch.nn.Module],
    memories: ModelMemories,
    stream: DocumentStream,
    max_steps: Optional[int] = None,
    progress: bool = False,
    bytes_per_id: Optional[list[int]] = None,
    long_range: Optional[LongRangeTokens] = None,
) -> Perplexity:
    """Stream `stream` (loop=False: every document once) through the model; all ranks get the result.

    With `bytes_per_id` (`Tokenizer.bytes_per_id()`) the text bytes of the predicted tokens are
    counted too, for bits per byte; with `long_range` (fresh for this stream), the loss on
    long-range tokens by distance.

    The memories are left holding the evaluation documents: snapshot and restore them around this
    call if training continues afterwards.
    """
    for chunk in model_chunks:
        chunk.eval()
    edges = torch.tensor(POSITION_EDGES)
    # Rows: loss sum, tokens, text bytes; one column per position bucket.
    bucket_sums = torch.zeros(3, len(edges), dtype=torch.float64)
    byte_table = torch.tensor(bytes_per_id or [], dtype=torch.float64)
    # Rows: loss sum, tokens; one column per distance bucket, and a last one for local repeats.
    range_sums = torch.zeros(2, len(DISTANCE_EDGES) + 1, dtype=torch.float64)
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    total_steps = stream.total_steps if max_steps is None else min(max_steps, stream.total_steps or max_steps)
    try:
        for _, batch in zip(range(total_steps), tqdm(stream, total=total_steps, disable=not progress, desc="eval")):
            step = forward_backward(model_chunks, memories, batch, forward_only=True)
            memories.commit()
            if last_stage:
                positions = batch.offsets[:, None] + torch.arange(batch.tokens.shape[1])
                bucket = (torch.bucketize(positions, edges, right=True) - 1).flatten()
                losses = step.token_losses.flatten().cpu().double()
                mask = batch.loss_mask.flatten().cpu().double()
                bucket_sums[0].index_add_(0, bucket, losses)
                bucket_sums[1].index_add_(0, bucket, mask)
                if len(byte_table):
                    bucket_sums[2].index_add_(0, bucket, byte_table[batch.labels.flatten().cpu()] * mask)
                if long_range is not None:
                    distance = long_range.mark(batch.tokens, batch.labels, batch.new_document, batch.offsets).flatten()
                    column = distance.masked_fill(distance == REPEATED_LOCALLY, len(DISTANCE_EDGES))
                    chosen = (column >= 0) & (mask > 0)
                    range_sums[0].index_add_(0, column[chosen], losses[chosen])
                    range_sums[1].index_add_(0, column[chosen], torch.ones(int(chosen.sum()), dtype=torch.float64))
    finally:
        for chunk in model_chunks:
            chunk.train()
    sums = sum_over_data_parallel(bucket_sums)
    by_position = {POSITION_EDGES[b]: (sums[0, b].item(), sums[1, b].item()) for b in range(len(POSITION_EDGES))}
    far = sum_over_data_parallel(range_sums)
    by_distance = {DISTANCE_EDGES[b]: (far[0, b].item(), far[1, b].item()) for b in range(len(DISTANCE_EDGES))
                   if far[1, b] > 0}
    local = (far[0, -1].item(), far[1, -1].item())
    return Perplexity(sums[0].sum().item(), sums[1].sum().item(), by_position, sums[2].sum().item(), by_distance, local)
