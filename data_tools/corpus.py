"""Source files -> JSONL documents, filtered, de-duplicated and split.

A document is one whole file, or (document_unit="directory") the files of one directory joined in
name order: the paper's code and proof corpora join the files of a repository or library, so that
a document is long and refers back to itself (names defined in one file are used in the next).
Files directly in a source's root stay one document each: a root (the standard library's top
level) is a collection of unrelated modules, not a package.

The split is a hash of the document id, so it does not depend on which other files exist: adding
files to a corpus never moves a document from train into validation. Exact duplicates are removed
before splitting (the copy with the smallest id is kept), so no text is in two splits.
"""

import contextlib
import hashlib
import json
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from megatron_memorizing.data.atomic import atomic_path
from megatron_memorizing.data.errors import DataError

from .filters import generated_reason
from .sources import Source
from .stats import LONG_DOCUMENT_CHARS, length_summary

SPLITS = ("train", "validation", "test")


def split_of(doc_id: str, validation_fraction: float, test_fraction: float) -> str:
    u = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    return "test" if u < test_fraction else "validation" if u < test_fraction + validation_fraction else "train"


def joined(texts: list[str]) -> str:
    """Files' texts as one document, each file starting on a line of its own (a file is unchanged)."""
    return "".join(text if i + 1 == len(texts) or text.endswith("\n") else text + "\n" for i, text in enumerate(texts))


def build_corpus(
    source: Source, out_dir, validation_fraction: float = 0.05, test_fraction: float = 0.05, min_chars: int = 200,
    document_unit: str = "file",
) -> dict:
    """Write out_dir/{train,validation,test}.jsonl and out_dir/stats.json; return the stats.

    Each line is {"id", "source", "text"}. Skipped files are counted by reason in the stats: not
    UTF-8, generated, shorter than `min_chars`, exact duplicate (files are filtered one by one,
    before they are joined into directory documents).
    """
    out_dir = Path(out_dir)
    files = source.files()
    if not files:
        roots = ", ".join(map(str, source.roots.values()))
        raise DataError(f"no files matching {', '.join(source.preset.patterns)} under {roots}: empty corpus")
    skipped, examples, seen = Counter(), {}, set()
    documents: dict[str, list[str]] = {}  # document id -> its files' texts, in file id order

    def skip(reason, doc_id):
        skipped[reason] += 1
        examples.setdefault(reason, doc_id)

    for file in tqdm(files, desc=f"corpus {source.preset.name}", unit="file"):
        try:
            text = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            skip("not UTF-8", f"{file.path}: byte {error.start}")
            continue
        reason = generated_reason(text)
        if reason:
            skip("generated", f"{file.doc_id}: {reason}")
            continue
        if len(text.strip()) < min_chars:
            skip(f"shorter than {min_chars} characters", file.doc_id)
            continue
        digest = hashlib.sha256(text.encode()).digest()
        if digest in seen:
            skip("exact duplicate", file.doc_id)
            continue
        seen.add(digest)
        documents.setdefault(file.doc_id if document_unit == "file" else file.directory_id, []).append(text)

    chars = {split: [] for split in SPLITS}
    # The ExitStack closes the files before atomic_path renames them (last entered, first exited).
    with contextlib.ExitStack() as stack:
        tmp = {s: stack.enter_context(atomic_path(out_dir / f"{s}.jsonl")) for s in SPLITS}
        outputs = {s: stack.enter_context(open(tmp[s], "w", encoding="utf-8")) for s in SPLITS}
        for doc_id in sorted(documents):
            text = joined(documents[doc_id])
            split = split_of(doc_id, validation_fraction, test_fraction)
            outputs[split].write(json.dumps({"id": doc_id, "source": source.preset.name, "text": text}) + "\n")
            chars[split].append(len(text))
        for split, fraction in zip(
            SPLITS, (1 - validation_fraction - test_fraction, validation_fraction, test_fraction)
        ):
            if fraction > 0 and not chars[split]:
                raise DataError(
                    f"the {split} split of {source.preset.name} is empty ({sum(map(len, chars.values()))} documents "
                    f"kept, {dict(skipped)} skipped): use a larger corpus or a larger {split} fraction"
                )
    stats = dict(
        source=source.preset.name,
        domain=source.preset.domain,
        roots={label or ".": str(path) for label, path in source.roots.items()},
        files_seen=len(files),
        document_unit=document_unit,
        fractions=dict(validation=validation_fraction, test=test_fraction),
        min_chars=min_chars,
        splits={
            s: dict(chars=length_summary(c), long_documents=sum(n > LONG_DOCUMENT_CHARS for n in c))
            for s, c in chars.items()
        },
        skipped=dict(skipped),
        skipped_examples=examples,
    )
    with atomic_path(out_dir / "stats.json") as tmp_stats:
        tmp_stats.write_text(json.dumps(stats, indent=2) + "\n")
    return stats
