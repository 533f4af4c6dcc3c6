"""Open a Megatron indexed dataset (.bin/.idx) after checking that the two files are whole.

Megatron's reader trusts its files: a truncated .bin reads past the end of the map, a wrong
.idx fails deep inside numpy. We check the layout first so a damaged dataset is named as such.
"""

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CorruptDatasetError

# The .idx layout written by megatron.core.datasets.indexed_dataset._IndexWriter (version 1):
# magic (9 bytes), version <Q, dtype code <B, sequence count <Q, document count <Q, then
# int32 lengths [S], int64 byte pointers [S], int64 document boundaries [D].
_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")
_TOKEN_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_REBUILD = "re-run `megatron-memorizing-data preprocess` (or `build --force`) to rewrite it"


@dataclass
class IndexedDocuments:
    """An IndexedDataset seen as documents: document d is `length[d]` tokens starting at token
    `first_sequence[d]`'s start (Megatron stores a document's sequences contiguously)."""

    dataset: object  # megatron.core.datasets.indexed_dataset.IndexedDataset
    first_sequence: np.ndarray  # [D] int64
    length: np.ndarray  # [D] int64 tokens
    dtype: type

    def __len__(self) -> int:
        return len(self.length)

    def read(self, document: int, offset: int, count: int) -> np.ndarray:
        assert 0 <= offset and offset + count <= self.length[document]
        return self.dataset.get(int(self.first_sequence[document]), offset=offset, length=count)


def check_indexed_files(prefix) -> tuple[np.ndarray, np.ndarray, type]:
    """Validate prefix.bin/.idx; return (sequence lengths, document boundaries, token dtype)."""
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise CorruptDatasetError(
                f"{path} does not exist: a dataset prefix names two files, {prefix}.bin and "
                f"{prefix}.idx (pass the path without the extension); build them with "
                "`megatron-memorizing-data preprocess`"
            )
    raw = idx_path.read_bytes()
    if len(raw) < _HEADER.size:
        raise CorruptDatasetError(f"{idx_path} is truncated ({len(raw)} bytes); {_REBUILD}")
    magic, version, code, sequences, documents = _HEADER.unpack_from(raw)
    if magic != _MAGIC or version != 1:
        raise CorruptDatasetError(f"{idx_path} is not a Megatron indexed-dataset index (bad header); {_REBUILD}")
    if code not in _TOKEN_DTYPES:
        raise CorruptDatasetError(
            f"{idx_path} stores dtype code {code}, which is not an integer token type; {_REBUILD}"
        )
    expected = _HEADER.size + 12 * sequences + 8 * documents
    if len(raw) != expected:
        what = "multimodal or " if len(raw) == expected + sequences else ""
        raise CorruptDatasetError(
            f"{idx_path} is {len(raw)} bytes but its header promises {expected} "
            f"({sequences} sequences, {documents} boundaries): {what}truncated or corrupt; {_REBUILD}"
        )
    lengths = np.frombuffer(raw, np.int32, sequences, _HEADER.size).astype(np.int64)
    pointers = np.frombuffer(raw, np.int64, sequences, _HEADER.size + 4 * sequences)
    bounds = np.frombuffer(raw, np.int64, documents, _HEADER.size + 12 * sequences).copy()
    dtype = _TOKEN_DTYPES[code]
    itemsize = np.dtype(dtype).itemsize
    contiguous = np.concatenate([[0], np.cumsum(lengths * itemsize)])
    if (
        documents == 0 or bounds[0] != 0 or bounds[-1] != sequences or np.any(np.diff(bounds) < 0)
        or np.any(lengths < 0) or not np.array_equal(pointers, contiguous[:-1])
    ):
        raise CorruptDatasetError(f"{idx_path} has inconsistent sequence or document tables; {_REBUILD}")
    bin_bytes = bin_path.stat().st_size
    if bin_bytes != contiguous[-1]:
        raise CorruptDatasetError(
            f"{bin_path} is {bin_bytes} bytes but {idx_path} indexes {contiguous[-1]} bytes of tokens: "
            f"the pair is truncated or from different runs; {_REBUILD}"
        )
    return lengths, bounds, dtype


def open_indexed_dataset(prefix) -> IndexedDocuments:
    """Check prefix.bin/.idx, then open them with megatron.core's IndexedDataset (memory-mapped)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    lengths, bounds, dtype = check_indexed_files(prefix)
    cumulative = np.concatenate([[0], np.cumsum(lengths)])
    per_document = cumulative[bounds[1:]] - cumulative[bounds[:-1]]
    dataset = IndexedDataset(str(prefix), mmap=True)
    return IndexedDocuments(dataset, bounds[:-1].copy(), per_document, dtype)
