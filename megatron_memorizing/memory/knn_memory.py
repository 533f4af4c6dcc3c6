"""The kNN memory of one attention layer on one rank: per-slot ring buffers of (key, value) pairs.

Layout: keys and values are [num_slots, num_heads, capacity, head_dim]. A slot streams one
document; its entries are addressed by an absolute position p (0 at the slot's last reset,
counting every pair ever written to it) and live at ring index (p - origin) % capacity.

Bookkeeping is two counters per slot:
  written  pairs written since reset (the next pair gets position `written`)
  origin   the position that maps to ring index 0; 0 after reset, moved only by resize()
so fill = min(written - origin, capacity), and the valid entries always occupy ring indices
[0, fill): a slot fills its ring from index 0 and only wraps once full. Search masks by that
prefix alone.

The memory is not differentiable and is not an nn.Module: it has no parameters, and keeping its
(large) buffers out of the model's state_dict and out of model.to(dtype) is deliberate.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_memorizing.memory.search import faiss_topk, torch_topk

COMPUTE_DTYPE = torch.float32
_STORAGE_DTYPES = (torch.float32, torch.bfloat16)
_BACKENDS = ("torch", "faiss")


@dataclass
class Retrieved:
    """Top-k memories per query, best first. Entries with valid=False (the slot held fewer than k
    pairs) have zero keys/values, score -inf and position -1."""
    keys: Tensor       # [s, h, q, k, d] float32
    values: Tensor     # [s, h, q, k, d] float32
    valid: Tensor      # [s, h, q, k] bool
    positions: Tensor  # [s, h, q, k] int64, absolute position in the slot's write order since reset
    scores: Tensor     # [s, h, q, k] float32 inner products


def memory_bytes(num_slots, num_heads, capacity, head_dim, dtype=torch.float32):
    """Bytes a KNNMemory of this shape holds (KNNMemory.nbytes), computed without allocating."""
    pairs = 2 * num_slots * num_heads * capacity * head_dim * dtype.itemsize
    counters = 2 * num_slots * torch.int64.itemsize
    return pairs + counters


class KNNMemory:
    """Ring buffers [num_slots, num_heads, capacity, head_dim] with exact top-k search.

    dtype: storage, float32 or bfloat16 (half the bytes).
    search_chunk_size: memory entries scored at once; bounds search's extra memory to about
        slots*heads*queries*search_chunk_size scores.
    score_dtype: dtype the chunked search scores in, default the storage dtype. Scoring in bf16
        keeps the top-(rerank_factor*k) candidates and re-ranks them with exact float32 scores.
        On CPUs without native bf16 matmul (AVX2) bf16 scoring is several times slower than
        float32; score_dtype=torch.float32 upcasts each chunk instead and needs no re-rank.
    backend: "torch", or "faiss" (exact brute force with faiss.knn / faiss.knn_gpu).
    """

    def __init__(self, num_slots, num_heads, capacity, head_dim, *, dtype=torch.float32, device=None,
                 search_chunk_size=8192, rerank_factor=2, backend="torch", score_dtype=None):
        if dtype not in _STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {_STORAGE_DTYPES}, got {dtype}")
        if score_dtype not in (None,) + _STORAGE_DTYPES:
            raise ValueError(f"score_dtype must be None or one of {_STORAGE_DTYPES}, got {score_dtype}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if min(num_slots, num_heads, capacity, head_dim, search_chunk_size, rerank_factor) < 1:
            raise ValueError("num_slots, num_heads, capacity, head_dim, search_chunk_size and "
                             "rerank_factor must all be >= 1")
        self.num_slots, self.num_heads, self.head_dim = num_slots, num_heads, head_dim
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.search_chunk_size = search_chunk_size
        self.rerank_factor = rerank_factor
        self.backend = backend
        self.score_dtype = score_dtype or dtype
        shape = (num_slots, num_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=dtype, device=self.device)
        self.written = torch.zeros(num_slots, dtype=torch.int64, device=self.device)
        self.origin = torch.zeros(num_slots, dtype=torch.int64, device=self.device)
        self._staged = []  # [(slot_ids, keys, values)], no slot in two entries

    @property
    def capacity(self):
        return self.keys.shape[2]

    @property
    def fill(self):
        return (self.written - self.origin).clamp(max=self.capacity)

    @property
    def nbytes(self):
        return sum(t.nbytes for t in (self.keys, self.values, self.written, self.origin))

    def _slot_ids(self, slots):
        """slice | LongTensor | BoolTensor [num_slots] | None -> LongTensor of slot indices."""
        if slots is None:
            slots = slice(None)
        if isinstance(slots, Tensor):
            slots = slots.to(self.device)
            if slots.dtype == torch.bool:
                if slots.shape != (self.num_slots,):
                    raise ValueError(f"slot mask must have shape ({self.num_slots},), got {tuple(slots.shape)}")
                return slots.nonzero().flatten()
            return slots.long().flatten()
        return torch.arange(self.num_slots, device=self.device)[slots]

    def _gather(self, buffer, slot_ids, idx, dtype=COMPUTE_DTYPE):
        """buffer[slot_ids[i], j, idx[i, j, ...]] as [s, h, ..., d]; idx [s, h or 1, ...] indexes capacity.
        One index_select over the flattened buffer: faster than advanced indexing on CPU."""
        shape = (-1,) + (1,) * (idx.dim() - 1)
        heads = torch.arange(self.num_heads, device=self.device).view((1, -1) + (1,) * (idx.dim() - 2))
        flat = (slot_ids.view(shape) * self.num_heads + heads) * self.capacity + idx
        rows = buffer.view(-1, self.head_dim).index_select(0, flat.flatten())
        return rows.view(*flat.shape, self.head_dim).to(dtype)

    def _positions(self, slot_ids, ring_idx):
        """Absolute position of the valid entry at ring index ring_idx [s, ...] of slots slot_ids [s]."""
        shape = (-1,) + (1,) * (ring_idx.dim() - 1)
        origin = self.origin[slot_ids].view(shape)
        count = self.written[slot_ids].view(shape) - origin
        # the newest pair sits at ring index (count-1) % C; step back to the wrap that holds ring_idx
        return origin + ring_idx + self.capacity * torch.div(count - 1 - ring_idx, self.capacity,
                                                             rounding_mode="floor")

    @torch.no_grad()
    def search(self, queries, k, slots=None):
        """Exact top-k by inner product. queries [s, h, q, d] (already normalised by the caller)."""
        slot_ids = self._slot_ids(slots)
        s = len(slot_ids)
        if queries.dim() != 4 or tuple(queries.shape[i] for i in (0, 1, 3)) != (s, self.num_heads, self.head_dim):
            raise ValueError(f"queries must be [slots={s}, heads={self.num_heads}, q, head_dim={self.head_dim}], "
                             f"got {tuple(queries.shape)}")
        if not 1 <= k <= self.capacity:
            raise ValueError(f"k must be in [1, capacity={self.capacity}], got {k}")
        queries = queries.detach().to(self.device, COMPUTE_DTYPE)
        fill = self.fill[slot_ids]
        # a slice indexes the buffers as a view; anything else is gathered chunk by chunk
        index = slice(None) if slots is None else slots if isinstance(slots, slice) else slot_ids
        if self.backend == "faiss":
            scores, idx = faiss_topk(queries, self.keys, index, fill, k)
        elif self.score_dtype == COMPUTE_DTYPE:
            scores, idx = torch_topk(queries, self.keys, index, fill, k, self.search_chunk_size, self.score_dtype)
        else:
            scores, idx = self._search_rerank(queries, index, slot_ids, fill, k)

        valid = (idx >= 0) & (idx < fill.view(-1, 1, 1, 1))
        idx = idx.clamp(min=0)
        empty = ~valid.unsqueeze(-1)
        return Retrieved(
            keys=self._gather(self.keys, slot_ids, idx).masked_fill_(empty, 0),
            values=self._gather(self.values, slot_ids, idx).masked_fill_(empty, 0),
            valid=valid,
            positions=self._positions(slot_ids, idx).masked_fill(~valid, -1),
            scores=scores.masked_fill(~valid, float("-inf")),
        )

    def _search_rerank(self, queries, index, slot_ids, fill, k):
        """Low-precision scores: coarse top-(rerank_factor*k), then exact float32 scores of those
        candidates pick the top-k (bf16 scores alone miss a few percent of the true top-k)."""
        wide = min(self.rerank_factor * k, self.capacity)
        _, cand = torch_topk(queries, self.keys, index, fill, wide, self.search_chunk_size, self.score_dtype)
        exact = torch.einsum("shqkd,shqd->shqk", self._gather(self.keys, slot_ids, cand), queries)
        exact.masked_fill_(cand >= fill.view(-1, 1, 1, 1), float("-inf"))
        scores, pick = exact.topk(k, dim=-1)
        return scores, cand.gather(-1, pick)

    @torch.no_grad()
    def stage(self, slots, keys, values):
        """Buffer pairs keys/values [s, h, n, d] for the next commit(). Staging a slot again before
        commit replaces its earlier staged pairs (a recomputed forward must not write twice)."""
        slot_ids = self._slot_ids(slots)
        expected = (len(slot_ids), self.num_heads, self.head_dim)
        for name, t in (("keys", keys), ("values", values)):
            if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != expected:
                raise ValueError(f"{name} must be [slots={expected[0]}, heads={expected[1]}, n, "
                                 f"head_dim={expected[2]}], got {tuple(t.shape)}")
        if keys.shape[2] != values.shape[2]:
            raise ValueError(f"keys and values differ in length: {keys.shape[2]} vs {values.shape[2]}")
        self._drop_staged(slot_ids)
        copy = dict(device=self.device, dtype=self.dtype, copy=True)
        self._staged.append((slot_ids, keys.detach().to(**copy), values.detach().to(**copy)))

    def _drop_staged(self, slot_ids):
        kept = []
        for ids, k, v in self._staged:
            keep = ~torch.isin(ids, slot_ids)
            if keep.all():
                kept.append((ids, k, v))
            elif keep.any():
                kept.append((ids[keep], k[keep], v[keep]))
        self._staged = kept

    @torch.no_grad()
    def commit(self):
        """Append all staged pairs, FIFO per slot (the oldest are evicted once a slot is full)."""
        for slot_ids, keys, values in self._staged:
            n = keys.shape[2]
            # pairs beyond capacity would be overwritten within this very write: skip them, but
            # count them, so positions keep measuring true distance in the document
            skipped = max(n - self.capacity, 0)
            self.written[slot_ids] += skipped
            keys, values = keys[:, :, skipped:], values[:, :, skipped:]
            count = self.written[slot_ids] - self.origin[slot_ids]
            ring = (count[:, None] + torch.arange(n - skipped, device=self.device)) % self.capacity
            # advanced indices around a slice put their dims first: the target is [s, n, h, d]
            at = (slot_ids[:, None], slice(None), ring)
            self.keys[at] = keys.transpose(1, 2)
            self.values[at] = values.transpose(1, 2)
            self.written[slot_ids] += n - skipped
        self._staged = []

    @torch.no_grad()
    def reset(self, slots):
        """Empty these slots (a new document starts) and drop their staged pairs."""
        slot_ids = self._slot_ids(slots)
        self.written[slot_ids] = 0
        self.origin[slot_ids] = 0
        self._drop_staged(slot_ids)

    def _chronological_ring(self, slot_ids, length, newest_last_at):
        """Ring index of the entry at column j of a [s, length] window whose column
        newest_last_at[s] holds the slot's newest pair; j counts forward in time."""
        count = (self.written - self.origin)[slot_ids]
        j = torch.arange(length, device=self.device)
        return (count[:, None] - 1 - newest_last_at[:, None] + j) % self.capacity

    @torch.no_grad()
    def contents(self, slots=None):
        """(keys, values) [s, h, capacity, d] float32 oldest first and right-aligned (the newest
        pair in the last column), and valid [s, capacity]. Empty columns are zero."""
        slot_ids = self._slot_ids(slots)
        c = self.capacity
        ring = self._chronological_ring(slot_ids, c, torch.full_like(slot_ids, c - 1))
        valid = torch.arange(c, device=self.device) >= (c - self.fill[slot_ids])[:, None]
        empty = ~valid[:, None, :, None]
        return (self._gather(self.keys, slot_ids, ring[:, None]).masked_fill_(empty, 0),
                self._gather(self.values, slot_ids, ring[:, None]).masked_fill_(empty, 0), valid)

    @torch.no_grad()
    def resize(self, capacity):
        """Change capacity, keeping the newest min(fill, capacity) pairs of every slot and their
        positions. The kept pairs are re-laid out from ring index 0 (origin moves accordingly)."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        slot_ids = torch.arange(self.num_slots, device=self.device)
        kept = self.fill.clamp(max=capacity)
        # new ring index i < kept holds the i-th oldest kept pair
        ring = self._chronological_ring(slot_ids, capacity, kept - 1)
        valid = torch.arange(capacity, device=self.device) < kept[:, None]
        empty = ~valid[:, None, :, None]
        self.keys, self.values = (self._gather(t, slot_ids, ring[:, None], self.dtype).masked_fill_(empty, 0)
                                  for t in (self.keys, self.values))
        self.origin = self.written - kept

    def state_dict(self):
        """The buffers and counters themselves (not copies). Staged, uncommitted pairs are not saved:
        checkpoint after commit()."""
        return {"keys": self.keys, "values": self.values, "written": self.written, "origin": self.origin}

    @torch.no_grad()
    def load_state_dict(self, sd):
        for name, current in self.state_dict().items():
            if name not in sd:
                raise KeyError(f"memory state_dict lacks {name!r}")
            if tuple(sd[name].shape) != tuple(current.shape):
                raise ValueError(f"memory {name}: checkpoint has shape {tuple(sd[name].shape)}, this memory "
                                 f"{tuple(current.shape)} [slots, heads, capacity, head_dim]; build the memory "
                                 "with the checkpoint's shape, load, then resize() to change capacity")
            current.copy_(sd[name])
        self._staged = []
