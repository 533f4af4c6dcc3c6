"""One forward/backward pass over a batch of document segments, with the memory lifecycle.

A batch (megatron_memorizing.data.Batch) holds one segment per memory slot of this data-parallel
rank ([slots, L]); Megatron's
schedules cut it into micro-batches, and micro-batch j streams slots [j*b, (j+1)*b). The caller
runs the optimizer and then `memories.commit()`, which makes this step's keys searchable.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_memorizing.data import Batch
from megatron_memorizing.memories import ModelMemories


@dataclass
class StepLoss:
    """This rank's share of the step's loss: real on the last pipeline stage, zeros elsewhere."""

    loss_sum: float  # summed token losses
    tokens: float  # tokens counted in loss_sum
    token_losses: Optional[torch.Tensor] = None  # [slots, L] per-token loss (0 on padding)

    @property
    def mean(self) -> float:
        return self.loss_sum / max(self.tokens, 1.0)


def _loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    mask = loss_mask.float()
    token_losses = per_token_loss.float() * mask
    loss_sum, tokens = token_losses.sum(), mask.sum().to(torch.int)
    # Megatron divides by `tokens` and the micro-batch count: gradients are per-token means.
    reported = {
        "lm loss": torch.stack([loss_sum.detach(), tokens.detach().float()]),
        "token loss": token_losses.detach(),
    }
    return loss_sum, tokens, reported


def sum_over_data_parallel(values: torch.Tensor) -> torch.Tensor:
    """Sum over data-parallel ranks of last-stage values, known afterwards on every rank.

    One all-reduce over the world: other pipeline stages contribute zeros, and the tensor-parallel
    ranks of the last stage hold identical copies, hence the division.
    """
    values = values.detach().double().clone()
    torch.distributed.all_reduce(values)
    return values / parallel_state.get_tensor_model_parallel_world_size()


def forward_backward(
    model_chunks: list[torch.nn.Module],
    memories: ModelMemories,
    batch: Batch,
    forward_only: bool = False,
) -> StepLoss:
    """Reset slots that start a document, then run Megatron's schedule over the micro-batches."""
    memories.reset(batch.new_document)
    micro_batch_size = memories.micro_batch_size
    slots, seq_length = batch.tokens.shape
    if slots % micro_batch_size:
        raise ValueError(f"batch of {slots} slots is not a whole number of micro-batches of {micro_batch_size}")
    num_micro_batches = slots // micro_batch_size
    position_ids = torch.arange(seq_length, device=batch.tokens.device).expand(micro_batch_size, -1)
    micro_batches = [
        (j, {k: getattr(batch, k)[j * micro_batch_size : (j + 1) * micro_batch_size]
             for k in ("tokens", "labels", "loss_mask")})
        for j in range(num_micro_batches)
    ]

    def forward_step(data_iterator, model):
        j, mb = next(data_iterator)
        memories.use_micro_batch(j)
        output = model(mb["tokens"], position_ids, None, labels=mb["labels"])
        return memories.keep_for_backward(output, j), partial(_loss, mb["loss_mask"])

    # Every model chunk (virtual pipeline stage) walks the same micro-batches.
    data_iterators = [iter(micro_batches) for _ in model_chunks]
    reduced = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterators if len(model_chunks) > 1 else data_iterators[0],
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=num_micro_batches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True) or not reduced:
        return StepLoss(0.0, 0.0, torch.zeros_like(batch.loss_mask, dtype=torch.float32))
    total = torch.stack([r["lm loss"] for r in reduced]).sum(dim=0)
    return StepLoss(total[0].item(), total[1].item(), torch.cat([r["token loss"] for r in reduced]))
