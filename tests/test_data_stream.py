import json

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_memorizing.data import DataError, DocumentStream, IncompatibleError

from fixtures.data_corpus import build_small_data


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return build_small_data(tmp_path_factory.getbasetemp() / "small_data")


def documents(prefix) -> list[np.ndarray]:
    dataset = IndexedDataset(str(prefix))
    return [dataset[i].astype(np.int64) for i in range(len(dataset))]


def reference_batches(docs, orders, B, L, steps):
    """The stream's contract, read the slow obvious way: slot i keeps a list of its document's
    remaining tokens; when fewer than 2 are left it takes the next document of `orders`."""
    queue = (doc for order in orders for doc in order)
    slots = [None] * B  # [document id, offset, remaining tokens]
    for _ in range(steps):
        rows = []
        for i in range(B):
            new = False
            if slots[i] is None or len(slots[i][2]) < 2:
                doc = next(queue, None)
                slots[i] = None if doc is None else [doc, 0, list(docs[doc])]
                new = doc is not None
            if slots[i] is None:
                rows.append(([0] * L, [0] * L, [0.0] * L, False, -1, 0))
                continue
            doc, offset, rest = slots[i]
            n = min(L, len(rest) - 1)
            pad = [0] * (L - n)
            rows.append((rest[:n] + pad, rest[1 : n + 1] + pad, [1.0] * n + [0.0] * (L - n), new, doc, offset))
            slots[i] = [doc, offset + n, rest[n:]]
        yield [torch.tensor([row[k] for row in rows]) for k in range(6)]


def as_tuple(batch):
    return (batch.tokens, batch.labels, batch.loss_mask, batch.new_document, batch.document_ids, batch.offsets)


def assert_same(batch, expected):
    for got, want in zip(as_tuple(batch), expected):
        assert torch.equal(got, want.to(got.dtype))


@pytest.mark.parametrize("B,L,dp_size", [(1, 64, 1), (3, 100, 1), (2, 256, 2), (4, 37, 3)])
def test_in_order_stream_equals_reference(data, B, L, dp_size):
    docs = documents(data.prefix("train"))
    for rank in range(dp_size):
        stream = DocumentStream(data.prefix("train"), B, L, rank, dp_size, loop=False)
        batches = list(stream)
        assert len(batches) == stream.total_steps
        expected = list(reference_batches(docs, [stream.documents], B, L, len(batches)))
        for batch, want in zip(batches, expected):
            assert_same(batch, want)


def test_looping_shuffled_stream_equals_reference_over_epochs(data):
    docs = documents(data.prefix("validation"))
    B, L, seed = 3, 512, 7
    stream = DocumentStream(data.prefix("validation"), B, L, seed=seed)
    orders = [np.random.default_rng([seed, epoch]).permutation(stream.documents) for epoch in range(4)]
    steps = 2 * sum(-(-(len(docs[d]) - 1) // L) for d in stream.documents) // B  # about two epochs
    for want in reference_batches(docs, orders, B, L, steps):
        assert_same(next(stream), want)
    assert stream.epoch >= 1


def test_every_token_once_per_epoch_across_ranks(data):
    docs = documents(data.prefix("train"))
    dp_size, B, L = 3, 2, 128
    seen_inputs = {}  # doc -> {offset: tokens}
    steps = set()
    for rank in range(dp_size):
        stream = DocumentStream(data.prefix("train"), B, L, rank, dp_size, loop=False, shuffle=True, seed=3)
        count = 0
        for batch in stream:
            count += 1
            for i in range(B):
                n = int(batch.loss_mask[i].sum())
                assert batch.loss_mask[i, :n].all() and not batch.loss_mask[i, n:].any()  # padding only at the end
                if n:
                    doc, offset = int(batch.document_ids[i]), int(batch.offsets[i])
                    assert offset not in seen_inputs.setdefault(doc, {}), "a segment was read twice"
                    seen_inputs[doc][offset] = (batch.tokens[i, :n], batch.labels[i, :n])
        steps.add(count)
    assert len(steps) == 1, "all DP ranks must take the same number of evaluation steps"
    assert set(seen_inputs) == set(range(len(docs)))
    for doc, segments in seen_inputs.items():
        inputs = torch.cat([segments[o][0] for o in sorted(segments)])
        labels = torch.cat([segments[o][1] for o in sorted(segments)])
        assert torch.equal(inputs, torch.from_numpy(docs[doc][:-1]))
        assert torch.equal(labels, torch.from_numpy(docs[doc][1:]))


def test_shards_are_disjoint_and_balanced(data):
    dp_size, L = 4, 256
    shards = [DocumentStream(data.prefix("train"), 2, L, r, dp_size).documents for r in range(dp_size)]
    everything = np.concatenate(shards)
    assert len(everything) == len(set(everything.tolist())) == len(documents(data.prefix("train")))
    lengths = np.array([len(d) for d in documents(data.prefix("train"))])
    loads = [int((-(-(lengths[s] - 1) // L)).sum()) for s in shards]
    assert max(loads) - min(loads) <= int((-(-(lengths - 1) // L)).max())


def test_long_document_keeps_its_slot(data):
    L = 16
    stream = DocumentStream(data.prefix("train"), 2, L)
    docs = documents(data.prefix("train"))
    prev = first = next(stream)
    steps = min(len(docs[d]) - 1 for d in first.document_ids.tolist()) // L
    assert steps >= 5
    for step in range(1, steps):
        batch = next(stream)
        assert torch.equal(batch.document_ids, first.document_ids)
        assert torch.equal(batch.offsets, first.offsets + L * step)
        assert not batch.new_document.any()
        assert torch.equal(batch.tokens[:, 0], prev.labels[:, -1])  # segments continue the document
        prev = batch


def test_new_document_flag_marks_first_segments(data):
    stream = DocumentStream(data.prefix("validation"), 3, 200)
    for _ in range(200):
        batch = next(stream)
        assert torch.equal(batch.new_document, batch.offsets == 0)


def test_save_restore_reproduces_batches(data):
    args = (data.prefix("validation"), 3, 300)
    stream = DocumentStream(*args, seed=5)
    epoch_steps = DocumentStream(*args, seed=5, loop=False, shuffle=True).total_steps
    for _ in range(epoch_steps + 2):
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))
    assert state["epoch"] >= 1  # the saved position is past an epoch boundary
    expected = [next(stream) for _ in range(2 * epoch_steps)]
    resumed = DocumentStream(*args, seed=5)
    resumed.load_state_dict(state)
    assert resumed.epoch == state["epoch"]
    for want in expected:
        assert_same(next(resumed), as_tuple(want))


def test_same_arguments_same_stream_and_seed_changes_order(data):
    a, b = (DocumentStream(data.prefix("train"), 2, 64, seed=1) for _ in range(2))
    for _ in range(5):
        assert_same(next(a), as_tuple(next(b)))
    first_documents = {tuple(next(DocumentStream(data.prefix("train"), 4, 64, seed=s)).document_ids.tolist())
                       for s in range(4)}
    assert len(first_documents) > 1


def test_restore_into_other_settings_is_refused(data):
    state = DocumentStream(data.prefix("train"), 2, 64).state_dict()
    with pytest.raises(IncompatibleError, match="batch_size: saved 2, now 3"):
        DocumentStream(data.prefix("train"), 3, 64).load_state_dict(state)
    with pytest.raises(IncompatibleError, match="documents"):
        DocumentStream(data.prefix("test"), 2, 64).load_state_dict(state)


def test_rank_without_documents_is_an_error_when_looping(data):
    n = len(documents(data.prefix("test")))
    with pytest.raises(DataError, match="too few"):
        DocumentStream(data.prefix("test"), 1, 64, dp_rank=n, dp_size=n + 1)
    # Evaluation may have idle ranks: they pad until the others are done.
    idle = DocumentStream(data.prefix("test"), 1, 64, dp_rank=n, dp_size=n + 1, loop=False)
    batches = list(idle)
    assert len(batches) == idle.total_steps > 0
    assert all(b.loss_mask.sum() == 0 for b in batches)
