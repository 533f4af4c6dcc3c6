"""Retrieval inspection: the tokens memory helps most, each with neighbours that really come from
earlier segments of the same document, and the text and HTML renderings of them."""

import pytest
from test_eval_perplexity import data, loaded_model  # noqa: F401  (the module-scoped dataset fixture)

from megatron_memorizing.data import load_tokenizer, open_indexed_dataset
from megatron_memorizing.eval.inspect_retrieval import Renderer, inspect_document, render_html, render_text


@pytest.fixture(scope="module")
def inspection(single_rank, data):  # noqa: F811
    loaded = loaded_model(data, memory_size=64, micro_batch_size=1, num_micro_batches=1)
    return inspect_document(loaded, data, document=2, top=5, per_head=2)


def test_highlights_are_the_largest_gains_with_neighbours_from_earlier_segments(inspection, data):  # noqa: F811
    documents = open_indexed_dataset(data)
    assert inspection.tokens == documents.read(2, 0, int(documents.length[2])).tolist()
    gains = [h.gain for h in inspection.highlights]
    assert len(gains) == 5 and gains == sorted(gains, reverse=True) and gains[0] > 0
    length = inspection.segment_length
    for h in inspection.highlights:
        assert h.position >= length  # the first segment has no memory, so no gain
        assert len(h.neighbours) == 4 * 2  # every head, two neighbours each
        for n in h.neighbours:
            segment_start = h.position // length * length
            # committed pairs of this document only: earlier segments, within the memory's reach
            assert 0 <= n.position < segment_start and n.position >= segment_start - 64
            assert n.distance == h.position - n.position and -1 <= n.score <= 1


def test_renderings_mark_the_tokens_and_escape_the_text(inspection, data):  # noqa: F811
    tokenizer = load_tokenizer(f"{data[: data.rindex('/')]}/tokenizer.model")
    renderer = Renderer(tokenizer, inspection.tokens, context=4)
    p = inspection.highlights[0].position
    before, token, after = renderer.pieces(p)
    assert before + token + after == tokenizer.decode(inspection.tokens[p - 4 : p + 2])
    assert renderer.plain(p) == "…" + f"{before}[{token}]{after}".replace("\n", "↵")

    text = render_text(inspection, renderer, "title")
    assert text.count("\n#") == 5 and text.count(" back  score ") == 5 * 8

    page = render_html(inspection, renderer, "a <title>")
    assert "<title>a &lt;title&gt;</title>" in page and page.count("<mark>") == 5 * 9

    ids = tokenizer.encode(" k001<b>&")
    marked = Renderer(tokenizer, ids, context=8).html(len(ids) - 1)
    assert "&lt;b&gt;" in marked and "<b>" not in marked
