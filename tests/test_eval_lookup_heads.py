"""The lookup-head score: which token is the one to copy, that the attention it reads is what each
layer computes (plain, memory and XL layers), a score known in advance, and the command."""

import json
from pathlib import Path

import pytest
import torch
from scripts.ckpt_weights import train_state
from test_eval_perplexity import data  # noqa: F401  (the module-scoped dataset fixture)

from megatron_memorizing.eval import lookup_heads
from megatron_memorizing.eval.loading import LoadedModel, forward_logits
from megatron_memorizing.eval.lookup_heads import LookupScores, advice, lookup_targets, score_heads
from megatron_memorizing.memories import ModelMemories
from megatron_memorizing.model import build_model
from megatron_memorizing.observations import stock_core_attentions, watch_local_attention
from megatron_memorizing.run.config import DataConfig, RunConfig
from megatron_memorizing.training.checkpoint import Checkpointer

from tiny import document_batches, tiny_config


def test_the_token_to_copy_follows_the_latest_earlier_occurrence():
    #        0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [5, 6, 7, 9, 5, 6, 7, 8, 5, 6, 7, 5]
    # "5 6 7" ends at 2, 6 and 10: 9 (at 3) came after it first, then 8 (at 7)
    assert lookup_targets(tokens, 3) == [-1, -1, -1, -1, -1, -1, 3, -1, -1, -1, 7, -1]
    # "5 6" ends at 1, 5, 9 and "6 7" at 2, 6, 10; "7 5" (at 11) is new
    assert lookup_targets(tokens, 2) == [-1, -1, -1, -1, -1, 2, 3, -1, -1, 6, 7, -1]
    assert lookup_targets(tokens, 1)[11] == 9  # the latest earlier 5 is at 8
    assert lookup_targets([4, 4, 4], 1) == [-1, 1, 2]  # a run: the token to copy is the query itself
    assert lookup_targets(tokens, 5) == [-1] * 12


def loaded(**overrides) -> LoadedModel:
    config = tiny_config(micro_batch_size=2, num_micro_batches=2, **overrides)
    torch.manual_seed(0)
    chunks = build_model(config)
    for chunk in chunks:
        chunk.eval()
    run = RunConfig(model=config, data=DataConfig(train="unused", validation="unused"))
    return LoadedModel(
        Path("runs/x/checkpoints/iter_0000000"), run, chunks, ModelMemories(chunks, config.micro_batch_size)
    )


def repeating_batches(steps: int, model: LoadedModel):
    """Documents of 4 token kinds, so short n-grams repeat inside every segment."""
    config = model.config.model
    return document_batches(steps, config.memory_slots, config.segment_length, vocab=4)


@pytest.mark.parametrize("variant", [{}, {"xl_cache": True}], ids=["memory", "xl"])
def test_the_probabilities_are_what_every_layer_attends_with(single_rank, variant):
    """Probabilities times values give each layer's stock core attention output exactly: memory
    layer, plain layers and an XL cache (second segment onwards) alike, over two micro-batches."""
    model = loaded(**variant)
    seen = {}

    def keep(number):
        def hook(module, args, kwargs, output):
            seen.setdefault(number, []).append((args[2], output))
        return hook

    handles = [core.register_forward_hook(keep(number), with_kwargs=True)
               for number, core in stock_core_attentions(model.model_chunks).items()]
    try:
        probabilities = {}
        with watch_local_attention(model.model_chunks, lambda n, p: probabilities.setdefault(n, []).append(p)):
            for batch in repeating_batches(3, model):
                forward_logits(model.model_chunks, model.memories, batch)
                model.memories.commit()
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(probabilities) == [1, 2, 3, 4]
    for number, records in seen.items():
        assert len(probabilities[number]) == len(records) == 3 * 2  # steps x micro-batches
        for probs, (value, output) in zip(probabilities[number], records):
            s, b = output.shape[:2]
            expected = torch.einsum("bhst,tbhd->sbhd", probs, value.float()).reshape(s, b, -1)
            torch.testing.assert_close(expected, output.float(), rtol=1e-5, atol=1e-5)
    if variant:  # the cache columns are really there once a segment has gone by
        assert probabilities[4][-1].shape[-1] == 2 * probabilities[4][-1].shape[-2]


def test_a_head_attending_evenly_scores_the_mean_inverse_position(single_rank):
    """With layer 1's projections zeroed, every query attends evenly to itself and what precedes
    it, so each head's score is the mean of 1 / (position + 1) over the counted queries."""
    model = loaded()
    with torch.no_grad():
        qkv = model.model_chunks[0].decoder.layers[0].self_attention.linear_qkv
        qkv.weight.zero_()
        if qkv.bias is not None:
            qkv.bias.zero_()
    batches = repeating_batches(2, model)
    scores = score_heads(model, batches, n=2)

    expected, count = 0.0, 0
    for batch in batches:
        for row in batch.tokens.tolist():
            for i, target in enumerate(lookup_targets(row, 2)):
                if target >= 0:
                    expected, count = expected + 1 / (i + 1), count + 1
    assert scores.queries == count > 0 and scores.layers == [1, 2, 3, 4]
    torch.testing.assert_close(scores.scores[0], torch.full((4,), expected / count), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(scores.scores[1], scores.scores[0])  # other layers keep their own attention
    assert ((scores.scores >= 0) & (scores.scores <= 1)).all()


def test_advice_names_the_lookup_layers_and_whether_the_memory_is_in_each():
    scores = LookupScores([1, 2, 3, 4], torch.tensor([[0.01] * 4, [0.01] * 4, [0.02] * 4, [0.55, 0.51, 0.01, 0.0]]),
                          queries=965, n=4)
    assert scores.lookup_heads(0.2) == {4: [1, 2]}
    assert 'layer 4 heads 1, 2' in advice(scores, [3], 0.2) and 'model.memory_layers=[4]' in advice(scores, [3], 0.2)
    assert "the memory is in every lookup layer" in advice(scores, [4], 0.2)
    two = LookupScores([1, 2], torch.tensor([[0.3, 0.0], [0.0, 0.4]]), queries=965, n=4)
    assert "in 1 of these 2 layers" in advice(two, [2], 0.2) and "model.memory_layers=[1, 2]" in advice(two, [2], 0.2)
    assert "does not copy" in advice(scores, [3], 0.9)


def test_the_command_writes_table_json_and_plot(single_rank, data, tmp_path, capsys):  # noqa: F811
    state = train_state(data, tmp_path / "run" / "checkpoints", segment_length=16)
    saved = Checkpointer(state.run_config.checkpoint).save(state)
    out = tmp_path / "eval"
    assert lookup_heads.main(["--checkpoint", str(saved.parent), "--data", data, "--segments", "4", "--n", "1",
                              "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "head 4" in printed and "(memory)" in printed and "wrote" in printed
    summary = json.loads((out / "lookup_heads.json").read_text())
    assert summary["queries"] > 0 and sorted(summary["scores"]) == ["1", "2", "3", "4"]
    assert all(0 <= s <= 1 for row in summary["scores"].values() for s in row)
    assert (out / "lookup_heads.png").stat().st_size > 0

    with pytest.raises(SystemExit) as exit_:
        lookup_heads.main(["--checkpoint", str(saved.parent), "--data", data, "--segments", "1", "--n", "30",
                           "--out", str(out / "none")])
    assert exit_.value.code == 2 and "no 30 tokens repeat" in capsys.readouterr().err
