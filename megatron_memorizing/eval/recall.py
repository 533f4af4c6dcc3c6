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

from megatron_memorizing.cli_arguments import output_folder, positive_int
from megatron_memorizing.data import (
    DocumentStream,
    dataset_tokenizer_path,
    load_tokenizer,
    open_indexed_dataset,
    read_manifest,
)
from megatron_memorizing.data.recall_task import DEFINE, QUERY, RecallSpec, fact_word
from megatron_memorizing.eval.loading import (
    add_checkpoint_arguments,
    evaluation_data,
    forward_logits,
    load_checkpoint_argument,
)
from megatron_memorizing.eval.report import new_figure, save_figure, table, write_json
from megatron_memorizing.memories import ModelMemories


@dataclass(frozen=True)
class TaskTokens:
    """Token ids of a recall-task dataset's words."""

    define: int
    query: int
    facts: dict  # fact token id -> key id (the "facts" format; empty otherwise)
    num_values: int


def task_tokens(data_prefix: str) -> TaskTokens:
    spec = RecallSpec(**json.loads((Path(data_prefix).parent / "recall.json").read_text())["spec"])
    tokenizer = load_tokenizer(dataset_tokenizer_path(data_prefix, read_manifest(data_prefix)))

    def one(word: str) -> int:
        ids = tokenizer.encode(word)
        if len(ids) != 1:
            raise ValueError(f"{data_prefix} was not made by data_tools.recall_task: its tokenizer splits {word!r}")
        return ids[0]

    facts = {one(fact_word(k, v)): one(k) for k in spec.keys for v in spec.values} if spec.format == "facts" else {}
    return TaskTokens(one(DEFINE), one(QUERY), facts, spec.num_values)


def find_queries(tokens: np.ndarray, task: TaskTokens) -> list[tuple[int, int]]:
    """(position of the answer token, distance back to where the fact was defined) for every query
    of a document whose key was defined earlier in it."""
    tokens = tokens.tolist()
    defined: dict[int, int] = {}  # key -> position of the definition's value (or fact token)
    queries = []
    for i, token in enumerate(tokens[:-2]):
        if token == task.define:  # put VALUE KEY
            defined[tokens[i + 2]] = i + 1
        elif token in task.facts:  # KEY=VALUE
            defined[task.facts[token]] = i
        elif token == task.query and tokens[i + 1] in defined:  # get KEY VALUE
            queries.append((i + 2, i + 2 - defined[tokens[i + 1]]))
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

    def accuracy(self) -> float:
        """Over all queries."""
        correct, total = (sum(row[i] for row in self.buckets.values()) for i in (0, 1))
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
    task: TaskTokens,
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
                queries[document] = find_queries(tokens, task)
            for answer, distance in queries[document]:
                # the answer is the label of input position answer - 1
                i = answer - 1 - offset
                if 0 <= i < batch.tokens.shape[1] and batch.loss_mask[slot, i] > 0:
                    label = int(batch.labels[slot, i])
                    result.add(distance, int(predicted[slot, i]) == label, float(probabilities[slot, i, label]))
    return result


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
    add_checkpoint_arguments(parser, "recall-task dataset prefix")
    parser.add_argument("--slots", type=positive_int, help="documents streamed side by side (default: as in training)")
    parser.add_argument("--max-steps", type=positive_int, help="stop after this many segments per slot (default: all)")
    parser.add_argument("--out", type=output_folder,
                        help="directory for recall.json and recall.png (default: runs/eval/<run>)")
    args = parser.parse_args(argv)

    loaded = load_checkpoint_argument(args, parser, slots=args.slots)
    model = loaded.config.model
    data = evaluation_data(loaded, args.data, parser)
    task = task_tokens(data)
    if model.memory_layers:
        conditions = {"with memory": contextlib.nullcontext, "memory disabled": loaded.memories.disabled}
    else:
        conditions = {"no memory layer": contextlib.nullcontext}
    results = {}
    for name, condition in conditions.items():
        stream = DocumentStream(data, model.memory_slots, model.segment_length, loop=False)
        with condition():
            results[name] = recall_accuracy(loaded.model_chunks, loaded.memories, stream, task, args.max_steps)

    names = list(results)
    rows = [
        [f"{r['tokens_from']}-{r['tokens_to']}", f"{r['segments_from']}-{r['segments_to']}", r["queries"],
         *(f"{100 * results[n].rows()[i]['accuracy']:.1f}" for n in names)]
        for i, r in enumerate(results[names[0]].rows())
    ]
    rows.append(["all", "", sum(r[2] for r in rows), *(f"{100 * results[n].accuracy():.1f}" for n in names)])
    print(f"{loaded.path} on {data}: recall accuracy (%) by distance; chance {100 / task.num_values:.1f}%")
    print(table(["tokens back", "segments back", "queries", *names], rows))

    out = args.out or Path("runs/eval") / loaded.path.parent.parent.name
    summary = dict(
        checkpoint=str(loaded.path), step=loaded.step, data=data, segment_length=model.segment_length,
        memory_size=model.memory_size, chance=1 / task.num_values,
        results={n: dict(accuracy=r.accuracy(), by_distance=r.rows()) for n, r in results.items()},
    )
    print(f"wrote {write_json(out / 'recall.json', summary)}")
    title = f"recall by distance, {loaded.path.parent.parent.name} step {loaded.step} (segment {model.segment_length})"
    print(f"wrote {plot(results, 1 / task.num_values, out / 'recall.png', title)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
