import pytest
import torch
import torch.nn.functional as F

from megatron_memorizing.memory import KNNMemory, Retrieved, memory_bytes

S, H, D = 3, 2, 16


def unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


class Reference:
    """The memory's intended behaviour, written the slow obvious way: one Python list per slot of
    (position, key [h, d], value [h, d]) in float64, trimmed to capacity from the front."""

    def __init__(self, capacity, dtype=torch.float32):
        self.capacity, self.dtype = capacity, dtype
        self.entries = [[] for _ in range(S)]
        self.written = [0] * S

    def write(self, slot, keys, values):
        def rounded(t):  # what the memory can hold
            return t.to(self.dtype).double()

        for i in range(keys.shape[1]):
            self.entries[slot].append((self.written[slot], rounded(keys[:, i]), rounded(values[:, i])))
            self.written[slot] += 1
        self.entries[slot] = self.entries[slot][-self.capacity:]

    def reset(self, slot):
        self.entries[slot], self.written[slot] = [], 0

    def search(self, slot, queries, k):
        """(scores [h, q, k'], positions [h, q, k']) for k' = min(k, fill)."""
        if not self.entries[slot]:
            return None, None
        keys = torch.stack([e[1] for e in self.entries[slot]], dim=1)  # [h, f, d]
        pos = torch.tensor([e[0] for e in self.entries[slot]])
        scores, idx = (queries.double() @ keys.transpose(-1, -2)).topk(min(k, keys.shape[1]), dim=-1)
        return scores, pos[idx]


def fill_both(mem, ref, steps, seed):
    """Commit `steps` rounds of random writes of varied lengths (some longer than capacity)."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        n = int(torch.randint(1, 2 * mem.capacity, (1,), generator=g))
        slots = torch.randperm(S, generator=g)[: int(torch.randint(1, S + 1, (1,), generator=g))]
        keys, values = unit(len(slots), H, n, D, seed=seed * 1000 + step), torch.randn(len(slots), H, n, D, generator=g)
        mem.stage(slots, keys, values)
        mem.commit()
        for i, s in enumerate(slots.tolist()):
            ref.write(s, keys[i], values[i])


def assert_contents_match(mem, ref):
    keys, values, valid = mem.contents()
    for s in range(S):
        f = len(ref.entries[s])
        assert int(mem.fill[s]) == f
        assert valid[s].tolist() == [False] * (mem.capacity - f) + [True] * f
        if f:
            torch.testing.assert_close(keys[s, :, -f:].double(), torch.stack([e[1] for e in ref.entries[s]], 1))
            torch.testing.assert_close(values[s, :, -f:].double(), torch.stack([e[2] for e in ref.entries[s]], 1))
        assert not keys[s, :, : mem.capacity - f].any()


def assert_search_matches(mem, ref, queries, k, slots=None):
    slot_ids = list(range(S))[slots] if isinstance(slots, slice) else (slots or list(range(S)))
    r = mem.search(queries, k, slots=torch.tensor(slot_ids) if isinstance(slots, list) else slots)
    assert isinstance(r, Retrieved)
    assert r.keys.shape == r.values.shape == (len(slot_ids), H, queries.shape[2], k, D)
    for i, s in enumerate(slot_ids):
        scores, positions = ref.search(s, queries[i], k)
        n = 0 if scores is None else scores.shape[-1]
        assert r.valid[i, ..., :n].all() and not r.valid[i, ..., n:].any()
        assert (r.positions[i, ..., n:] == -1).all() and not r.keys[i, ..., n:, :].any()
        if n:
            assert torch.equal(r.positions[i, ..., :n], positions)
            torch.testing.assert_close(r.scores[i, ..., :n].double(), scores, atol=1e-5, rtol=0)
            # the returned pairs are the ones stored at those positions
            by_pos = {e[0]: e for e in ref.entries[s]}
            p = positions[0, 0].tolist()
            torch.testing.assert_close(r.keys[i, 0, 0, :n].double(), torch.stack([by_pos[x][1][0] for x in p]))
            torch.testing.assert_close(r.values[i, 0, 0, :n].double(), torch.stack([by_pos[x][2][0] for x in p]))
    return r


def test_fifo_order_and_wraparound():
    mem, ref = KNNMemory(S, H, 24, D), Reference(24)
    for round_ in range(4):
        fill_both(mem, ref, steps=3, seed=round_)
        assert_contents_match(mem, ref)
        assert mem.written.tolist() == ref.written
    assert (mem.written > 2 * mem.capacity).any()  # the rings really wrapped


def test_stage_longer_than_capacity_keeps_newest_and_counts_positions():
    mem = KNNMemory(S, H, 8, D)
    keys = unit(1, H, 20, D, seed=0)
    mem.stage([1], keys, keys)
    mem.commit()
    got, _, valid = mem.contents([1])
    assert valid.all() and torch.equal(got[0], keys[0, :, -8:])
    r = mem.search(keys[:, :, -1:], k=1, slots=[1])
    assert r.positions.flatten().tolist() == [19] * H


def test_reset_some_slots_leaves_others():
    mem, ref = KNNMemory(S, H, 16, D), Reference(16)
    fill_both(mem, ref, steps=4, seed=1)
    keys = unit(S, H, 5, D, seed=2)
    mem.stage(slice(None), keys, keys)  # staged writes of a reset slot are dropped with it
    mem.reset(torch.tensor([True, False, True]))
    mem.commit()
    ref.reset(0), ref.reset(2)
    ref.write(1, keys[1], keys[1])
    assert_contents_match(mem, ref)
    # a reset slot counts positions from 0 again
    mem.stage([2], keys[2:], keys[2:])
    mem.commit()
    ref.write(2, keys[2], keys[2])
    assert_search_matches(mem, ref, unit(S, H, 4, D, seed=3), k=16)


def test_staged_writes_invisible_until_commit_and_restage_replaces():
    mem = KNNMemory(S, H, 16, D)
    first, second, other = unit(2, H, 4, D, seed=4), unit(2, H, 3, D, seed=5), unit(1, H, 2, D, seed=6)
    mem.stage(slice(0, 2), first, first)
    mem.stage([2], other, other)  # another micro-batch: accumulates
    mem.stage(slice(0, 2), second, second)  # recomputed forward: replaces `first`
    assert mem.fill.tolist() == [0, 0, 0]
    assert not mem.search(unit(S, H, 2, D, seed=7), k=2).valid.any()
    mem.commit()
    assert mem.fill.tolist() == [3, 3, 2]
    keys, _, _ = mem.contents()
    assert torch.equal(keys[:2, :, -3:], second) and torch.equal(keys[2, :, -2:], other[0])
    mem.commit()  # the stage was cleared
    assert mem.fill.tolist() == [3, 3, 2]


@pytest.mark.parametrize("slots", [None, slice(1, 3), [2, 0]])
def test_search_equals_float64_reference(slots):
    mem, ref = KNNMemory(S, H, 64, D), Reference(64)
    fill_both(mem, ref, steps=5, seed=8)
    mem.reset([1])
    ref.reset(1)
    mem.stage([1], unit(1, H, 10, D, seed=9), torch.zeros(1, H, 10, D))  # partially filled slot
    mem.commit()
    ref.write(1, unit(1, H, 10, D, seed=9)[0], torch.zeros(H, 10, D))
    n = 3 if slots is None else 2
    assert_search_matches(mem, ref, unit(n, H, 7, D, seed=10), k=12, slots=slots)


def test_chunked_equals_unchunked():
    queries = unit(S, H, 9, D, seed=11)
    results = []
    for chunk in (5, 32, 200):
        mem = KNNMemory(S, H, 200, D, search_chunk_size=chunk)
        fill_both(mem, Reference(200), steps=6, seed=12)
        results.append(mem.search(queries, k=20))
    for r in results[1:]:
        assert torch.equal(r.positions, results[0].positions)
        assert torch.equal(r.valid, results[0].valid)
        torch.testing.assert_close(r.scores, results[0].scores, atol=1e-6, rtol=0)


def test_k_larger_than_fill_is_masked():
    mem, ref = KNNMemory(S, H, 32, D, search_chunk_size=4), Reference(32)
    keys = unit(2, H, 5, D, seed=13)
    mem.stage(slice(0, 2), keys, keys)
    mem.commit()
    for i in range(2):
        ref.write(i, keys[i], keys[i])
    r = assert_search_matches(mem, ref, unit(S, H, 3, D, seed=14), k=8)  # slot 2 is empty
    assert r.valid.sum(-1).tolist() == [[[5] * 3] * H] * 2 + [[[0] * 3] * H]
    assert torch.isneginf(r.scores[~r.valid]).all()


def test_bf16_storage_rerank_recall_and_half_bytes():
    mem, ref = KNNMemory(1, H, 4096, D, dtype=torch.bfloat16, search_chunk_size=1000), Reference(4096, torch.bfloat16)
    keys = unit(1, H, 4096, D, seed=15)
    mem.stage([0], keys, keys)
    mem.commit()
    ref.write(0, keys[0], keys[0])
    queries, k = unit(1, H, 64, D, seed=16), 32
    r = mem.search(queries, k)
    assert r.keys.dtype == r.values.dtype == torch.float32
    _, want = ref.search(0, queries[0], k)
    recall = (r.positions[0].unsqueeze(-1) == want.unsqueeze(-2)).any(-1).float().mean()
    assert recall == 1.0
    # without the fp32 re-rank, bf16 scores alone do lose neighbours: the re-rank is doing work
    coarse = KNNMemory(1, H, 4096, D, dtype=torch.bfloat16, rerank_factor=1)
    coarse.stage([0], keys, keys)
    coarse.commit()
    assert not torch.equal(coarse.search(queries, k).positions, want.unsqueeze(0))
    fp32 = KNNMemory(1, H, 4096, D)
    assert mem.nbytes - 16 == (fp32.nbytes - 16) // 2


def test_bf16_storage_with_float32_scores_is_exact():
    mem, ref = KNNMemory(S, H, 300, D, dtype=torch.bfloat16, score_dtype=torch.float32, search_chunk_size=64), \
        Reference(300, torch.bfloat16)
    fill_both(mem, ref, steps=4, seed=30)
    assert_search_matches(mem, ref, unit(S, H, 8, D, seed=31), k=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_faiss_backend_equals_torch(dtype):
    pytest.importorskip("faiss")
    mems = [KNNMemory(S, H, 128, D, dtype=dtype, backend=b) for b in ("torch", "faiss")]
    for mem in mems:
        fill_both(mem, Reference(128), steps=4, seed=17)
        mem.reset([0])
        mem.stage([0], unit(1, H, 6, D, seed=18), unit(1, H, 6, D, seed=19))
        mem.commit()
    a, b = (m.search(unit(2, H, 11, D, seed=20), k=16, slots=slice(0, 2)) for m in mems)
    assert torch.equal(a.positions, b.positions) and torch.equal(a.valid, b.valid)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.keys, b.keys)


@pytest.mark.parametrize("new_capacity", [40, 11])
def test_resize_keeps_contents_and_positions(new_capacity):
    mem, ref = KNNMemory(S, H, 24, D), Reference(24)
    fill_both(mem, ref, steps=4, seed=21)
    mem.reset([2])
    ref.reset(2)
    mem.resize(new_capacity)
    ref.capacity = new_capacity
    for s in range(S):
        ref.entries[s] = ref.entries[s][-new_capacity:]
    assert mem.capacity == new_capacity and mem.keys.shape[2] == new_capacity
    assert_contents_match(mem, ref)
    assert_search_matches(mem, ref, unit(S, H, 5, D, seed=22), k=10)
    # and it keeps behaving as a ring afterwards
    fill_both(mem, ref, steps=3, seed=23)
    assert_contents_match(mem, ref)
    assert_search_matches(mem, ref, unit(S, H, 5, D, seed=24), k=10)


def test_state_dict_round_trip():
    mem, ref = KNNMemory(S, H, 20, D, dtype=torch.bfloat16), Reference(20, torch.bfloat16)
    fill_both(mem, ref, steps=4, seed=25)
    mem.resize(30)  # origin != 0 must survive too
    ref.capacity = 30
    sd = {k: v.clone() for k, v in mem.state_dict().items()}
    other = KNNMemory(S, H, 30, D, dtype=torch.bfloat16)
    other.stage([0], unit(1, H, 3, D, seed=26), unit(1, H, 3, D, seed=26))
    other.load_state_dict(sd)
    other.commit()  # loading dropped the stale stage
    for key, value in mem.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)
    fill_both(other, ref, steps=2, seed=27)  # the ring pointers continue where they were
    assert_contents_match(other, ref)
    with pytest.raises(ValueError, match="capacity"):
        KNNMemory(S, H, 20, D).load_state_dict(sd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nbytes_equals_memory_bytes(dtype):
    mem = KNNMemory(S, H, 50, D, dtype=dtype)
    assert mem.nbytes == memory_bytes(S, H, 50, D, dtype)
    mem.resize(70)
    assert mem.nbytes == memory_bytes(S, H, 70, D, dtype)
    # sizing without allocating: 262K pairs per slot, 8 slots x 8 heads x 64 dims in bf16
    assert memory_bytes(8, 8, 262144, 64, torch.bfloat16) == 2 * 8 * 8 * 262144 * 64 * 2 + 2 * 8 * 8


def test_clear_errors():
    mem = KNNMemory(S, H, 10, D)
    with pytest.raises(ValueError, match="capacity"):
        mem.search(unit(S, H, 2, D, seed=28), k=11)
    with pytest.raises(ValueError, match="queries"):
        mem.search(unit(S, H + 1, 2, D, seed=28), k=2)
    with pytest.raises(ValueError, match="queries"):
        mem.search(unit(S, H, 2, D, seed=28), k=2, slots=[0])
    with pytest.raises(ValueError, match="keys"):
        mem.stage([0], unit(1, H, 2, D + 1, seed=28), unit(1, H, 2, D, seed=28))
    with pytest.raises(ValueError, match="dtype"):
        KNNMemory(S, H, 10, D, dtype=torch.float16)
    with pytest.raises(ValueError, match="score_dtype"):
        KNNMemory(S, H, 10, D, score_dtype=torch.float64)
    with pytest.raises(ValueError, match="backend"):
        KNNMemory(S, H, 10, D, backend="annoy")


def test_no_grad_and_no_parameters():
    mem = KNNMemory(1, H, 8, D)
    keys = unit(1, H, 4, D, seed=29).requires_grad_()
    mem.stage([0], keys * 2, keys * 2)
    mem.commit()
    r = mem.search(keys, k=2)
    assert not any(t.requires_grad for t in (r.keys, r.values, r.scores))
    assert not isinstance(mem, torch.nn.Module)
