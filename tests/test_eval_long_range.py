"""Long-range tokens on a handcrafted document: which predictions only a memory can help with."""

import torch

from megatron_memorizing.eval.long_range import REPEATED_LOCALLY as LOCAL
from megatron_memorizing.eval.long_range import LongRangeTokens

L = 4  # segment length
# Positions:   0  1  2  3 | 4  5  6  7 | 8  9 10 11 | 12 13 14 15 | 16
DOCUMENT = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 9, 5, 6, 7, 8, 1]


def segments(document, first_new=True, length=L):
    """(tokens, labels, new_document, offsets) per segment of one slot, as the stream yields them."""
    for k, start in enumerate(range(0, len(document) - 1, length)):
        yield (torch.tensor([document[start : start + length]]),
               torch.tensor([document[start + 1 : start + length + 1]]),
               torch.tensor([first_new and k == 0]), torch.tensor([start]))


def marks(document, window, **kwargs):
    selector = LongRangeTokens(slots=1, segment_length=L, n=2, window=window)
    return [selector.mark(*segment)[0].tolist() for segment in segments(document, **kwargs)]


def test_a_repeat_beyond_local_attention_is_long_range_by_distance():
    # Bucket 1 is "2-3 segments back". Label positions 10 (the 3-gram 1 2 3 ended at 2), 14 (5 6 7,
    # at 6), 15 (6 7 8, at 7) and 16 (7 8 1, at 8) repeat grams last seen before their segment.
    assert marks(DOCUMENT, window=1) == [[-1] * 4, [-1] * 4, [-1, 1, -1, -1], [-1, 1, 1, 1]]


def test_the_xl_window_counts_as_local():
    # With the previous segment visible too, the gram ending at 8 (segment 2) is a local repeat for label 16.
    assert marks(DOCUMENT, window=2) == [[-1] * 4, [-1] * 4, [-1, 1, -1, -1], [-1, 1, 1, LOCAL]]


def test_only_the_latest_occurrence_counts():
    # Every 3-gram of a run of one token occurred just before: a local repeat, never long-range (the
    # first label has no 2 tokens before it; the second's gram is new). A period of 3 across
    # segments of 4 is: the gram ending at 5 was last seen at 2, outside segment 1; those ending at
    # 7 and 8 were last seen at 4 and 5, inside it.
    assert marks([7] * 9, window=1) == [[-1, -1, LOCAL, LOCAL], [LOCAL] * 4]
    assert marks([1, 2, 3] * 3, window=1) == [[-1] * 4, [0, 0, LOCAL, LOCAL]]


def test_a_new_document_forgets_the_previous_one():
    selector = LongRangeTokens(slots=1, segment_length=L, n=2, window=1)
    for segment in segments(DOCUMENT[:9]):
        selector.mark(*segment)
    again = [selector.mark(*segment)[0].tolist() for segment in segments(DOCUMENT)]
    assert again == marks(DOCUMENT, window=1)  # as if nothing had been read before


def test_a_stream_read_in_longer_segments_is_scored_on_the_same_tokens():
    # The long-context reference reads 8 tokens at a time; the tokens are still those that are
    # long-range for a model reading 4 at a time.
    selector = LongRangeTokens(slots=1, segment_length=L, n=2, window=1)
    read_in_eights = [selector.mark(*segment)[0].tolist() for segment in segments(DOCUMENT, length=8)]
    assert sum(read_in_eights, []) == sum(marks(DOCUMENT, window=1), [])
