"""The memory's lookup score: the token to copy across segments, scores known in advance, and the
command."""

import json

import pytest
import torch
from scripts.ckpt_weights import train_state
from test_eval_lookup_heads import loaded
from test_eval_perplexity import data  # noqa: F401  (the module-scoped dataset fixture)

from megatron_memorizing.eval import memory_lookups
from megatron_memorizing.eval.lookup_heads import lookup_targets
from megatron_memorizing.eval.memory_lookups import DocumentLookups, memory_attentions, score_memory_heads
from megatron_memorizing.training.checkpoint import Checkpointer

from tiny import segment_batches


@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_document_read_in_segments_has_the_targets_of_the_whole(n):
    g = torch.Generator().manual_seed(n)
    document = torch.randint(0, 5, (40,), generator=g).tolist()
    reader = DocumentLookups(n)
    read = [t for offset in range(0, 40, 8) for t in reader.targets(document[offset : offset + 8], offset, offset == 0)]
    assert read == lookup_targets(document, n)
    # A new document forgets the old one: its first tokens find nothing before them.
    assert reader.targets(document[:8], 0, new_document=True) == lookup_targets(document[:8], n)


def documents(model, steps: int) -> torch.Tensor:
    """One document per slot of 3 token kinds, so 3-grams recur in earlier segments."""
    config = model.config.model
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 3, (config.memory_slots, steps * config.segment_length + 1), generator=g)


def expected_queries(model, tokens: torch.Tensor, n: int) -> list[tuple[int, int]]:
    """(slot, query position) of every token whose token to copy lies in memory: before the
    query's segment, within the memory's last memory_size pairs."""
    config = model.config.model
    found = []
    for slot, row in enumerate(tokens[:, :-1].tolist()):
        for position, target in enumerate(lookup_targets(row, n)):
            segment_start = position - position % config.segment_length
            if 0 <= target < segment_start and target >= segment_start - config.memory_size:
                found.append((slot, position))
    return found


def test_a_search_that_returns_the_whole_memory_finds_every_target(single_rank):
    """With top-k = the memory's size every pair is retrieved: found is 1 for every head; with the
    temperature near zero the softmax is even over what the slot's memory holds, so the weight is
    the mean of 1 / min(segment start, memory size) over the counted queries."""
    model = loaded(knn_top_k=40)
    with torch.no_grad():
        for layer in memory_attentions(model.model_chunks).values():
            layer.memory_log_scale.fill_(-60.0)
    tokens = documents(model, 5)
    scores = score_memory_heads(model, segment_batches(tokens, 16), n=3)

    queries = expected_queries(model, tokens, 3)
    assert scores.queries == len(queries) > 0 and scores.layers == [3]
    torch.testing.assert_close(scores.found, torch.ones(1, 4))
    assert (scores.best < 1).all()  # among 40 pairs of 3 token kinds, the one to copy is not always first
    mean_weight = sum(1 / min(p - p % 16, 40) for _, p in queries) / len(queries)
    torch.testing.assert_close(scores.weight, torch.full((1, 4), mean_weight), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.gate, torch.full((1, 4), 0.5))


def test_a_narrow_search_finds_fewer_and_weighs_no_more_than_it_finds(single_rank):
    model = loaded(knn_top_k=2)
    tokens = documents(model, 5)
    scores = score_memory_heads(model, segment_batches(tokens, 16), n=3)
    assert ((scores.found > 0) & (scores.found < 1)).all() and (scores.best <= scores.found).all()
    assert (scores.weight <= scores.found + 1e-6).all() and (scores.weight > 0).all()


def test_the_command_writes_table_and_json_and_refuses_a_model_without_memory(single_rank, data, tmp_path,  # noqa: F811
                                                                              capsys):
    state = train_state(data, tmp_path / "run" / "checkpoints", segment_length=16)
    saved = Checkpointer(state.run_config.checkpoint).save(state)
    out = tmp_path / "eval"
    assert memory_lookups.main(["--checkpoint", str(saved.parent), "--data", data, "--segments", "6", "--n", "1",
                                "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "found:" in printed and "best:" in printed and "weight:" in printed and "wrote" in printed
    summary = json.loads((out / "memory_lookups.json").read_text())
    assert summary["queries"] > 0 and list(summary["found"]) == ["3"]
    assert all(0 <= w <= f <= 1 and b <= f for f, b, w in zip(*(summary[k]["3"] for k in ("found", "best", "weight"))))

    with pytest.raises(SystemExit) as exit_:
        memory_lookups.main(["--checkpoint", str(saved.parent), "--data", data, "--set", "model.memory_layers=[]",
                             "--allow-other-model", "--out", str(out / "none")])
    message = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(message) == 1 and "no memory layer" in message[0]
    assert not (out / "none").exists()
