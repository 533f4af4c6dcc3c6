"""Which attention heads look things up: the lookup (induction) score of every head.

At a token whose last n tokens occurred earlier in the segment, a head that *looks up* attends to
the token that followed that earlier occurrence: what came next last time, the token to copy
next. Its score is the attention it gives that one token, averaged over every such query (a
head attending uniformly scores about 1 / the query's position). Models that copy from their
context grow a few heads with high scores, in one or two layers.

A memory layer extends local attention beyond the segment, so it pays where its heads do this
lookup: put the memory in the layer with the lookup heads (`model.memory_layers`), for example
on a pretrained or warmed-up checkpoint before memory training starts.

    python -m megatron_memorizing.eval.lookup_heads --checkpoint runs/tiny-cpu/checkpoints --segments 48

Reads local attention only (the memory layer's retrieval is not part of the score), computed from
the query and keys each layer's stock core attention receives, as that attention computes it.
Writes a table to the terminal and lookup_heads.json / lookup_heads.png to --out.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from megatron_memorizing.cli_arguments import fraction, output_folder, positive_int
from megatron_memorizing.data import Batch
from megatron_memorizing.eval.loading import LoadedModel, add_checkpoint_arguments, forward_logits, segments_to_read
from megatron_memorizing.eval.report import new_figure, save_figure, table, write_json
from megatron_memorizing.observations import watch_local_attention


def lookup_targets(tokens: list[int], n: int) -> list[int]:
    """For each position i of a segment, the position right after the latest earlier end j < i of
    the n tokens ending at i (the token to copy next), or -1 where they did not occur before."""
    last_end: dict[tuple, int] = {}
    targets = [-1] * len(tokens)
    for i in range(n - 1, len(tokens)):
        gram = tuple(tokens[i - n + 1 : i + 1])
        if gram in last_end:
            targets[i] = last_end[gram] + 1
        last_end[gram] = i
    return targets


@dataclass
class LookupScores:
    layers: list[int]  # global layer numbers, 1-based
    scores: torch.Tensor  # [layers, heads]: mean attention to the token to copy next
    queries: int  # tokens whose n-gram occurred earlier in their segment (the mean's count)
    n: int

    def lookup_heads(self, threshold: float) -> dict[int, list[int]]:
        """Layer -> its heads (1-based) scoring at least `threshold`."""
        heads = {}
        for row, layer in enumerate(self.layers):
            found = [h + 1 for h, score in enumerate(self.scores[row].tolist()) if score >= threshold]
            if found:
                heads[layer] = found
        return heads


@torch.no_grad()
def score_heads(loaded: LoadedModel, batches: Iterable[Batch], n: int = 4) -> LookupScores:
    """Stream `batches` (segments, one document per slot) through the model as in training, memory
    read and written, and average per layer and head the attention each query whose n tokens
    occurred earlier in its segment gives its token to copy."""
    totals: dict[int, torch.Tensor] = {}  # layer -> [heads] sum of scores
    slots_seen: dict[int, int] = {}  # layer -> slots of the current batch it has scored
    targets: list[torch.Tensor] = []  # per slot of the current batch

    def accumulate(layer: int, probs: torch.Tensor) -> None:
        first = slots_seen.get(layer, 0)
        slots_seen[layer] = first + probs.shape[0]
        cached = probs.shape[-1] - probs.shape[-2]  # XL cache columns come first
        total = totals.setdefault(layer, torch.zeros(probs.shape[1], dtype=torch.float64))
        for slot_probs, slot_targets in zip(probs, targets[first : first + probs.shape[0]]):
            rows = torch.nonzero(slot_targets >= 0).flatten()
            total += slot_probs[:, rows, cached + slot_targets[rows]].double().sum(dim=-1).cpu()

    queries = 0
    with watch_local_attention(loaded.model_chunks, accumulate):
        for batch in batches:
            lengths = batch.loss_mask.sum(dim=1).long().tolist()
            targets[:] = [torch.tensor(lookup_targets(row[:length], n), dtype=torch.int64)
                          for row, length in zip(batch.tokens.tolist(), lengths)]
            queries += sum(int((t >= 0).sum()) for t in targets)
            slots_seen.clear()
            forward_logits(loaded.model_chunks, loaded.memories, batch)
            loaded.memories.commit()
    if not queries:
        raise ValueError(f"no {n} tokens repeat inside a segment of what was read: read more segments, or lower n")
    layers = sorted(totals)
    return LookupScores(layers, (torch.stack([totals[layer] for layer in layers]) / queries).float(), queries, n)


def layer_label(layer: int, memory_layers: list[int]) -> str:
    return f"{layer} (memory)" if layer in memory_layers else str(layer)


def plot(scores: LookupScores, memory_layers: list[int], path: Path, title: str) -> Path:
    heads = scores.scores.shape[1]
    figure, axes = new_figure(1.6 + 0.9 * heads, 1.4 + 0.5 * len(scores.layers))
    # One scale for every checkpoint (a score is a probability), so plots of a run compare by eye.
    image = axes.imshow(scores.scores.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
    axes.set_xticks(range(heads), [str(h + 1) for h in range(heads)])
    axes.set_yticks(range(len(scores.layers)),
                    [layer_label(layer, memory_layers) for layer in scores.layers])
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    for row in range(len(scores.layers)):
        for head in range(heads):
            score = float(scores.scores[row, head])
            axes.text(head, row, f"{score:.2f}", ha="center", va="center", color="k" if score > 0.6 else "w",
                      fontsize=8)
    figure.colorbar(image, ax=axes, label="attention to the token to copy")
    axes.set_title(title, fontsize=9)
    return save_figure(figure, path)


def advice(scores: LookupScores, memory_layers: list[int], threshold: float) -> str:
    heads = scores.lookup_heads(threshold)
    if not heads:
        return (f"no head scores >= {threshold}: this model does not copy from its context yet, and a memory has no "
                f"lookup to extend (train it longer, or warm it up on repeated text: docs/results.md, "
                "\"The recipe that works\")")
    where = "; ".join(f"layer {layer} heads {', '.join(map(str, found))}" for layer, found in heads.items())
    layers = sorted(heads)
    if not set(memory_layers) & set(layers):
        verdict = f"no memory layer is among them: put the memory there (--set \"model.memory_layers={layers}\")"
    elif set(layers) - set(memory_layers):
        every = sorted(set(memory_layers) | set(layers))
        verdict = (f"the memory is in {len(set(memory_layers) & set(layers))} of these {len(layers)} layers; memory in "
                   f"every lookup layer paid most (docs/results.md): --set \"model.memory_layers={every}\"")
    else:
        verdict = "the memory is in every lookup layer"
    return f"lookup heads (score >= {threshold}): {where}; {verdict}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_memorizing.eval.lookup_heads", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser, "dataset prefix to read")
    parser.add_argument("--segments", type=positive_int, default=48, help="segments per slot to read (default 48)")
    parser.add_argument("--n", type=positive_int, default=4,
                        help="a query counts when the N tokens ending at it occurred earlier in the segment "
                             "(default 4)")
    parser.add_argument("--threshold", type=fraction, default=0.2,
                        help="score from which a head is called a lookup head (default 0.2)")
    parser.add_argument("--slots", type=positive_int, help="documents streamed side by side (default: as in "
                                                           "training; fewer bound the attention maps held at once)")
    parser.add_argument("--out", type=output_folder,
                        help="directory for lookup_heads.json and .png (default: runs/eval/<run>)")
    args = parser.parse_args(argv)

    loaded, data, batches = segments_to_read(args, parser)
    model = loaded.config.model
    try:
        scores = score_heads(loaded, batches, args.n)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error} (--segments, --n)\n")
    memory_layers = list(model.memory_layers)
    heads = scores.scores.shape[1]
    print(f"{loaded.path} on {data}: attention to the token to copy, {scores.queries:,} queries whose "
          f"{args.n} tokens occurred earlier in their segment")
    print(table(["layer", *[f"head {h + 1}" for h in range(heads)]],
                [[layer_label(layer, memory_layers),
                  *[f"{float(s):.3f}" for s in scores.scores[row]]] for row, layer in enumerate(scores.layers)]))
    print(advice(scores, memory_layers, args.threshold))

    out = args.out or Path("runs/eval") / loaded.path.parent.parent.name
    summary = {
        "checkpoint": str(loaded.path), "data": data, "n": args.n, "queries": scores.queries,
        "memory_layers": memory_layers, "threshold": args.threshold,
        "scores": {str(layer): scores.scores[row].tolist() for row, layer in enumerate(scores.layers)},
        "lookup_heads": {str(layer): found for layer, found in scores.lookup_heads(args.threshold).items()},
    }
    print(f"\nwrote {write_json(out / 'lookup_heads.json', summary)}")
    title = f"{loaded.path.parent.parent.name} step {loaded.step}: lookup score per head"
    print(f"wrote {plot(scores, memory_layers, out / 'lookup_heads.png', title)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
