"""JSONL documents -> Megatron indexed dataset (prefix.bin/.idx) + manifest (prefix.json).

Each JSONL line becomes one Megatron document of one sequence, its tokens followed by the
tokenizer's end-of-document id (Megatron-LM's `--append-eod` convention), so Megatron-LM's own
tools read the files too. Worker processes tokenize ~0.5 MB blocks of lines; the parent writes
them in input order, so the output does not depend on the number of workers.
"""

import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron_memorizing.data.atomic import atomic_path
from megatron_memorizing.data.errors import DataError
from megatron_memorizing.data.indexed import check_indexed_files
from megatron_memorizing.data.manifest import DatasetManifest, files_sha256, manifest_path, write_manifest
from megatron_memorizing.data.tokenizer import Tokenizer, file_sha256, load_tokenizer

from .stats import length_summary

_BLOCK_BYTES = 1 << 19


def _blocks(path: Path):
    """(first line number, [raw lines]) in blocks of about _BLOCK_BYTES."""
    block, size, first = [], 0, 1
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            block.append(line)
            size += len(line)
            if size >= _BLOCK_BYTES:
                yield first, block
                block, size, first = [], 0, number + 1
    if block:
        yield first, block


_worker = {}


def _start_worker(model_path: str, jsonl_name: str, dtype) -> None:
    # The parent stops its workers with SIGTERM and handles Ctrl-C itself; an ignored SIGTERM
    # survives even a fresh interpreter, so a worker sets both, whatever its caller had.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker.update(tokenizer=load_tokenizer(model_path), name=jsonl_name, dtype=dtype)


def _tokenize_block(job):
    """Token arrays (end-of-document appended) of a block's documents, and its sizes."""
    first, lines = job
    tokenizer, name = _worker["tokenizer"], _worker["name"]
    eod = [] if tokenizer.eod_id is None else [tokenizer.eod_id]
    documents, text_bytes, empty = [], 0, 0
    for number, raw in enumerate(lines, start=first):
        where = f"{name} line {number}"
        try:
            text = json.loads(raw.decode("utf-8"))["text"]
            if not isinstance(text, str):
                raise TypeError(f"'text' is {type(text).__name__}, not a string")
            text_bytes += len(text.encode("utf-8"))  # also rejects lone surrogates escaped in the JSON
        except UnicodeError as error:
            raise DataError(
                f"{where}: invalid UTF-8 ({error.reason} at byte {error.start}); re-create the JSONL with "
                "`megatron-memorizing-data corpus` (it skips files that are not UTF-8) or fix that document"
            ) from None
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f'{where}: not a JSON object with a "text" string ({error!r})') from None
        if not text:
            empty += 1
            continue
        documents.append(np.asarray(tokenizer.encode(text) + eod, dtype=_worker["dtype"]))
    return documents, sum(map(len, lines)), text_bytes, empty


@dataclass
class _Totals:
    max_token_id: int = -1
    text_bytes: int = 0
    empty: int = 0


def _place_tokenizer(tokenizer: Tokenizer, out_dir: Path, force: bool) -> Path:
    """The dataset's own copy of its tokenizer (tokenizer.model, or tokenizer.json with its
    tokenizer_config.json), shared by the splits written to one directory; returns the main file."""
    (name, source), *companions = tokenizer.files().items()
    copy = out_dir / name
    if copy.is_file() and file_sha256(copy) != tokenizer.sha256:
        if not force:
            raise DataError(
                f"{copy} is a different tokenizer, used by the datasets already in {out_dir}: write to another "
                "directory, or pass --force to replace it (those datasets then fail their compatibility check)"
            )
    for target, origin in [(copy, source)] + [(out_dir / n, f) for n, f in companions]:
        if not target.is_file() or file_sha256(target) != file_sha256(origin):
            with atomic_path(target) as tmp:
                shutil.copyfile(origin, tmp)
    return copy


def preprocess(
    jsonl, tokenizer_path, out_prefix, split: str | None = None, workers: int = 1,
    corpus_stats: dict | None = None, command: str = "", force: bool = False,
) -> DatasetManifest:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    jsonl, out_prefix = Path(jsonl), Path(out_prefix)
    tokenizer = load_tokenizer(tokenizer_path)
    if not jsonl.is_file():
        raise DataError(f"input {jsonl} does not exist; build it with `megatron-memorizing-data corpus`")
    outputs = [Path(f"{out_prefix}{ext}") for ext in (".bin", ".idx")] + [manifest_path(out_prefix)]
    if any(p.exists() for p in outputs) and not force:
        raise DataError(f"{out_prefix}.bin/.idx/.json exist; pass --force to overwrite them")
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    tokenizer_copy = _place_tokenizer(tokenizer, out_prefix.parent, force)
    manifest_path(out_prefix).unlink(missing_ok=True)  # from here on the old manifest is wrong
    dtype = DType.optimal_dtype(tokenizer.vocab_size)

    totals, lengths, start = _Totals(), [], time.perf_counter()
    tmp_prefix = out_prefix.parent / f".{out_prefix.name}.tmp-{os.getpid()}"
    tmp_bin, tmp_idx = Path(f"{tmp_prefix}.bin"), Path(f"{tmp_prefix}.idx")
    init = (str(tokenizer.path), jsonl.name, dtype)
    try:
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        with tqdm(total=jsonl.stat().st_size, unit="B", unit_scale=True, desc=f"tokenize {jsonl.name}") as bar:
            if workers > 1:
                # Fresh interpreters, not forks: the caller may have threads (torch, tqdm, a test
                # runner), and a fork taken while one holds a lock can leave a worker stuck for good.
                pool = get_context("spawn").Pool(workers, initializer=_start_worker, initargs=init)
                results = pool.imap(_tokenize_block, _blocks(jsonl))
            else:
                pool = None
                _start_worker(*init)
                results = map(_tokenize_block, _blocks(jsonl))
            try:
                for documents, raw_bytes, text_bytes, empty in results:
                    for tokens in documents:
                        builder.add_document(tokens, [len(tokens)])
                        lengths.append(len(tokens))
                        totals.max_token_id = max(totals.max_token_id, int(tokens.max()))
                    totals.text_bytes += text_bytes
                    totals.empty += empty
                    bar.update(raw_bytes)
            finally:
                if pool is not None:
                    pool.terminate()
                    pool.join()
        if not lengths:
            raise DataError(f"{jsonl} holds no non-empty documents: empty corpus, nothing to preprocess")
        builder.finalize(str(tmp_idx))
        check_indexed_files(tmp_prefix)
        os.replace(tmp_bin, f"{out_prefix}.bin")
        os.replace(tmp_idx, f"{out_prefix}.idx")
    finally:
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    total_tokens = int(sum(lengths))
    manifest = DatasetManifest(
        split=split or out_prefix.name,
        documents=len(lengths),
        tokens=total_tokens,
        max_token_id=totals.max_token_id,
        dtype=np.dtype(dtype).name,
        vocab_size=tokenizer.vocab_size,
        eod_id=tokenizer.eod_id,
        tokenizer_file=tokenizer_copy.name,
        tokenizer_sha256=tokenizer.sha256,
        source=str(jsonl),
        command=command,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        files_sha256=files_sha256(out_prefix),
        corpus_stats=dict(corpus_stats or {}, tokens=length_summary(lengths), empty_documents_skipped=totals.empty),
        throughput=dict(
            workers=workers,
            seconds=round(seconds, 3),
            text_mb=round(totals.text_bytes / 1e6, 3),
            mb_per_s=round(totals.text_bytes / 1e6 / seconds, 3),
            tokens_per_s=round(total_tokens / seconds),
        ),
    )
    write_manifest(out_prefix, manifest)
    return manifest
