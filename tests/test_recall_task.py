"""The long-range recall task: deterministic documents whose answers are well defined and lie, for
a large share of queries, many segments back; the dataset the pipeline makes of them; and the
accuracy-by-distance evaluation counting every query once."""

from collections import Counter

import numpy as np
import pytest
import torch

from data_tools.recall_task import DEFINE, QUERY, STATEMENT_TOKENS, RecallSpec, build, generate_document, generate_split
from megatron_memorizing.data import DocumentStream, Tokenizer, open_indexed_dataset
from megatron_memorizing.eval import recall
from megatron_memorizing.eval.recall import distance_bucket, find_queries, recall_accuracy, task_ids
from megatron_memorizing.memories import ModelMemories
from megatron_memorizing.model import build_model
from tiny import tiny_config

SMALL = RecallSpec(num_keys=64, num_values=8, statements=40)


@pytest.fixture(scope="module")
def recall_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("recall")
    build(out, SMALL, {"train": 4, "validation": 3})
    return out


def query_distances(statements) -> list[int]:
    """Tokens from each query's value back to its definition's value, checking the answer."""
    defined, queried, distances = {}, set(), []
    for i, (op, key, value) in enumerate(statements):
        if op == DEFINE:
            assert key not in defined, "a key is defined twice in one document"
            defined[key] = (i, value)
        else:
            assert op == QUERY and key in defined and key not in queried
            assert defined[key][1] == value, "a query's answer is not its definition's value"
            queried.add(key)
            # from the definition's value (its second token) to the query's (its third)
            distances.append(STATEMENT_TOKENS * (i - defined[key][0]) + 1)
    return distances


def test_documents_are_deterministic_per_seed():
    assert generate_split(SMALL, 3, seed=5) == generate_split(SMALL, 3, seed=5)
    assert generate_split(SMALL, 3, seed=5) != generate_split(SMALL, 3, seed=6)


def test_answers_are_defined_earlier_and_many_lie_far_beyond_a_segment():
    rng = np.random.default_rng(0)
    spec = RecallSpec()  # the shipped task: 1020-token documents, read in segments of 32
    distances = np.array([d for _ in range(50) for d in query_distances(generate_document(spec, rng))])
    segment = 32
    assert len(distances) > 50 * spec.statements // 3  # about half the statements are queries
    assert (distances < segment).mean() > 0.2  # inside the local segment: the curriculum
    assert (distances >= 8 * segment).mean() > 0.3  # only memory can answer these
    assert distances.max() >= 24 * segment


def test_the_pipeline_keeps_one_token_per_word_and_the_distances(recall_data):
    tokenizer = Tokenizer(recall_data / "tokenizer.model")
    documents = open_indexed_dataset(recall_data / "validation")
    texts = generate_split(SMALL, 3, seed=1)  # the validation split's seed (build's seed 0)
    define_id, query_id, num_values = task_ids(str(recall_data / "validation"))
    assert num_values == SMALL.num_values
    rng = np.random.default_rng(1)
    for d, text in enumerate(texts):
        tokens = documents.read(d, 0, int(documents.length[d]))
        assert len(tokens) == STATEMENT_TOKENS * SMALL.statements + 1  # + end of document
        assert tokens[-1] == tokenizer.eod_id and tokenizer.decode(tokens[:-1]) == text
        statements = generate_document(SMALL, rng)
        assert [dist for _, dist in find_queries(tokens, define_id, query_id)] == query_distances(statements)


def test_distance_buckets_are_whole_segment_octaves():
    assert [distance_bucket(d, 32) for d in (0, 31, 32, 63, 64, 127, 128, 255, 256, 1000)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 5]
    assert [recall.bucket_range(b) for b in (0, 1, 4)] == [(0, 1), (1, 2), (8, 16)]


def test_recall_accuracy_scores_every_query_once(single_rank, recall_data):
    prefix = str(recall_data / "validation")
    config = tiny_config(vocab_size=1024, segment_length=16, memory_size=64)
    torch.manual_seed(0)
    chunks = build_model(config)
    define_id, query_id, num_values = task_ids(prefix)
    stream = DocumentStream(prefix, config.memory_slots, config.segment_length, loop=False)
    result = recall_accuracy(chunks, ModelMemories(chunks, config.micro_batch_size), stream, define_id, query_id)

    documents = open_indexed_dataset(prefix)
    expected = [dist for d in range(len(documents))
                for _, dist in find_queries(documents.read(d, 0, int(documents.length[d])), define_id, query_id)]
    assert {bucket: row[1] for bucket, row in result.buckets.items()} == Counter(distance_bucket(d, 16) for d in expected)
    assert all(0 <= r["accuracy"] <= 1 and 0 < r["mean_probability"] < 1 for r in result.rows())
