"""Does the memory find what local attention would have copied? The lookup score, beyond the segment.

`lookup_heads` scores local attention: at a token whose last n tokens occurred earlier in its
segment, the attention a head gives the token that followed them (the token to copy). Here the
earlier occurrence lies *before* the segment, in the memory (within its last M pairs), where only
the memory can reach it. For every memory layer and head:

- **found**: how often the pair of the token to copy is among the top-k the search retrieved;
- **best**: how often it is the best match (the first of the k);
- **weight**: the attention the memory's softmax over the k gives it (0 where it was not found),
  the memory's own lookup score, to read beside `lookup_heads`' local one;
- **gate**: the share of the head's output its memory gets (`sigmoid(b_g)`; with
  memory_mixing=softmax the share is per query and this is its bias).

A low *found* says the search misses (un-positioned, normalised keys do not match as the head's
local attention does); a high *found* with a low *best*, that it is found among look-alikes; a
high *best* with a low *weight*, that the memory's softmax reads it too flatly (its temperature);
a low gate, that the head was not taught to use it.

    python -m megatron_memorizing.eval.memory_lookups --checkpoint runs/smollm2/finetune-.../checkpoints \
        --data data/stdlib-dirs-smollm2/validation-long --segments 24 --slots 2

Writes a table per measure to the terminal and memory_lookups.json to --out.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from megatron_memorizing.cli_arguments import output_folder, positive_int
from megatron_memorizing.data import Batch
from megatron_memorizing.eval.loading import LoadedModel, add_checkpoint_arguments, forward_logits, segments_to_read
from megatron_memorizing.eval.report import table, write_json
from megatron_memorizing.knn_attention import KNNAttention
from megatron_memorizing.memory import Retrieved
from megatron_memorizing.observations import watch_retrievals


class DocumentLookups:
    """One slot's document read segment after segment: where every n-gram of it last ended."""

    def __init__(self, n: int):
        self.n = n
        self.last_end: dict[tuple, int] = {}
        self.tail: list[int] = []  # the previous segment's last n - 1 tokens

    def targets(self, tokens: list[int], offset: int, new_document: bool) -> list[int]:
        """For each token of a segment starting at document position `offset`: the document
        position right after the latest earlier end of the n tokens ending at it (the token to
        copy next), or -1 where they did not occur before in the document."""
        if new_document:
            self.last_end.clear()
            self.tail = []
        context = self.tail + tokens
        start = len(self.tail)  # index of tokens[0] in context
        targets = []
        for i in range(len(tokens)):
            j = start + i
            if j < self.n - 1:
                targets.append(-1)
                continue
            gram = tuple(context[j - self.n + 1 : j + 1])
            end = self.last_end.get(gram)
            targets.append(-1 if end is None else end + 1)
            self.last_end[gram] = offset + i
        self.tail = context[-(self.n - 1):] if self.n > 1 else []
        return targets


@dataclass
class MemoryLookups:
    layers: list[int]  # global layer numbers of the memory layers, 1-based
    found: torch.Tensor  # [layers, heads]: share of queries whose token to copy was retrieved
    best: torch.Tensor  # [layers, heads]: share of queries whose token to copy was the best match
    weight: torch.Tensor  # [layers, heads]: mean memory attention to it
    gate: torch.Tensor  # [layers, heads]: sigmoid(b_g)
    queries: int  # tokens whose n tokens last occurred before their segment, within the memory
    n: int


MEASURES = {
    "found": "share of the queries whose token to copy is among the retrieved pairs",
    "best": "share whose token to copy is the best match",
    "weight": "the memory's attention to it (its lookup score)",
    "gate": "the memory's share of the head's output",
}


def memory_attentions(model_chunks: Iterable[torch.nn.Module]) -> dict[int, KNNAttention]:
    return {m.layer_number: m for chunk in model_chunks for m in chunk.modules() if isinstance(m, KNNAttention)}


@torch.no_grad()
def score_memory_heads(loaded: LoadedModel, batches: Iterable[Batch], n: int = 4) -> MemoryLookups:
    """Stream `batches` through the model as in training (memory read, then written) and score,
    per memory layer and head, every query whose token to copy sits in the memory."""
    layers = memory_attentions(loaded.model_chunks)
    if not layers:
        raise ValueError("the model has no memory layer: nothing to score (lookup_heads scores local attention)")
    capacity = loaded.config.model.memory_size
    found, best, weight = ({number: 0.0 for number in layers} for _ in range(3))
    slots_seen: dict[int, int] = {}
    targets: list[torch.Tensor] = []  # per slot: document position of the token to copy, -1 if not in memory

    def accumulate(number: int, retrieved: Retrieved) -> None:
        first = slots_seen.get(number, 0)
        slots_seen[number] = first + retrieved.positions.shape[0]
        scale = layers[number].memory_log_scale.float().exp()[:, None, None]
        for slot, slot_targets in enumerate(targets[first : first + retrieved.positions.shape[0]]):
            rows = torch.nonzero(slot_targets >= 0).flatten()
            if not len(rows):
                continue
            valid = retrieved.valid[slot][:, rows]  # [h, q, k]
            # A query that retrieved nothing valid reads nothing (as in KNNAttention), not NaN.
            logits = (retrieved.scores[slot][:, rows] * scale).masked_fill(~valid, float("-inf"))
            logits = logits.masked_fill(~valid.any(dim=-1, keepdim=True), 0.0)
            hits = (retrieved.positions[slot][:, rows] == slot_targets[rows][None, :, None]) & valid
            found[number] += hits.any(dim=-1).double().sum(dim=-1)
            best[number] += hits[..., 0].double().sum(dim=-1)
            weight[number] += (torch.softmax(logits, dim=-1) * hits).sum(dim=-1).double().sum(dim=-1)

    readers = [DocumentLookups(n) for _ in range(loaded.config.model.memory_slots)]
    queries = 0
    with watch_retrievals(loaded.model_chunks, accumulate):
        for batch in batches:
            lengths = batch.loss_mask.sum(dim=1).long().tolist()
            targets.clear()
            for reader, row, length, offset, new in zip(readers, batch.tokens.tolist(), lengths,
                                                        batch.offsets.tolist(), batch.new_document.tolist()):
                slot_targets = torch.tensor(reader.targets(row[:length], offset, new) + [-1] * (len(row) - length))
                in_memory = (slot_targets < offset) & (slot_targets >= max(0, offset - capacity))
                targets.append(torch.where(in_memory, slot_targets, -1))
            queries += sum(int((t >= 0).sum()) for t in targets)
            slots_seen.clear()
            forward_logits(loaded.model_chunks, loaded.memories, batch)
            loaded.memories.commit()
    if not queries:
        raise ValueError(f"no {n} tokens of what was read last occurred in an earlier segment: read more segments, "
                         "or lower n")
    numbers = sorted(layers)

    def mean(totals: dict[int, torch.Tensor]) -> torch.Tensor:
        return (torch.stack([torch.as_tensor(totals[k]) for k in numbers]) / queries).float()

    gate = torch.stack([layers[k].gate.detach().cpu() for k in numbers])
    return MemoryLookups(numbers, mean(found), mean(best), mean(weight), gate, queries, n)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_memorizing.eval.memory_lookups", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser, "dataset prefix to read")
    parser.add_argument("--segments", type=positive_int, default=24, help="segments per slot to read (default 24)")
    parser.add_argument("--n", type=positive_int, default=4,
                        help="a query counts when the N tokens ending at it last occurred in an earlier segment "
                             "(default 4)")
    parser.add_argument("--slots", type=positive_int, help="documents streamed side by side (default: as in training)")
    parser.add_argument("--out", type=output_folder,
                        help="directory for memory_lookups.json (default: runs/eval/<run>)")
    args = parser.parse_args(argv)

    loaded, data, batches = segments_to_read(args, parser)
    model = loaded.config.model
    try:
        scores = score_memory_heads(loaded, batches, args.n)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error} (--checkpoint, --segments, --n)\n")
    heads = scores.found.shape[1]
    print(f"{loaded.path} on {data}: {scores.queries:,} queries whose {args.n} tokens last occurred in the memory "
          f"(before their segment, within {model.memory_size:,} pairs), top {model.knn_top_k} retrieved")
    for name in MEASURES:
        print(f"\n{name}: {MEASURES[name]}")
        print(table(["layer", *[f"head {h + 1}" for h in range(heads)]],
                    [[str(layer), *[f"{float(v):.3f}" for v in getattr(scores, name)[row]]]
                     for row, layer in enumerate(scores.layers)]))

    out = args.out or Path("runs/eval") / loaded.path.parent.parent.name
    summary = {
        "checkpoint": str(loaded.path), "data": data, "n": args.n, "queries": scores.queries,
        "memory_size": model.memory_size, "top_k": model.knn_top_k,
        **{name: {str(layer): getattr(scores, name)[row].tolist() for row, layer in enumerate(scores.layers)}
           for name in MEASURES},
    }
    print(f"\nwrote {write_json(out / 'memory_lookups.json', summary)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
