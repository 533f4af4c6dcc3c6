"""The XL cache: one previous segment per slot (named tensors per position), written only at commit,
emptied per document."""

import pytest
import torch

from megatron_memorizing.segment_cache import SegmentCache


def cache(slots=4, length=3, width=2):
    return SegmentCache(slots, length, {"inputs": (width,)}, dtype=torch.float32, device=torch.device("cpu"))


def segment(value, slots=2, length=3, width=2):
    return torch.full((slots, length, width), float(value))


def test_a_staged_segment_is_read_only_after_commit_and_a_rerun_replaces_it():
    c = cache()
    c.stage(slice(0, 2), inputs=segment(1))
    cached, filled = c.contents(slice(0, 2))
    assert not filled.any() and cached["inputs"].abs().sum() == 0  # forward of this step still sees the old state
    c.stage(slice(0, 2), inputs=segment(2))  # the same micro-batch again (activation recompute)
    c.stage(slice(2, 4), inputs=segment(3))
    c.commit()
    cached, filled = c.contents(slice(0, 4))
    assert filled.all() and cached["inputs"][:2].eq(2).all() and cached["inputs"][2:].eq(3).all()
    assert c.fill.tolist() == [3, 3, 3, 3]


def test_a_new_document_forgets_only_its_slot():
    c = cache()
    c.stage(slice(0, 4), inputs=segment(1, slots=4))
    c.commit()
    c.reset(torch.tensor([False, True, False, False]))
    assert c.contents(slice(0, 4))[1].tolist() == [True, False, True, True]


def test_state_round_trips_and_another_layout_is_refused():
    c = cache()
    c.stage(slice(0, 4), inputs=torch.randn(4, 3, 2))
    c.commit()
    restored = cache()
    restored.load_state_dict(c.state_dict())
    assert torch.equal(restored.segments["inputs"], c.segments["inputs"]) and torch.equal(restored.filled, c.filled)
    with pytest.raises(ValueError, match="resume with the saved layout"):
        cache(slots=2).load_state_dict(c.state_dict())
    other_fields = SegmentCache(
        4, 3, {"keys": (1, 2), "values": (1, 2)}, dtype=torch.float32, device=torch.device("cpu")
    )
    with pytest.raises(ValueError, match="resume with the saved layout and XL cache settings"):
        other_fields.load_state_dict(c.state_dict())
    with pytest.raises(ValueError, match="whole segments of length 3"):
        c.stage(slice(0, 2), inputs=torch.zeros(2, 5, 2))
    with pytest.raises(ValueError, match="does not fit this cache of"):
        other_fields.stage(slice(0, 2), keys=torch.zeros(2, 3, 1, 2))
