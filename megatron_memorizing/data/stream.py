"""Document-per-slot streaming for Memorizing Transformers.

Each data-parallel rank owns a disjoint shard of the documents and runs B slots. A slot reads one
document segment after segment (L inputs each, labels shifted by one token, so the last label of a
segment is the first input of the next), and only when that document is exhausted does it take
the next document of the rank's order, flagging `new_document` so the model clears that slot's
memory. The final segment of a document is padded (loss_mask 0) rather than packed with the next
document: packing would put two documents in one segment, and a per-slot memory can only be reset
between steps. Padding therefore only ever follows the last real token of a document, and the
memory it may pollute is reset at the slot's next step.

Document order is shuffled per epoch by (seed, epoch) when `shuffle` (default: when `loop`);
evaluation uses loop=False, which reads every document once, in order, and keeps all DP ranks in
step: a rank that runs out early yields all-padding batches until the slowest rank is done.
"""

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from .errors import DataError, IncompatibleError
from .indexed import open_indexed_dataset

STATE_VERSION = 1


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, L] int64 inputs
    labels: torch.Tensor  # [B, L] int64 next tokens
    loss_mask: torch.Tensor  # [B, L] float32, 0 on padding
    new_document: torch.Tensor  # [B] bool: the slot's segment is the first of a document (reset memory)
    document_ids: torch.Tensor  # [B] int64 document index in the dataset, -1 for an idle slot
    offsets: torch.Tensor  # [B] int64 position of the segment's first input within its document


def segment_counts(lengths: np.ndarray, segment_length: int) -> np.ndarray:
    """Segments per document: a document of n tokens has n - 1 (input, label) pairs."""
    return -(-np.maximum(lengths - 1, 0) // segment_length)


def shard_documents(segments: np.ndarray, dp_size: int) -> list[np.ndarray]:
    """Disjoint shards with balanced work: longest document first, to the least-loaded rank."""
    usable = np.flatnonzero(segments > 0)
    heap = [(0, rank) for rank in range(dp_size)]
    shards = [[] for _ in range(dp_size)]
    for doc in usable[np.argsort(-segments[usable], kind="stable")]:
        load, rank = heapq.heappop(heap)
        shards[rank].append(doc)
        heapq.heappush(heap, (load + int(segments[doc]), rank))
    return [np.sort(np.asarray(shard, dtype=np.int64)) for shard in shards]


def steps_to_finish(order: np.ndarray, segments: np.ndarray, batch_size: int) -> int:
    """Steps B slots need to read `order` once: each document goes to the slot that frees first
    (lowest slot index on ties), which is exactly what DocumentStream does step by step."""
    free = [(0, slot) for slot in range(batch_size)]
    finish = 0
    for doc in order:
        step, slot = heapq.heappop(free)
        finish = max(finish, step + int(segments[doc]))
        heapq.heappush(free, (step + int(segments[doc]), slot))
    return finish


class DocumentStream:
    def __init__(
        self,
        dataset_prefix: str,
        batch_size: int,
        segment_length: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        loop: bool = True,
        shuffle: bool | None = None,
        pad_id: int = 0,
    ):
        if batch_size < 1 or segment_length < 1:
            raise DataError(f"batch_size ({batch_size}) and segment_length ({segment_length}) must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1} (dp_size {dp_size})")
        self.prefix, self.batch_size, self.segment_length = str(dataset_prefix), batch_size, segment_length
        self.dp_rank, self.dp_size, self.seed, self.loop = dp_rank, dp_size, seed, loop
        self.shuffle = loop if shuffle is None else shuffle
        self.pad_id = pad_id
        self._docs = open_indexed_dataset(dataset_prefix)
        self._segments = segment_counts(self._docs.length, segment_length)
        shards = shard_documents(self._segments, dp_size)
        self.documents = shards[dp_rank]  # this rank's documents, ascending
        if loop and len(self.documents) == 0:
            raise DataError(
                f"{dataset_prefix} has {int((self._segments > 0).sum())} documents with at least 2 tokens, "
                f"too few to give DP rank {dp_rank} of {dp_size} any: use fewer DP ranks or more data"
            )
        # Without looping every rank must take the same number of steps (collectives would hang).
        self.total_steps = None if loop else max(
            steps_to_finish(self._epoch_order(shard, 0), self._segments, batch_size) for shard in shards
        )
        self.step, self._slots = 0, [[-1, 0] for _ in range(batch_size)]  # [document or -1, next offset]
        self._start_epoch(0)

    def _epoch_order(self, shard: np.ndarray, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return shard
        return np.random.default_rng([self.seed, epoch]).permutation(shard)

    def _start_epoch(self, epoch: int):
        self.epoch, self._cursor = epoch, 0
        self._order = self._epoch_order(self.documents, epoch)

    def _next_document(self) -> int:
        if self._cursor == len(self._order):
            if not self.loop:
                return -1
            self._start_epoch(self.epoch + 1)
        self._cursor += 1
        return int(self._order[self._cursor - 1])

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self.total_steps is not None and self.step >= self.total_steps:
            raise StopIteration
        B, L = self.batch_size, self.segment_length
        tokens = np.full((B, L), self.pad_id, np.int64)
        labels = np.full((B, L), self.pad_id, np.int64)
        loss_mask = np.zeros((B, L), np.float32)
        new_document = np.zeros(B, bool)
        document_ids = np.full(B, -1, np.int64)
        offsets = np.zeros(B, np.int64)
        for i, slot in enumerate(self._slots):
            doc, offset = slot
            if doc < 0 or offset >= self._docs.length[doc] - 1:
                doc, offset = self._next_document(), 0
                slot[:] = doc, offset
                new_document[i] = doc >= 0
            if doc < 0:
                continue
            n = min(L, int(self._docs.length[doc]) - 1 - offset)
            segment = self._docs.read(doc, offset, n + 1)
            tokens[i, :n], labels[i, :n], loss_mask[i, :n] = segment[:-1], segment[1:], 1.0
            document_ids[i], offsets[i] = doc, offset
            slot[1] = offset + n
        self.step += 1
        return Batch(*(torch.from_numpy(a) for a in (tokens, labels, loss_mask, new_document, document_ids, offsets)))

    def _config(self) -> dict:
        return dict(
            documents=len(self._docs), tokens=int(self._docs.length.sum()), batch_size=self.batch_size,
            segment_length=self.segment_length, dp_rank=self.dp_rank, dp_size=self.dp_size,
            seed=self.seed, loop=self.loop, shuffle=self.shuffle,
        )

    def state_dict(self) -> dict:
        """JSON-serialisable position of every slot; load it into a stream built with the same
        dataset and arguments to continue with exactly the same batches."""
        return dict(
            version=STATE_VERSION, config=self._config(), epoch=self.epoch, cursor=self._cursor,
            step=self.step, slots=[list(slot) for slot in self._slots],
        )

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise IncompatibleError(f"stream state version {state.get('version')} is not {STATE_VERSION}")
        mine = self._config()
        differ = {k: (v, mine.get(k)) for k, v in state["config"].items() if mine.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: saved {saved}, now {now}" for k, (saved, now) in differ.items())
            raise IncompatibleError(
                f"cannot resume this data stream ({detail}): resume with the dataset and the batch, "
                "segment, DP and seed settings the state was saved with"
            )
        if len(state["slots"]) != self.batch_size:
            raise IncompatibleError(f"saved state has {len(state['slots'])} slots, stream has {self.batch_size}")
        self._start_epoch(state["epoch"])
        self._cursor, self.step = state["cursor"], state["step"]
        self._slots = [list(slot) for slot in state["slots"]]
