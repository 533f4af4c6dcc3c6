"""Perplexity of a trained checkpoint on held-out documents: by memory size, without memory, and
by position in the document.

    megatron-memorizing-eval --checkpoint runs/tiny-cpu/checkpoints --memory-sizes 2048 8192 32768

Documents are streamed exactly as in training (one per slot, segment after segment, memory reset
at each new document). Each memory size is a separate pass over the same documents; sizes larger
than in training are allowed (the paper's evaluation at 65K after training at 8K), as memory is
not a parameter. Writes a table to the terminal and perplexity.json / perplexity.png to --out;
perplexity.json is rewritten after every pass, so an interrupted evaluation keeps what it measured.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable, Optional

from megatron_memorizing.cli_arguments import output_folder, positive_int
from megatron_memorizing.data import DocumentStream, dataset_tokenizer_path, load_tokenizer, read_manifest
from megatron_memorizing.eval.loading import (
    LoadedModel,
    add_checkpoint_arguments,
    evaluation_data,
    load_checkpoint_argument,
)
from megatron_memorizing.eval.long_range import LongRangeTokens
from megatron_memorizing.eval.perplexity import POSITION_EDGES, Perplexity, evaluate, perplexity_of
from megatron_memorizing.eval.report import new_figure, save_figure, table, write_json

NO_MEMORY = "no memory"


def memory_label(size: int) -> str:
    return f"memory {size:,}"


def reference_label(window: int) -> str:
    return f"local window {window:,}, no memory"


def evaluate_conditions(loaded: LoadedModel, data: str, memory_sizes: list[int], max_steps=None, progress=False,
                        long_range_context: int = 4, reference: Optional[LoadedModel] = None,
                        on_result: Callable[[dict[str, Perplexity]], None] = lambda results: None,
                        ) -> dict[str, Perplexity]:
    """One pass per memory size, and one with memory disabled, over the same documents; with
    `reference` (the same checkpoint loaded to read longer segments), one more pass of it with
    memory disabled: the long-context model the memory stands in for. `on_result` is called with
    the results so far after every pass (a long evaluation keeps what it has measured)."""
    bytes_per_id = load_tokenizer(dataset_tokenizer_path(data, read_manifest(data))).bytes_per_id()
    layout = loaded.config.model  # long-range tokens are those beyond *this* model's local attention

    def run(model: LoadedModel) -> Perplexity:
        config = model.config.model
        stream = DocumentStream(data, config.memory_slots, config.segment_length, loop=False)
        long_range = LongRangeTokens(layout.memory_slots, layout.segment_length, n=long_range_context,
                                     window=2 if layout.xl_cache else 1)
        # The same tokens in every pass: `max_steps` counts segments of this model's length.
        steps = None if max_steps is None else max_steps * layout.segment_length // config.segment_length
        return evaluate(model.model_chunks, model.memories, stream, steps, progress=progress,
                        bytes_per_id=bytes_per_id, long_range=long_range)

    results = {}

    def measure(name: str, model: LoadedModel) -> None:
        results[name] = run(model)
        on_result(results)

    if layout.memory_layers:
        for size in memory_sizes:
            loaded.memories.resize(size)
            measure(memory_label(size), loaded)
        with loaded.memories.disabled():
            measure(NO_MEMORY, loaded)
    else:
        measure(NO_MEMORY, loaded)
    if reference is not None:
        with reference.memories.disabled():
            measure(reference_label(reference.config.model.segment_length), reference)
    return results


def load_reference(args: argparse.Namespace, parser: argparse.ArgumentParser) -> LoadedModel:
    """The checkpoint again, reading segments of `--reference-window` tokens with no XL cache."""
    return load_checkpoint_argument(args, parser, slots=args.slots, overrides=[
        f"model.segment_length={args.reference_window}", "model.xl_cache=false"])


def bucket_end(start: int) -> int:
    """The first position after the bucket starting at `start` (the last bucket: twice its start)."""
    i = POSITION_EDGES.index(start) + 1
    return POSITION_EDGES[i] if i < len(POSITION_EDGES) else 2 * start


def position_rows(results: dict[str, Perplexity]) -> list[list[str]]:
    """Rows 'positions | tokens | perplexity per condition' for buckets with tokens."""
    names = list(results)
    starts = sorted(start for start, (_, n) in results[names[0]].by_position.items() if n > 0)
    rows = []
    for start in starts:
        tokens = results[names[0]].by_position[start][1]
        cells = [f"{perplexity_of(s / n):.3f}" for s, n in (results[name].by_position[start] for name in names)]
        rows.append([f"{start}-{bucket_end(start) - 1}", f"{tokens:,.0f}", *cells])
    return rows


def long_range_rows(results: dict[str, Perplexity]) -> list[list[str]]:
    """Rows 'segments back | tokens | loss per condition': the repeats inside local attention's view
    first (what the model copies without memory), then long-range tokens by distance, and their total."""
    def row(label: str, sums: list[tuple[float, float]]) -> list[str]:  # (loss sum, tokens) per condition
        return [label, f"{sums[0][1]:,.0f}", *(f"{s / n:.4f}" for s, n in sums)]

    first = next(iter(results.values()))
    rows = []
    if first.repeated_locally[1]:
        rows.append(row("0 (local)", [r.repeated_locally for r in results.values()]))
    for start in sorted(first.long_range):
        rows.append(row(f"{start}-{2 * start - 1}", [r.long_range[start] for r in results.values()]))
    if first.long_range:
        rows.append(row("all", [tuple(map(sum, zip(*r.long_range.values()))) for r in results.values()]))
    return rows


def summary(loaded: LoadedModel, data: str, results: dict[str, Perplexity]) -> dict:
    baseline = results.get(NO_MEMORY)
    return dict(
        checkpoint=str(loaded.path),
        step=loaded.step,
        data=data,
        training_memory_size=loaded.config.model.memory_size if loaded.config.model.memory_layers else 0,
        segment_length=loaded.config.model.segment_length,
        results={
            name: dict(
                loss=r.loss, perplexity=r.perplexity, bits_per_byte=r.bits_per_byte, tokens=r.tokens,
                text_bytes=r.text_bytes,
                change_vs_no_memory=(r.perplexity / baseline.perplexity - 1) if baseline else None,
                by_position=[
                    dict(start=start, perplexity=ppl, tokens=n) for start, ppl, n in r.position_table()
                ],
                long_range_by_segments_back=[
                    dict(start=start, loss=s / n, tokens=n) for start, (s, n) in sorted(r.long_range.items())
                ],
                repeated_locally=dict(loss=r.repeated_locally[0] / max(r.repeated_locally[1], 1.0),
                                      tokens=r.repeated_locally[1]),
            )
            for name, r in results.items()
        },
    )


def plot_by_position(curves: dict[str, tuple[list[tuple[int, float]], bool]], path: Path, title: str) -> Path:
    """One line per name: (bucket start, perplexity) points, and whether to dash the line."""
    figure, axes = new_figure()
    draw_by_position(axes, curves, title)
    return save_figure(figure, path)


def draw_by_position(axes, curves: dict[str, tuple[list[tuple[int, float]], bool]], title: str) -> None:
    shown = 0
    for name, (points, dashed) in curves.items():
        points = [(start, ppl) for start, ppl in points if math.isfinite(ppl)]  # a diverged model's inf has no place
        shown += len(points)
        # Buckets [0, 1), [1, 2), [2, 4), ...: plotted at their end, which a log axis can show.
        axes.plot([bucket_end(start) for start, _ in points], [ppl for _, ppl in points], marker="o",
                  label=name, linestyle="--" if dashed else "-")
    if shown:  # log axes cannot scale an empty plot
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
    axes.set_xlabel("position in the document (tokens, bucket end)")
    axes.set_ylabel("perplexity")
    axes.set_title(title)
    axes.legend()


def plot(results: dict[str, Perplexity], path: Path, title: str) -> Path:
    curves = {name: ([(start, ppl) for start, ppl, _ in r.position_table()], name == NO_MEMORY)
              for name, r in results.items()}
    return plot_by_position(curves, path, title)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-memorizing-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser, "dataset prefix to evaluate on")
    parser.add_argument("--memory-sizes", type=positive_int, nargs="+",
                        help="memory sizes to evaluate at (default: the training memory size)")
    parser.add_argument("--slots", type=positive_int, help="documents streamed side by side (default: as in training)")
    parser.add_argument("--max-steps", type=positive_int,
                        help="stop after this many segments per slot (default: all documents)")
    parser.add_argument("--long-range-context", type=positive_int, default=4, metavar="N",
                        help="a token is long-range when it and the N before it last occurred beyond local "
                             "attention (default 4)")
    parser.add_argument("--reference-window", type=positive_int, metavar="TOKENS",
                        help="also evaluate the same model with memory disabled reading segments of TOKENS "
                             "(e.g. segment + memory size): the long-context reference the memory approximates. "
                             "Beyond the segment length it was trained at, its positions are new to the model: "
                             "a model trained at that length is the stronger reference")
    parser.add_argument("--out", type=output_folder,
                        help="directory for perplexity.json and .png (default: runs/eval/<run>)")
    args = parser.parse_args(argv)

    loaded = load_checkpoint_argument(args, parser, slots=args.slots)
    data = evaluation_data(loaded, args.data, parser)
    sizes = args.memory_sizes or [loaded.config.model.memory_size]
    segment = loaded.config.model.segment_length
    if args.reference_window and args.max_steps and (args.max_steps * segment) % args.reference_window:
        parser.error(f"--max-steps {args.max_steps} covers {args.max_steps * segment:,} tokens of each document, "
                     f"not a whole number of --reference-window {args.reference_window} segments: pick a window "
                     f"that divides it, or leave out --max-steps")
    reference = load_reference(args, parser) if args.reference_window else None
    out = args.out or Path("runs/eval") / loaded.path.parent.parent.name
    results = evaluate_conditions(loaded, data, sizes, args.max_steps, progress=True,
                                  long_range_context=args.long_range_context, reference=reference,
                                  on_result=lambda so_far: write_json(out / "perplexity.json",
                                                                      summary(loaded, data, so_far)))

    baseline = results.get(NO_MEMORY)
    print(f"{loaded.path} on {data} ({next(iter(results.values())).tokens:,.0f} tokens)")
    print(table(
        ["condition", "loss", "perplexity", "bits per byte", "vs no memory"],
        [[name, f"{r.loss:.4f}", f"{r.perplexity:.3f}", f"{r.bits_per_byte:.4f}",
          f"{100 * (r.perplexity / baseline.perplexity - 1):+.2f}%" if baseline else ""]
         for name, r in results.items()],
    ))
    print("\nperplexity by position in the document")
    print(table(["positions", "tokens", *results], position_rows(results)))
    print(f"\nloss on long-range tokens (they and the {args.long_range_context} before them last seen beyond local "
          "attention), by segments back; 0 (local): last seen inside it")
    print(table(["segments back", "tokens", *results], long_range_rows(results)))

    print(f"\nwrote {out / 'perplexity.json'}")
    title = f"{loaded.path.parent.parent.name} step {loaded.step}: perplexity by position"
    print(f"wrote {plot(results, out / 'perplexity.png', title)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
