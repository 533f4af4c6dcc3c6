"""Tiny models and synthetic document streams shared by the tests."""

import torch

from megatron_memorizing.config import MemorizingConfig
from megatron_memorizing.data import Batch


def tiny_config(**overrides) -> MemorizingConfig:
    fields = dict(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=128,
        segment_length=16,
        memory_layers=(3,),
        memory_size=40,  # not a multiple of the segment: the ring wraps mid-segment
        knn_top_k=4,
        micro_batch_size=2,
        num_micro_batches=2,
        share_embeddings_and_output_weights=False,
    )
    fields.update(overrides)
    return MemorizingConfig(**fields)


def document_batches(steps: int, slots: int, length: int, vocab: int, boundaries=((3, 1),), seed: int = 0):
    """Segments of random-token documents; (step, slot) in `boundaries` starts a new document there.

    Tokens repeat within a document (a small per-document alphabet), so memory has something to find.
    """
    g = torch.Generator().manual_seed(seed)
    batches = []
    for step in range(steps):
        tokens = torch.randint(0, vocab, (slots, length + 1), generator=g)
        new_document = torch.tensor([step == 0 or (step, s) in boundaries for s in range(slots)])
        batches.append(
            Batch(
                tokens=tokens[:, :-1].contiguous(),
                labels=tokens[:, 1:].contiguous(),
                loss_mask=torch.ones(slots, length),
                new_document=new_document,
                document_ids=torch.arange(slots),
                offsets=torch.zeros(slots, dtype=torch.int64),
            )
        )
    return batches


def segment_batches(documents: torch.Tensor, length: int) -> list[Batch]:
    """`documents` [slots, steps * length + 1] read segment after segment, one document per slot."""
    slots, steps = documents.shape[0], (documents.shape[1] - 1) // length
    return [
        Batch(
            tokens=documents[:, step * length : (step + 1) * length].contiguous(),
            labels=documents[:, step * length + 1 : (step + 1) * length + 1].contiguous(),
            loss_mask=torch.ones(slots, length),
            new_document=torch.full((slots,), step == 0),
            document_ids=torch.arange(slots),
            offsets=torch.full((slots,), step * length, dtype=torch.int64),
        )
        for step in range(steps)
    ]


@torch.no_grad()
def stream_logits(model, tokens: torch.Tensor, segment_length: int) -> torch.Tensor:
    """Logits of a GPTModel reading `tokens` [rows, n] as one document per row, segment by segment,
    committing each segment to memory as the trainer does."""
    from megatron_memorizing.memories import ModelMemories

    rows = tokens.shape[0]
    memories = ModelMemories([model], rows)
    memories.reset(torch.ones(rows, dtype=torch.bool))
    positions = torch.arange(segment_length).expand(rows, -1)
    logits = []
    for segment in tokens.split(segment_length, dim=1):
        memories.use_micro_batch(0)
        logits.append(model(segment, positions, None))
        memories.commit()
    return torch.cat(logits, dim=1)
