"""The manifest `prefix.json` beside `prefix.bin/.idx`: which tokenizer made the tokens, how many
there are, from what corpus, by which command. `check_compatible` turns a mismatch between
dataset, tokenizer and model into an error before training instead of a silently wrong run."""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_path
from .errors import CorruptDatasetError, DataError, IncompatibleError
from .indexed import check_indexed_files
from .tokenizer import HF_FILE, SENTENCEPIECE_FILE, file_sha256, load_tokenizer

FORMAT = "megatron-memorizing-dataset/1"
# What a checkpoint keeps of an imported model's Hugging Face origin (see hf/importer.py): its own
# tokenizer and its config.json.
IMPORTED_TOKENIZER_DIR, IMPORTED_CONFIG_FILE = "hf_tokenizer", "hf_config.json"


@dataclass
class DatasetManifest:
    split: str  # train / validation / test, or any name given at preprocessing
    documents: int
    tokens: int  # including the end-of-document token appended to each document
    max_token_id: int
    dtype: str  # token dtype in the .bin
    vocab_size: int
    eod_id: int | None  # None: documents were stored without an end-of-document token
    tokenizer_file: str  # file name of the tokenizer copy, in the dataset's directory
    tokenizer_sha256: str
    source: str  # the JSONL the dataset was made from
    command: str
    created: str
    corpus_stats: dict = field(default_factory=dict)
    throughput: dict = field(default_factory=dict)
    format: str = FORMAT
    # sha256 of the .bin and .idx as written ({"bin": ..., "idx": ...}); empty in manifests
    # written before checksums were recorded, whose files are then checked by size only.
    files_sha256: dict = field(default_factory=dict)


def manifest_path(prefix) -> Path:
    return Path(f"{prefix}.json")


def write_manifest(prefix, manifest: DatasetManifest) -> None:
    with atomic_path(manifest_path(prefix)) as tmp:
        tmp.write_text(json.dumps(dataclasses.asdict(manifest), indent=2) + "\n")


def read_manifest(prefix) -> DatasetManifest:
    path = manifest_path(prefix)
    if not path.is_file():
        check_prefix(prefix)
        raise DataError(
            f"{path} not found: {prefix}.bin/.idx have no manifest, so the tokenizer that made them is "
            "unknown; (re)build the dataset with `megatron-memorizing-data preprocess`"
        )
    try:
        fields = json.loads(path.read_text())
        if fields.get("format") != FORMAT:
            raise ValueError(f"format {fields.get('format')!r}, expected {FORMAT!r}")
        return DatasetManifest(**fields)
    except (ValueError, TypeError) as error:
        raise DataError(f"{path} is not a valid dataset manifest ({error}); rebuild the dataset") from None


def check_prefix(prefix) -> None:
    """Raise DataError, naming the likely slip, if `prefix` names no dataset at all: a path given
    with its extension, or a path where nothing was built."""
    prefix = Path(prefix)
    if prefix.suffix in (".bin", ".idx", ".json") and not Path(f"{prefix}.bin").exists():
        raise DataError(
            f"{prefix} ends in {prefix.suffix}: a dataset is named by its prefix, without the extension; "
            f"use {prefix.with_suffix('')}"
        )
    if not any(Path(f"{prefix}.{suffix}").exists() for suffix in ("bin", "idx", "json")):
        found = sorted(p.stem for p in prefix.parent.glob("*.json")) if prefix.parent.is_dir() else []
        hint = f"datasets there: {', '.join(found)}" if found else (
            f"{prefix.parent} does not exist" if not prefix.parent.is_dir() else "no dataset there"
        )
        raise DataError(
            f"no dataset at {prefix} (no {prefix.name}.bin/.idx/.json; {hint}): check the path, or build it "
            f"with `megatron-memorizing-data build`"
        )


def dataset_tokenizer_path(prefix, manifest: DatasetManifest) -> Path:
    return Path(prefix).parent / manifest.tokenizer_file


def checkpoint_tokenizers(checkpoint_dir) -> list[Path]:
    """The tokenizer files a checkpoint carries: the copy of its training data's (tokenizer.model
    or tokenizer.json), and an imported model's own (hf_tokenizer/). One tokenizer may be there
    in both formats."""
    directory = Path(checkpoint_dir)
    candidates = [directory / name for name in (SENTENCEPIECE_FILE, HF_FILE)]
    candidates += [directory / IMPORTED_TOKENIZER_DIR / name for name in (HF_FILE, SENTENCEPIECE_FILE)]
    return [path for path in candidates if path.is_file()]


def trained_tokenizer(checkpoint_dir, train_prefix) -> Path | None:
    """The tokenizer a checkpoint's model was trained with, where it can be known: the copy in the
    checkpoint, else the one its training data's manifest names."""
    own = checkpoint_tokenizers(checkpoint_dir)
    if own:
        return own[0]
    try:
        return dataset_tokenizer_path(train_prefix, read_manifest(train_prefix)) if train_prefix else None
    except DataError:
        return None


def files_sha256(prefix) -> dict:
    return {suffix: file_sha256(f"{prefix}.{suffix}") for suffix in ("bin", "idx")}


def verify_checksums(prefix, manifest: DatasetManifest) -> None:
    """Raise CorruptDatasetError if the .bin or .idx changed since the manifest was written (bytes
    overwritten in place keep the size, so only a checksum sees them)."""
    for suffix, expected in manifest.files_sha256.items():
        if file_sha256(f"{prefix}.{suffix}") != expected:
            raise CorruptDatasetError(
                f"{prefix}.{suffix} is corrupt: its sha256 differs from the one its manifest recorded when it was "
                f"written; rebuild the dataset (megatron-memorizing-data preprocess or build)"
            )


def check_compatible(dataset_prefix, model_vocab_size: int, tokenizer_path=None) -> DatasetManifest:
    """Raise IncompatibleError (or a DataError subclass) unless the dataset at `dataset_prefix`
    is whole, its tokenizer copy is the one it was made with, `tokenizer_path` (if given) is that
    same tokenizer, and every token id fits a model with `model_vocab_size` embeddings. The files'
    checksums are verified (a few seconds per GB)."""
    manifest = read_manifest(dataset_prefix)
    lengths, bounds, _ = check_indexed_files(dataset_prefix)
    if (len(bounds) - 1, int(lengths.sum())) != (manifest.documents, manifest.tokens):
        raise IncompatibleError(
            f"{dataset_prefix}.bin/.idx hold {len(bounds) - 1} documents and {int(lengths.sum())} tokens, "
            f"its manifest says {manifest.documents} and {manifest.tokens}: the files were replaced "
            "after the manifest was written; rebuild the dataset"
        )
    verify_checksums(dataset_prefix, manifest)
    own = dataset_tokenizer_path(dataset_prefix, manifest)
    if not own.is_file():
        raise IncompatibleError(
            f"the tokenizer stored with {dataset_prefix} ({own}) is missing; copy it back or rebuild the dataset"
        )
    if file_sha256(own) != manifest.tokenizer_sha256:
        raise IncompatibleError(
            f"{own} is not the tokenizer {dataset_prefix} was made with (sha256 differs): another dataset "
            "in the same directory was built with a different tokenizer; rebuild into separate directories"
        )
    if tokenizer_path is not None:
        other = load_tokenizer(tokenizer_path)
        if other.sha256 != manifest.tokenizer_sha256:
            raise IncompatibleError(
                f"{dataset_prefix} was tokenized with {own} (sha256 {manifest.tokenizer_sha256[:12]}), "
                f"but the model uses {other.path} (sha256 {other.sha256[:12]}): use data tokenized with {other.path}, "
                "or re-tokenize the data with it"
            )
    if manifest.vocab_size > model_vocab_size or manifest.max_token_id >= model_vocab_size:
        raise IncompatibleError(
            f"{dataset_prefix} uses a vocabulary of {manifest.vocab_size} (largest id {manifest.max_token_id}) "
            f"but the model embeds only {model_vocab_size} ids: set the model's vocab size to at least "
            f"{manifest.vocab_size}, or use a smaller tokenizer"
        )
    return manifest
