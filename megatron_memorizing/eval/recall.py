"""Accuracy on the long-range recall task (data_tools/recall_task.py) by distance to the answer.

A query `get k317 v05` is answered correctly when the model's most likely next token after
`get k317` (over the whole vocabulary) is the value stored by `put v05 k317` earlier in the
document. The distance is counted in tokens from that definition's value to the query's value. Beyond
the local segment only memory can bring the definition back: without memory the best possible
accuracy there is chance, 1/num_values.

    python -m megatron_memorizing.eval.recall --checkpoint runs/recall-tiny/checkpoints
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from data_tools.recall_task import DEFINE, QUERY
from megatron_memorizing.data import DocumentStream, Tokenizer, dataset_tokenizer_path, open_indexed_dataset, read_manifest
from megatron_memorizing.eval.loading import forward_logits, load_checkpoint
from megatron_memorizing.eval.report import new_figure, save_figure, table, write_json
from megatron_memorizing.memories import ModelMemories


def find_queries(tokens: np.ndarray, define_id: int, query_id: int) -> list[tuple[int, int]]:
    """(position of the answer token, distance back to the definition's value) for every query of
    a document whose key was defined earlier in it."""
    defined: dict[int, int] = {}
    queries = []
    for op in np.flatnonzero((tokens[:-2] == define_id) | (tokens[:-2] == query_id)):
        if tokens[op] == define_id:  # put VALUE KEY
            defined[int(tokens[op + 2])] = int(op + 1)
        elif int(tokens[op + 1]) in defined:  # get KEY VALUE
            answer = int(op + 2)
            queries.append((answer, answer - defined[int(tokens[op + 1])]))
    return queries


def distance_bucket(distance: int, segment_length: int) -> int:
    """0 for distances inside one segment, then b for [2^(b-1), 2^b) segments back."""
    segments = distance // segment_length
    return 0 if segments == 0 else int(math.log2(segments)) + 1


def bucket_range(bucket: int) -> tuple[int, int]:
    """[first, last) distance of a bucket, in segments."""
    return (0, 1) if bucket == 0 else (2 ** (bucket - 1), 2**bucket)


@dataclass
class RecallAccuracy:
    segment_length: int
    # bucket -> [correct, queries, summed probability of the right answer]
    buckets: dict[int, list[float]] = field(default_factory=dict)

    def add(self, distance: int, correct: bool, probability: float) -> None:
        row = self.buckets.setdefault(distance_bucket(distance, self.segment_length), [0, 0, 0.0])
        row[0] += int(correct)
        row[1] += 1
        row[2] += probability

    def accuracy(self, bucket: Optional[int] = None) -> float:
        rows = self.buckets.values() if bucket is None else [self.buckets.get(bucket, [0, 0, 0.0])]
        correct, total = sum(r[0] for r in rows), sum(r[1] for r in rows)
        return correct / total if total else float("nan")

    def rows(self) -> list[dict]:
        out = []
        for bucket, (correct, total, probability) in sorted(self.buckets.items()):
            first, last = bucket_range(bucket)
            out.append(dict(
                segments_from=first, segments_to=last,
                tokens_from=first * self.segment_length, tokens_to=last * self.segment_length,
                queries=total, accuracy=correct / total, mean_probability=probability / total,
            ))
        return out


@torch.no_grad()
def recall_accuracy(
    model_chunks: list[torch.nn.Module],
    memories: ModelMemories,
    stream: DocumentStream,
    define_id: int,
    query_id: int,
    max_steps: Optional[int] = None,
) -> RecallAccuracy:
    """Stream `stream` (loop=False) through a single-process model, scoring every query."""
    documents = open_indexed_dataset(stream.prefix)
    queries: dict[int, list[tuple[int, int]]] = {}
    result = RecallAccuracy(stream.segment_length)
    steps = stream.total_steps if max_steps is None else min(max_steps, stream.total_steps)
    for _, batch in zip(range(steps), stream):
        logits = forward_logits(model_chunks, memories, batch)
        memories.commit()
        probabilities = logits.softmax(dim=-1)
        predicted = logits.argmax(dim=-1)
        for slot, (document, offset) in enumerate(zip(batch.document_ids.tolist(), batch.offsets.tolist())):
            if document < 0:
                continue
            if document not in queries:
                tokens = documents.read(document, 0, int(documents.length[document]))
                queries[document] = find_queries(tokens, define_id, query_id)
            for answer, distance in queries[document]:
                # the answer is the label of input position answer - 1
                i = answer - 1 - offset
                if 0 <= i < batch.tokens.shape[1] and batch.loss_mask[slot, i] > 0:
                    label = int(batch.labels[slot, i])
                    result.add(distance, int(predicted[slot, i]) == label, float(probabilities[slot, i, label]))
    return result


def task_ids(data_prefix: str) -> tuple[int, int, int]:
    """(define id, query id, number of values) of a recall-task dataset."""
    directory = Path(data_prefix).parent
    tokenizer = Tokenizer(dataset_tokenizer_path(data_prefix, read_manifest(data_prefix)))
    spec = json.loads((directory / "recall.json").read_text())["spec"]
    ids = [tokenizer.encode(word) for word in (DEFINE, QUERY)]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"{data_prefix} was not made by data_tools.recall_task: its tokenizer splits the task words")
    return ids[0][0], ids[1][0], spec["num_values"]


def plot(results: dict[str, RecallAccuracy], chance: float, path: Path, title: str) -> Path:
    figure, axes = new_figure()
    for name, result in results.items():
        rows = result.rows()
        axes.plot([r["segments_from"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o", label=name)
    axes.axhline(100 * chance, color="grey", linestyle=":", label=f"chance (1/{round(1 / chance)})")
    axes.axvline(1, color="grey", linestyle="--", linewidth=0.8)
    axes.text(1.05, 50, "local segment ends", color="grey", fontsize=8, rotation=90, va="center")
    axes.set_xscale("symlog", linthresh=1)
    axes.set_xlabel("distance from query to its definition (segments, bucket start)")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 102)
    axes.set_title(title)
    axes.legend()
    return save_figure(figure, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_memorizing.eval.recall", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or one iter_* directory in it")
    parser.add_argument("--data", help="recall-task dataset prefix (default: the run's validation split)")
    parser.add_argument("--slots", type=int, help="documents streamed side by side (default: as in training)")
    parser.add_argument("--max-steps", type=int, help="stop after this many segments per slot (default: all)")
    parser.add_argument("--out", type=Path, help="directory for recall.json and recall.png (default: runs/eval/<run>)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a field of the checkpoint's config (repeatable)")
    args = parser.parse_args(argv)

    loaded = load_checkpoint(args.checkpoint, args.set, slots=args.slots)
    model = loaded.config.model
    data = args.data or loaded.config.data.validation
    define_id, query_id, num_values = task_ids(data)
    if model.memory_layers:
        conditions = {"with memory": contextlib.nullcontext, "memory disabled": loaded.memories.disabled}
    else:
        conditions = {"no memory layer": contextlib.nullcontext}
    results = {}
    for name, condition in conditions.items():
        stream = DocumentStream(data, model.memory_slots, model.segment_length, loop=False)
        with condition():
            results[name] = recall_accuracy(loaded.model_chunks, loaded.memories, stream, define_id, query_id, args.max_steps)

    names = list(results)
    rows = [
        [f"{r['tokens_from']}-{r['tokens_to']}", f"{r['segments_from']}-{r['segments_to']}", r["queries"],
         *(f"{100 * results[n].rows()[i]['accuracy']:.1f}" for n in names)]
        for i, r in enumerate(results[names[0]].rows())
    ]
    rows.append(["all", "", sum(r[2] for r in rows), *(f"{100 * results[n].accuracy():.1f}" for n in names)])
    print(f"{loaded.path} on {data}: recall accuracy (%) by distance; chance {100 / num_values:.1f}%")
    print(table(["tokens back", "segments back", "queries", *names], rows))

    out = args.out or Path("runs/eval") / loaded.path.parent.parent.name
    summary = dict(
        checkpoint=str(loaded.path), step=loaded.step, data=data, segment_length=model.segment_length,
        memory_size=model.memory_size, chance=1 / num_values,
        results={n: dict(accuracy=r.accuracy(), by_distance=r.rows()) for n, r in results.items()},
    )
    print(f"wrote {write_json(out / 'recall.json', summary)}")
    title = f"recall by distance, {loaded.path.parent.parent.name} step {loaded.step} (segment {model.segment_length})"
    print(f"wrote {plot(results, 1 / num_values, out / 'recall.png', title)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
