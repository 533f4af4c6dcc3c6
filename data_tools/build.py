"""One corpus end to end: source files -> JSONL splits -> SentencePiece -> .bin/.idx per split.

Layout of OUT: corpus/{train,validation,test}.jsonl and corpus/stats.json, tokenizer.model,
{train,validation,test}.{bin,idx,json}, and build.json, written last, recording the options.
Re-running with the same options finds build.json and reports instead of rebuilding; different
options, or an OUT that holds other files, need --force. A build into a new or empty OUT that
fails (a source of binary files, a vocabulary too large for it) removes what it wrote, so that the
rerun starts from the same empty OUT: such an OUT is marked (megatron_memorizing/owned.py PARTIAL)
before anything is written into it, and the marker is removed once build.json is written.
"""

import json
from pathlib import Path

from megatron_memorizing import owned
from megatron_memorizing.data.atomic import atomic_path
from megatron_memorizing.data.errors import DataError
from megatron_memorizing.data.manifest import check_compatible, read_manifest
from megatron_memorizing.data.tokenizer import SENTENCEPIECE_FILE, load_tokenizer

from .corpus import SPLITS, build_corpus
from .fetch import DEFAULT_CACHE
from .preprocess import preprocess
from .sources import resolve_source
from .stats import corpus_report, dataset_report
from .train_tokenizer import train_tokenizer

BUILD_RECORD = "build.json"


# Options added after builds were made: a build.json without one was made with this value.
_LATER_OPTIONS = {"document_unit": "file"}


def build_options(
    preset="stdlib", source_dirs=(), packages=(), patterns=(), validation_fraction=0.05, test_fraction=0.05,
    min_chars=200, vocab_size=8000, model_type="bpe", tokenizer=None, document_unit="file",
) -> dict:
    """The options that determine a build's content (not how fast or where it is made)."""
    return dict(
        preset=preset, source_dirs=[str(Path(d).resolve()) for d in source_dirs], packages=list(packages),
        patterns=list(patterns), validation_fraction=validation_fraction, test_fraction=test_fraction,
        min_chars=min_chars, vocab_size=None if tokenizer else vocab_size, model_type=None if tokenizer else model_type,
        tokenizer_sha256=load_tokenizer(tokenizer).sha256 if tokenizer else None, document_unit=document_unit,
    )


def _nonempty_splits(stats: dict) -> list[str]:
    return [split for split in SPLITS if stats["splits"][split]["chars"]["count"]]


def report(out_dir: Path) -> str:
    stats = json.loads((out_dir / "corpus" / "stats.json").read_text())
    manifests = {}
    for split in _nonempty_splits(stats):
        manifest = read_manifest(out_dir / split)
        manifests[split] = check_compatible(out_dir / split, manifest.vocab_size)
    lines = [corpus_report(stats), dataset_report(manifests)]
    for split, m in manifests.items():
        t = m.throughput
        lines.append(
            f"{split}: {out_dir / split}.bin/.idx, {m.documents:,} documents, {m.tokens:,} tokens "
            f"(preprocessed {t['text_mb']} MB in {t['seconds']} s with {t['workers']} workers: "
            f"{t['mb_per_s']} MB/s, {t['tokens_per_s']:,} tokens/s)"
        )
    lines.append(f"tokenizer: {out_dir / manifests['train'].tokenizer_file} (vocab {manifests['train'].vocab_size})")
    return "\n".join(lines)


def build(
    out_dir, options: dict, tokenizer=None, workers: int = 1, cache_dir=DEFAULT_CACHE, force=False, command=""
) -> str:
    """Build (or find up to date) the datasets in `out_dir`; return the report. `tokenizer`: an
    existing SentencePiece model to use instead of training one (its hash is in `options`)."""
    out_dir = Path(out_dir)
    record = out_dir / BUILD_RECORD
    if record.is_file() and not force:
        previous = {**_LATER_OPTIONS, **json.loads(record.read_text())["options"]}
        if previous == options:
            return f"{out_dir} is up to date (same options; --force rebuilds)\n" + report(out_dir)
        changed = ", ".join(f"{k}: {previous.get(k)!r} -> {v!r}" for k, v in options.items() if previous.get(k) != v)
        raise DataError(
            f"{out_dir} was built with other options ({changed}): pass --force to rebuild, or use another --out"
        )
    if out_dir.exists() and any(out_dir.iterdir()) and not record.is_file() and not force:
        raise DataError(f"{out_dir} is not empty and holds no finished build: pass --force to build there anyway")
    record.unlink(missing_ok=True)
    existed = out_dir.exists()
    ours = not existed or not any(out_dir.iterdir())  # then all that OUT will hold is this build's
    if ours and existed:  # marked first: what a failed build leaves is recognisably its own
        owned.mark(out_dir)
    elif ours:
        owned.make_marked_dir(out_dir)
    try:
        _build(out_dir, options, tokenizer, workers, cache_dir, command)
    except BaseException:
        # Else a rerun would find OUT not empty, without build.json, and demand --force. The
        # directory itself stays if it was there before; what cannot be removed stays marked.
        if ours:
            owned.discard(out_dir, keep_folder=existed)
        raise
    (out_dir / owned.PARTIAL).unlink(missing_ok=True)  # finished: build.json is written
    return report(out_dir)


def _build(out_dir: Path, options: dict, tokenizer, workers: int, cache_dir, command: str) -> None:
    """Corpus, tokenizer, datasets, then build.json: the build itself, into `out_dir`."""
    source = resolve_source(
        options["preset"], options["source_dirs"], options["packages"], options["patterns"], cache_dir
    )
    stats = build_corpus(
        source, out_dir / "corpus", options["validation_fraction"], options["test_fraction"], options["min_chars"],
        options["document_unit"],
    )
    if tokenizer is None:
        tokenizer = train_tokenizer(
            [out_dir / "corpus" / "train.jsonl"], out_dir / SENTENCEPIECE_FILE,
            options["vocab_size"], options["model_type"]
        ).path
    for split in _nonempty_splits(stats):
        preprocess(
            out_dir / "corpus" / f"{split}.jsonl", tokenizer, out_dir / split, split, workers,
            corpus_stats=stats["splits"][split], command=command, force=True,
        )
    with atomic_path(out_dir / BUILD_RECORD) as tmp:
        tmp.write_text(json.dumps(dict(options=options, command=command), indent=2) + "\n")
