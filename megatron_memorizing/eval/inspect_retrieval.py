"""What the memory retrieves, where it matters: for one document, the tokens whose loss memory
lowers most (loss with memory against loss with memory disabled), and for each the neighbours
every head of the memory layer retrieved, decoded as text with their distance back.

    python -m megatron_memorizing.eval.inspect_retrieval --checkpoint runs/recall-tiny/checkpoints --document 0

Prints the tokens to the terminal and writes an HTML page (--html) with the same content.
The document is streamed alone (one slot), segment after segment, as in training.
"""

from __future__ import annotations

import argparse
import html
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_memorizing.cli_arguments import non_negative_int, output_file, positive_int
from megatron_memorizing.data import DocumentStream, Tokenizer, dataset_tokenizer_path, load_tokenizer, read_manifest
from megatron_memorizing.eval.loading import (
    LoadedModel,
    add_checkpoint_arguments,
    evaluation_data,
    forward_logits,
    load_checkpoint_argument,
    token_losses,
)
from megatron_memorizing.observations import watch_retrievals


@dataclass
class Neighbour:
    head: int
    position: int  # of the retrieved (key, value) pair's token in the document
    distance: int  # tokens back from the query
    score: float  # cosine similarity of query and key


@dataclass
class Highlight:
    position: int  # input position; its prediction is the token at position + 1
    loss_with_memory: float
    loss_without_memory: float
    neighbours: list[Neighbour]

    @property
    def gain(self) -> float:
        return self.loss_without_memory - self.loss_with_memory


@dataclass
class Inspection:
    document: int
    tokens: list[int]  # the whole document
    segment_length: int
    layer: int
    gates: list[float]  # per head of the inspected layer
    loss_with_memory: float  # mean over the document
    loss_without_memory: float
    highlights: list[Highlight]  # best first


@torch.no_grad()
def inspect_document(loaded: LoadedModel, data: str, document: int, top: int = 10, per_head: int = 3) -> Inspection:
    """Stream document `document` of `data` through a one-slot model twice per segment (memory
    disabled, then with memory, recording retrievals), then pick the `top` tokens by loss gain."""
    memories = loaded.memories
    if memories.micro_batch_size != 1 or not memories.knn_layers:
        raise ValueError("inspection needs a model with a memory layer, loaded with slots=1")
    layer = memories.knn_layers[0]
    stream = DocumentStream(data, 1, loaded.config.model.segment_length, loop=False)
    tokens, with_memory, without_memory, positions, scores = [], [], [], [], []
    retrieved = None

    def keep(number, found):  # the first memory layer's retrieval of the segment with memory
        nonlocal retrieved
        if number == layer.layer_number:
            retrieved = found

    with watch_retrievals(loaded.model_chunks, keep):
        for batch in stream:
            current = int(batch.document_ids[0])
            if current < document:
                continue
            if current > document or current < 0:
                break
            with memories.disabled():
                without_memory.append(token_losses(forward_logits(loaded.model_chunks, memories, batch), batch)[0])
            with_memory.append(token_losses(forward_logits(loaded.model_chunks, memories, batch), batch)[0])
            memories.commit()
            # [1, h, q, k], best first
            positions.append(retrieved.positions[0, :, :, :per_head])
            scores.append(retrieved.scores[0, :, :, :per_head])
            n = int(batch.loss_mask[0].sum())
            tokens += batch.tokens[0, :n].tolist()
            last_label = int(batch.labels[0, n - 1])
    if not tokens:
        raise ValueError(f"{data} has no document {document} with at least two tokens")
    tokens.append(last_label)
    n = len(tokens) - 1
    loss_with, loss_without = torch.cat(with_memory)[:n], torch.cat(without_memory)[:n]
    positions, scores = torch.cat(positions, dim=1)[:, :n], torch.cat(scores, dim=1)[:, :n]

    highlights = []
    for p in torch.argsort(loss_without - loss_with, descending=True)[:top].tolist():
        neighbours = [
            Neighbour(head, int(m), p - int(m), float(s))
            for head in range(positions.shape[0])
            for m, s in zip(positions[head, p].tolist(), scores[head, p].tolist())
            if m >= 0
        ]
        highlights.append(Highlight(p, float(loss_with[p]), float(loss_without[p]), neighbours))
    return Inspection(
        document, tokens, loaded.config.model.segment_length, layer.layer_number, layer.gate.tolist(),
        float(loss_with.mean()), float(loss_without.mean()), highlights,
    )


# --- rendering ---------------------------------------------------------------------------------------
class Renderer:
    """Decoded snippets: `context` tokens up to a position, the position's token marked."""

    def __init__(self, tokenizer: Tokenizer, tokens: list[int], context: int):
        self.tokenizer, self.tokens, self.context = tokenizer, tokens, context

    def pieces(self, position: int) -> tuple[str, str, str]:
        """(text before, the token at position, the token after it)."""
        before = self.tokens[max(0, position - self.context) : position]
        after = self.tokens[position + 1 : position + 2]
        return tuple(self.tokenizer.decode(ids) for ids in (before, [self.tokens[position]], after))

    def plain(self, position: int) -> str:
        before, token, after = (_one_line(s) for s in self.pieces(position))
        return f"…{before}[{token}]{after}"

    def html(self, position: int) -> str:
        before, token, after = (html.escape(s) for s in self.pieces(position))
        return f"…{before}<mark>{token}</mark><span class=next>{after}</span>"


def _one_line(text: str) -> str:
    return text.replace("\n", "↵")


def render_text(inspection: Inspection, renderer: Renderer, title: str) -> str:
    gates = " ".join(f"h{h}:{g:.2f}" for h, g in enumerate(inspection.gates))
    lines = [
        title,
        f"document {inspection.document}: {len(inspection.tokens):,} tokens, segments of {inspection.segment_length}; "
        f"memory layer {inspection.layer}, gates {gates}",
        f"mean loss with memory {inspection.loss_with_memory:.4f}, "
        f"memory disabled {inspection.loss_without_memory:.4f}",
        "",
    ]
    for rank, h in enumerate(inspection.highlights, start=1):
        lines.append(
            f"#{rank:<2} position {h.position:>6}  loss {h.loss_without_memory:6.3f} -> {h.loss_with_memory:6.3f} "
            f"with memory   {renderer.plain(h.position)}  predicts {_one_line(renderer.pieces(h.position + 1)[1])!r}"
        )
        for n in h.neighbours:
            lines.append(
                f"      head {n.head}  {n.distance:>7,} back  score {n.score:5.2f}  {renderer.plain(n.position)}"
            )
    return "\n".join(lines)


_STYLE = """body{font-family:sans-serif;margin:2em} td,th{padding:2px 8px;vertical-align:top;text-align:left}
code{white-space:pre-wrap;font-family:monospace} mark{background:#ffd54f} .next{color:#999}
tr.token{border-top:2px solid #444} tr.token td{padding-top:8px;font-weight:bold} table{border-collapse:collapse}"""


def render_html(inspection: Inspection, renderer: Renderer, title: str) -> str:
    gates = ", ".join(f"head {h}: {g:.2f}" for h, g in enumerate(inspection.gates))
    rows = []
    for rank, h in enumerate(inspection.highlights, start=1):
        target = html.escape(renderer.pieces(h.position + 1)[1])
        rows.append(
            f"<tr class=token><td>#{rank}</td><td>position {h.position}</td>"
            f"<td>{h.loss_without_memory:.3f} &rarr; {h.loss_with_memory:.3f}</td>"
            f"<td><code>{renderer.html(h.position)}</code> predicts <code>{target}</code></td></tr>"
        )
        rows += [
            f"<tr><td></td><td>head {n.head}</td><td>{n.distance:,} back, score {n.score:.2f}</td>"
            f"<td><code>{renderer.html(n.position)}</code></td></tr>"
            for n in h.neighbours
        ]
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>"
        f"<p>Document {inspection.document}: {len(inspection.tokens):,} tokens, segments of "
        f"{inspection.segment_length}. Memory layer {inspection.layer}; gates {gates}. Mean loss with memory "
        f"{inspection.loss_with_memory:.4f}, memory disabled {inspection.loss_without_memory:.4f}.</p>"
        f"<p>The tokens whose loss memory lowers most (loss memory disabled &rarr; with memory); under each, "
        f"the neighbours every head retrieved, best first, with the retrieved token marked.</p>"
        f"<table><tr><th></th><th></th><th>loss</th><th>text</th></tr>{''.join(rows)}</table></body></html>\n"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_memorizing.eval.inspect_retrieval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser, "dataset prefix")
    parser.add_argument("--document", type=non_negative_int, default=0,
                        help="document index in the dataset (default 0)")
    parser.add_argument("--top", type=positive_int, default=10, help="tokens to show (default 10)")
    parser.add_argument("--neighbours", type=positive_int, default=2, help="neighbours per head (default 2)")
    parser.add_argument("--context", type=non_negative_int, default=8,
                        help="tokens of text before each marked token (default 8)")
    parser.add_argument("--html", type=output_file,
                        help="HTML page to write (default: runs/eval/<run>/retrieval-<document>.html)")
    args = parser.parse_args(argv)

    loaded = load_checkpoint_argument(args, parser, slots=1)
    data = evaluation_data(loaded, args.data, parser)
    inspection = inspect_document(loaded, data, args.document, args.top, args.neighbours)
    renderer = Renderer(
        load_tokenizer(dataset_tokenizer_path(data, read_manifest(data))), inspection.tokens, args.context
    )
    title = f"Retrieval in {data}, document {args.document}: {loaded.path}"
    print(render_text(inspection, renderer, title))
    page = args.html or Path("runs/eval") / loaded.path.parent.parent.name / f"retrieval-{args.document}.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render_html(inspection, renderer, title))
    print(f"\nwrote {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
