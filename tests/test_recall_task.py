"""The long-range recall task: deterministic documents whose answers are well defined and lie, for
a large share of queries, many segments back; the dataset the pipeline makes of them; and the
accuracy-by-distance evaluation counting every query once."""

from collections import Counter

import numpy as np
import pytest
import torch

from data_tools.recall_task import (
    DEFINE,
    PASS,
    QUERY,
    RecallSpec,
    build,
    document_words,
    generate_document,
    generate_split,
)
from megatron_memorizing.data import DocumentStream, load_tokenizer, open_indexed_dataset
from megatron_memorizing.eval import recall
from megatron_memorizing.eval.recall import distance_bucket, find_queries, recall_accuracy, task_tokens
from megatron_memorizing.memories import ModelMemories
from megatron_memorizing.model import build_model

from tiny import tiny_config

SMALL = RecallSpec(num_keys=64, num_values=8, statements=40)
FACTS = RecallSpec(num_keys=24, num_values=4, statements=40, format="facts")  # `pass` once 24 keys are used


@pytest.fixture(scope="module")
def recall_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("recall")
    build(out, SMALL, {"train": 4, "validation": 3})
    return out


def query_distances(spec, statements) -> list[int]:
    """Tokens from each query's answer back to its definition's value, checking the answer."""
    defined, queried, distances, position = {}, set(), [], 0
    for op, key, value in statements:
        words = spec.statement_words(op, key, value)
        if op == PASS:
            # filler only before anything else (lead filler) or once keys run out
            assert words == [PASS] and len(defined) in ((0, spec.num_keys) if spec.lead_filler else (spec.num_keys,))
        elif op == QUERY:
            assert key in defined and key not in queried
            assert defined[key][1] == value, "a query's answer is not its definition's value"
            queried.add(key)
            distances.append(position + 2 - defined[key][0])
        else:
            assert key not in defined, "a key is defined twice in one document"
            defined[key] = (position + words.index(value) if value in words else position, value)
        position += len(words)
    return distances


def test_documents_are_deterministic_per_seed():
    assert generate_split(SMALL, 3, seed=5) == generate_split(SMALL, 3, seed=5)
    assert generate_split(SMALL, 3, seed=5) != generate_split(SMALL, 3, seed=6)


def test_answers_are_defined_earlier_and_many_lie_far_beyond_a_segment():
    rng = np.random.default_rng(0)
    spec = RecallSpec()  # the shipped task: 1020-token documents, read in segments of 32
    distances = np.array([d for _ in range(50) for d in query_distances(spec, generate_document(spec, rng))])
    segment = 32
    assert len(distances) > 50 * spec.statements // 3  # about half the statements are queries
    assert (distances < segment).mean() > 0.2  # inside the local segment: the curriculum
    assert (distances >= 8 * segment).mean() > 0.3  # only memory can answer these
    assert distances.max() >= 24 * segment


def test_an_evaluation_set_of_far_queries_only():
    """min_back: every answer lies at least that many statements (so tokens) back, and the
    documents still ask about every key they define."""
    spec = RecallSpec(num_keys=16, num_values=8, statements=600, format="echo", min_back=256)
    rng = np.random.default_rng(0)
    documents = [generate_document(spec, rng) for _ in range(20)]
    distances = [d for statements in documents for d in query_distances(spec, statements)]
    assert min(distances) >= 256 and max(distances) > 300
    assert len(distances) == 20 * spec.num_keys


def test_lead_filler_puts_far_definitions_at_every_offset_of_a_segment():
    """Far-query documents open with a run of 4-token definitions: without lead filler each lies
    inside one 8-token segment; with it, every offset occurs and some are split between two."""
    far = dict(num_keys=16, num_values=64, statements=600, format="echo", min_back=256)
    offsets = {}
    for lead_filler in (0, 7):
        spec = RecallSpec(**far, lead_filler=lead_filler)
        rng = np.random.default_rng(0)
        seen = set()
        for _ in range(40):
            statements = generate_document(spec, rng)
            assert len(query_distances(spec, statements)) == spec.num_keys  # still every key asked, far back
            position = 0
            for op, key, value in statements:
                if op == DEFINE:
                    seen.add(position % 8)
                position += len(spec.statement_words(op, key, value))
        offsets[lead_filler] = seen
    assert offsets[0] == {0, 4}  # never split: a definition is tokens offset..offset+3
    assert offsets[7] == set(range(8))  # offsets 5, 6, 7 split a definition between segments


@pytest.mark.parametrize("spec", [SMALL, FACTS], ids=["statements", "facts"])
def test_the_pipeline_keeps_one_token_per_word_and_the_distances(tmp_path, spec):
    build(tmp_path, spec, {"validation": 3})
    tokenizer = load_tokenizer(tmp_path / "tokenizer.model")
    documents = open_indexed_dataset(tmp_path / "validation")
    task = task_tokens(str(tmp_path / "validation"))
    assert task.num_values == spec.num_values
    assert len(task.facts) == (spec.num_keys * spec.num_values if spec.format == "facts" else 0)
    rng = np.random.default_rng(1)  # the validation split's seed (build's seed 0)
    passes = []
    for d in range(3):
        statements = generate_document(spec, rng)
        words = document_words(spec, statements)
        tokens = documents.read(d, 0, int(documents.length[d]))
        assert len(tokens) == len(words) + 1 and tokens[-1] == tokenizer.eod_id  # one token per word
        assert tokenizer.decode(tokens[:-1]) == "".join(words)
        assert [dist for _, dist in find_queries(tokens, task)] == query_distances(spec, statements)
        passes.append(words.count(PASS))
    assert (sum(passes) > 0) == (spec is FACTS)  # the small key set runs out: filler appears


def test_distance_buckets_are_whole_segment_octaves():
    assert ([distance_bucket(d, 32) for d in (0, 31, 32, 63, 64, 127, 128, 255, 256, 1000)]
            == [0, 0, 1, 1, 2, 2, 3, 3, 4, 5])
    assert [recall.bucket_range(b) for b in (0, 1, 4)] == [(0, 1), (1, 2), (8, 16)]


def test_recall_accuracy_scores_every_query_once(single_rank, recall_data):
    prefix = str(recall_data / "validation")
    config = tiny_config(vocab_size=1024, segment_length=16, memory_size=64)
    torch.manual_seed(0)
    chunks = build_model(config)
    task = task_tokens(prefix)
    stream = DocumentStream(prefix, config.memory_slots, config.segment_length, loop=False)
    result = recall_accuracy(chunks, ModelMemories(chunks, config.micro_batch_size), stream, task)

    documents = open_indexed_dataset(prefix)
    expected = [dist for d in range(len(documents))
                for _, dist in find_queries(documents.read(d, 0, int(documents.length[d])), task)]
    assert ({bucket: row[1] for bucket, row in result.buckets.items()}
            == Counter(distance_bucket(d, 16) for d in expected))
    assert all(0 <= r["accuracy"] <= 1 and 0 < r["mean_probability"] < 1 for r in result.rows())
