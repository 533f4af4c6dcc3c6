"""A synthetic long-document recall task: facts defined early, queried many segments later.

A document is a program-like list of statements:

    put v05 k317 v05    stores a random value under key k317 (new in this document)
    get k317 v05        queries a key stored earlier; the value is the answer
    pass                filler, once every key of the vocabulary is used

How a definition is written is the `format` (docs/results.md compares them):
- "echo", `put v05 k317 v05`: the repeated value is predictable from the token before the key, so
  a previous-token feature pays off at once; the key token then carries its value, and a query
  finds the fact by its key token. The only format a small model learned within the CPU budget.
- "statements", `put v05 k317`: the same lookup without that early reward.
- "facts", one token `k317=v05`: no composition at all, but one embedding to learn per fact.

Keys and values are drawn afresh for every document, so a value can only be known by reading
back to its definition. Every key is queried at most once, so the distance from a query to its
answer is the distance to the definition, spread log-uniformly over the document so far: many lie
inside the local segment (local attention can answer them, which teaches the layer the lookup:
a curriculum built into every document), many lie tens of segments back, where only memory can
reach.

Documents go through the project's own data pipeline: JSONL, a SentencePiece model in which
every task word is one piece, then `preprocess` into .bin/.idx with a manifest.

    python -m data_tools.recall_task --out data/recall
"""

from __future__ import annotations

import argparse
import io
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import sentencepiece as spm

from megatron_memorizing.cli_arguments import non_negative_int, output_folder, positive_int
from megatron_memorizing.data.atomic import atomic_path
from megatron_memorizing.data.recall_task import DEFINE, FORMATS, PASS, QUERY, RecallSpec
from megatron_memorizing.data.tokenizer import SENTENCEPIECE_FILE, SentencePieceTokenizer

from .preprocess import preprocess
from .train_tokenizer import EXACT_SETTINGS

SPLITS = {"train": 0, "validation": 1, "test": 2}  # split -> seed offset, so splits never share documents


def generate_document(spec: RecallSpec, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(operation, key, value) statements (RecallSpec.statement_words writes them out).

    Statement i is a query with probability i / statements (definitions early, queries late), and
    it asks for the open key (defined, not yet queried) defined nearest to a time a log-uniform
    distance back: every scale of distance, from the previous statement (or min_back statements)
    to the document's start (or max_back statements), gets about the same share of queries. With no key open within
    reach, the statement is a definition, or `pass` once every key is defined. Lead filler (spec.lead_filler) goes
    before all of it."""
    keys, values = spec.keys, spec.values
    unused = list(rng.permutation(len(keys)))
    open_keys: dict[int, int] = {}  # key -> statement index of its definition
    answer: dict[int, int] = {}
    statements = []
    count = int(rng.integers(spec.statements // 2, spec.statements * 3 // 2 + 1))
    for index in range(count):
        reach = min(index, spec.max_back) if spec.max_back else index
        candidates = [k for k, defined in open_keys.items() if index - reach <= defined <= index - spec.min_back]
        if candidates and rng.random() < index / count:
            when = index - math.exp(rng.uniform(math.log(spec.min_back + 1), math.log(reach + 1)))
            key = min(candidates, key=lambda k: abs(open_keys[k] - when))
            del open_keys[key]
            statements.append((QUERY, keys[key], values[answer[key]]))
        elif unused:
            key = unused.pop()
            answer[key] = int(rng.integers(len(values)))
            open_keys[key] = index
            statements.append((DEFINE, keys[key], values[answer[key]]))
        else:
            statements.append((PASS, "", ""))
    if spec.lead_filler:
        statements = [(PASS, "", "")] * int(rng.integers(spec.lead_filler + 1)) + statements
    return statements


def document_words(spec: RecallSpec, statements) -> list[str]:
    return [word for statement in statements for word in spec.statement_words(*statement)]


def generate_split(spec: RecallSpec, documents: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(document_words(spec, generate_document(spec, rng))) for _ in range(documents)]


def train_word_tokenizer(spec: RecallSpec, output_model: Path) -> SentencePieceTokenizer:
    """A SentencePiece model in which every task word is a single piece (user-defined symbols),
    with the project's exact-round-trip settings, so decoded ids read as the task text."""
    # SentencePiece writes spaces as U+2581 internally; symbols must be given that way to match.
    symbols = [word.replace(" ", "\u2581") for word in spec.words]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        # The words alone: every variant of the task (max_back, seeds) gets the same tokenizer,
        # so a model warmed up on one variant reads the others.
        sentence_iterator=iter(["".join(spec.words)]),
        model_writer=model,
        model_type="bpe",
        vocab_size=len(symbols) + 512,  # an upper bound: the meta pieces, bytes and symbols fit below it
        hard_vocab_limit=False,
        user_defined_symbols=symbols,
        max_sentence_length=1 << 20,
        minloglevel=2,
        **EXACT_SETTINGS,
    )
    with atomic_path(output_model) as tmp:
        tmp.write_bytes(model.getvalue())
    tokenizer = SentencePieceTokenizer(output_model)
    words = document_words(spec, generate_document(spec, np.random.default_rng(0)))
    if len(tokenizer.encode("".join(words))) != len(words):
        raise RuntimeError(f"{output_model}: the task words do not encode as one token each")
    return tokenizer


def build(out: Path, spec: RecallSpec, documents: dict[str, int], seed: int = 0, force: bool = False) -> dict:
    """Write OUT/{split}.jsonl, OUT/tokenizer.model and OUT/{split}.bin/.idx/.json for every split."""
    out.mkdir(parents=True, exist_ok=True)
    # Trained straight into the dataset's tokenizer copy, which preprocess then finds identical.
    tokenizer_path = out / SENTENCEPIECE_FILE
    train_word_tokenizer(spec, tokenizer_path)
    for split, count in documents.items():
        if not count:
            continue
        jsonl = out / f"{split}.jsonl"
        texts = generate_split(spec, count, seed=seed * len(SPLITS) + SPLITS[split])
        with atomic_path(jsonl) as tmp, open(tmp, "w") as f:
            for i, text in enumerate(texts):
                f.write(json.dumps({"id": f"recall:{split}:{i}", "source": "recall", "text": text}) + "\n")
        preprocess(jsonl, tokenizer_path, out / split, split=split, workers=1, force=force)
    info = {"spec": asdict(spec), "documents": documents, "seed": seed}
    (out / "recall.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.recall_task", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=output_folder, default=Path("data/recall"),
                        help="output directory (default data/recall)")
    defaults = RecallSpec()
    parser.add_argument("--num-keys", type=positive_int, default=defaults.num_keys)
    parser.add_argument("--num-values", type=positive_int, default=defaults.num_values)
    parser.add_argument("--statements", type=positive_int, default=defaults.statements,
                        help=f"statements per document (default {defaults.statements})")
    parser.add_argument("--max-back", type=non_negative_int, default=0,
                        help="queries reach at most this many statements back (default 0: the whole document)")
    parser.add_argument("--min-back", type=non_negative_int, default=0,
                        help="queries reach at least this many statements back (default 0): far queries only, "
                             "for evaluating on documents longer than in training")
    parser.add_argument("--lead-filler", type=non_negative_int, default=0,
                        help="open each document with 0..N `pass` statements (default 0), so that definitions fall "
                             "at every offset within a segment")
    parser.add_argument("--format", choices=FORMATS, default=defaults.format,
                        help="how definitions are written: statements `put v05 k317` (default), echo "
                             "`put v05 k317 v05`, facts `k317=v05` (one token)")
    parser.add_argument("--train-documents", type=positive_int, default=4000)
    parser.add_argument("--validation-documents", type=positive_int, default=64)
    parser.add_argument("--test-documents", type=positive_int, default=64)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite existing datasets in OUT")
    args = parser.parse_args(argv)
    try:
        spec = RecallSpec(args.num_keys, args.num_values, args.statements, args.max_back, args.min_back, args.format,
                          args.lead_filler)
    except ValueError as error:
        parser.error(str(error))
    documents = {"train": args.train_documents, "validation": args.validation_documents, "test": args.test_documents}
    build(args.out, spec, documents, args.seed, args.force)
    tokenizer = SentencePieceTokenizer(args.out / SENTENCEPIECE_FILE)
    print(f"{args.out}: {documents} documents, vocabulary {tokenizer.vocab_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
