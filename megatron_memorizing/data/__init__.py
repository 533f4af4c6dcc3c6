"""Data the trainer reads: the document-per-slot stream, the tokenizer, and the dataset manifest."""

from .errors import CorruptDatasetError, DataError, IncompatibleError, TokenizerError
from .indexed import IndexedDocuments, open_indexed_dataset
from .manifest import DatasetManifest, check_compatible, dataset_tokenizer_path, read_manifest, trained_tokenizer
from .stream import Batch, DocumentStream
from .tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "Batch",
    "CorruptDatasetError",
    "DataError",
    "DatasetManifest",
    "DocumentStream",
    "IncompatibleError",
    "IndexedDocuments",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "check_compatible",
    "dataset_tokenizer_path",
    "load_tokenizer",
    "open_indexed_dataset",
    "read_manifest",
    "trained_tokenizer",
]
