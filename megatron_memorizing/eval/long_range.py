"""Long-range tokens: the predictions only a memory can help with.

A predicted token is *long-range* when the n tokens before it, together with it, occurred earlier
in the same document, but only outside what local attention sees: every earlier occurrence ends
before the current segment (and before the previous segment too, for a model with the XL cache).
Its distance is how far back the latest such occurrence ends, in segments. The mean loss over all
tokens dilutes what memory does; the loss on these tokens, by distance, with and without memory,
is where it shows.

Tokens whose (n+1)-gram last occurred *inside* what local attention sees are marked too
(REPEATED_LOCALLY): their loss against that of other tokens says whether the model copies from
its context at all. A memory can only extend a lookup the model already does locally.
"""

from __future__ import annotations

from collections import deque

import torch

# Distance buckets, in segments back: [1, 2), [2, 4), [4, 8), ... [2^15, longer).
DISTANCE_EDGES = [2**i for i in range(16)]
REPEATED_LOCALLY = -2  # the mark of a repeat inside local attention's view (-1: no repeat)


class LongRangeTokens:
    """Marks long-range tokens in a stream of segments, one document per slot, remembering each
    document's (n+1)-grams as it goes. `window` is how many segments local attention covers (1; 2
    with the XL cache)."""

    def __init__(self, slots: int, segment_length: int, n: int = 4, window: int = 1):
        if n < 1 or window < 1:
            raise ValueError(f"need n >= 1 and window >= 1, got n={n}, window={window}")
        self.segment_length, self.n, self.window = segment_length, n, window
        self._last_end = [dict() for _ in range(slots)]  # (n+1)-gram -> position of its latest last token
        self._recent = [deque(maxlen=n) for _ in range(slots)]  # the n tokens before the next target

    def _visible_from(self, position: int) -> int:
        """The first document position local attention sees when predicting the label at `position`,
        in segments of `segment_length` (whatever segments the stream is read in: a reference
        model reading longer ones is scored on the same tokens)."""
        segment = (position - 1) // self.segment_length  # the segment of the input token
        return (segment - self.window + 1) * self.segment_length

    def mark(self, tokens: torch.Tensor, labels: torch.Tensor, new_document: torch.Tensor,
             offsets: torch.Tensor) -> torch.Tensor:
        """For one batch ([slots, L], as the document stream yields it): the distance bucket index of
        every long-range label, REPEATED_LOCALLY for a repeat local attention sees, -1 elsewhere
        ([slots, L] int64)."""
        buckets = torch.full(labels.shape, -1, dtype=torch.int64)
        edges = torch.tensor(DISTANCE_EDGES)
        for slot in range(labels.shape[0]):
            last_end, recent = self._last_end[slot], self._recent[slot]
            if bool(new_document[slot]):
                last_end.clear()
                recent.clear()
                recent.append(int(tokens[slot, 0]))
            start = int(offsets[slot])
            for i, target in enumerate(labels[slot].tolist()):
                position = start + i + 1  # the label's position in the document
                if len(recent) == self.n:
                    gram = (*recent, target)
                    previous = last_end.get(gram)
                    if previous is not None and previous >= self._visible_from(position):
                        buckets[slot, i] = REPEATED_LOCALLY
                    elif previous is not None:
                        segments_back = -(-(position - previous) // self.segment_length)  # at least 1
                        buckets[slot, i] = int(torch.bucketize(torch.tensor(segments_back), edges, right=True)) - 1
                    last_end[gram] = position
                recent.append(target)
        return buckets
