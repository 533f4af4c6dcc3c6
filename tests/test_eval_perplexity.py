"""Perplexity evaluation: token losses summed by position in the document exactly as an independent
computation from the model's logits gives them; memory size at evaluation time changes results
only where a document outgrows the memory; the CLI from a saved checkpoint to table, JSON and plot."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from scripts.ckpt_weights import train_state

from data_tools.recall_task import RecallSpec, build
from megatron_memorizing.data import DocumentStream, load_tokenizer, open_indexed_dataset
from megatron_memorizing.eval import perplexity_cli
from megatron_memorizing.eval.loading import LoadedModel, forward_logits, token_losses
from megatron_memorizing.eval.perplexity import POSITION_EDGES, evaluate
from megatron_memorizing.memories import ModelMemories
from megatron_memorizing.model import build_model
from megatron_memorizing.run.config import DataConfig, RunConfig
from megatron_memorizing.training.checkpoint import Checkpointer

from tiny import tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("recall")
    build(out, RecallSpec(num_keys=64, num_values=8, statements=40), {"train": 3, "validation": 5})
    return str(out / "validation")


def loaded_model(data, **overrides) -> LoadedModel:
    config = tiny_config(vocab_size=1024, segment_length=16, **overrides)
    torch.manual_seed(0)
    chunks = build_model(config)
    for chunk in chunks:
        chunk.eval()
    run = RunConfig(model=config, data=DataConfig(train=data, validation=data))
    return LoadedModel(
        Path("runs/x/checkpoints/iter_0000000"), run, chunks, ModelMemories(chunks, config.micro_batch_size)
    )


def stream(loaded, data):
    model = loaded.config.model
    return DocumentStream(data, model.memory_slots, model.segment_length, loop=False)


def test_losses_are_summed_by_position_as_the_logits_give_them(single_rank, data):
    loaded = loaded_model(data, memory_size=64)
    result = evaluate(loaded.model_chunks, loaded.memories, stream(loaded, data))

    # Independently: logits of the model itself (not Megatron's schedule), bucketed in Python.
    loaded.memories.reset(torch.ones(loaded.config.model.memory_slots, dtype=torch.bool))
    sums = {start: [0.0, 0] for start in POSITION_EDGES}
    for batch in stream(loaded, data):
        losses = token_losses(forward_logits(loaded.model_chunks, loaded.memories, batch), batch)
        loaded.memories.commit()
        for slot, offset in enumerate(batch.offsets.tolist()):
            for i in batch.loss_mask[slot].nonzero().flatten().tolist():
                start = max(e for e in POSITION_EDGES if e <= offset + i)
                sums[start][0] += losses[slot, i].item()
                sums[start][1] += 1

    labels = open_indexed_dataset(data).length - 1  # a document of n tokens has n - 1 positions
    assert result.tokens == labels.sum()
    for start, (loss_sum, tokens) in sums.items():
        assert result.by_position[start][1] == tokens
        assert result.by_position[start][0] == pytest.approx(loss_sum, rel=1e-4, abs=1e-4)
    assert result.by_position[64][1] == sum(max(0, min(128, n) - 64) for n in labels)
    assert result.perplexity == pytest.approx(math.exp(sum(s for s, _ in sums.values()) / result.tokens), rel=1e-5)
    rows = result.position_table()
    assert [start for start, _, _ in rows] == [s for s in POSITION_EDGES if s < labels.max()]
    assert all(ppl == pytest.approx(math.exp(sums[start][0] / sums[start][1]), rel=1e-4) for start, ppl, _ in rows)


def test_memory_size_at_evaluation_time(single_rank, data):
    loaded = loaded_model(data, memory_size=32)
    assert open_indexed_dataset(data).length.max() < 256
    kept = []  # what an interrupted evaluation would have kept after each pass
    results = perplexity_cli.evaluate_conditions(loaded, data, [16, 256, 512], on_result=lambda r: kept.append(list(r)))
    assert list(results) == ["memory 16", "memory 256", "memory 512", "no memory"]
    assert kept == [list(results)[:n] for n in range(1, 5)]
    assert loaded.memories.knn_layers[0].memory.capacity == 512
    by_size = {name: r.loss for name, r in results.items()}
    # A memory that holds every document whole gives the same result at any larger size ...
    assert by_size["memory 256"] == pytest.approx(by_size["memory 512"], rel=1e-6)
    # ... one that evicts part of it does not, and neither does no memory at all.
    assert abs(by_size["memory 16"] - by_size["memory 256"]) > 1e-4
    assert abs(by_size["no memory"] - by_size["memory 256"]) > 1e-4
    # The first segment of a document has an empty memory: every condition agrees there.
    first = {name: r.by_position[8][0] for name, r in results.items()}
    assert max(first.values()) - min(first.values()) < 1e-3


def test_cli_reports_a_saved_checkpoint(single_rank, data, tmp_path, capsys):
    state = train_state(data, tmp_path / "run" / "checkpoints", segment_length=16)
    state.run_config.data.validation = data
    saved = Checkpointer(state.run_config.checkpoint).save(state)

    out = tmp_path / "eval"
    # The recall task repeats no 5-gram: long-range tokens are counted by their 2-gram here.
    assert perplexity_cli.main(["--checkpoint", str(saved.parent), "--memory-sizes", "16", "256", "--out", str(out),
                                "--long-range-context", "1", "--reference-window", "64"]) == 0
    printed = capsys.readouterr().out
    assert "memory 256" in printed and "no memory" in printed and "perplexity by position" in printed

    report = json.loads((out / "perplexity.json").read_text())
    assert report["checkpoint"] == str(saved) and report["training_memory_size"] == 40
    reference = "local window 64, no memory"
    assert set(report["results"]) == {"memory 16", "memory 256", "no memory", reference}
    assert report["results"]["no memory"]["change_vs_no_memory"] == 0
    assert report["results"]["memory 256"]["tokens"] == (open_indexed_dataset(data).length - 1).sum()
    # Bits per byte: the summed loss in bits over the bytes of the predicted tokens' text (every
    # token of a document but its first).
    table = load_tokenizer(Path(data).parent / "tokenizer.model").bytes_per_id()
    documents = open_indexed_dataset(data)
    text_bytes = sum(sum(table[i] for i in documents.read(d, 1, int(documents.length[d]) - 1).tolist())
                     for d in range(len(documents)))
    for result in report["results"].values():
        assert result["text_bytes"] == text_bytes
        loss_sum = result["loss"] * result["tokens"]
        assert result["bits_per_byte"] == pytest.approx(loss_sum / math.log(2) / text_bytes, rel=1e-9)
    assert "bits per byte" in printed
    # Long-range tokens: the same tokens in every condition (a property of the documents), and
    # the recall task's repeated statements provide some.
    far = {name: r["long_range_by_segments_back"] for name, r in report["results"].items()}
    counts = {name: [(row["start"], row["tokens"]) for row in rows] for name, rows in far.items()}
    assert len(set(map(tuple, counts.values()))) == 1 and sum(n for _, n in counts["no memory"]) > 0
    assert "loss on long-range tokens" in printed
    # Repeats inside local attention's view: also a property of the documents, and disjoint from the
    # long-range tokens (each token is one or the other at most).
    local = {name: r["repeated_locally"] for name, r in report["results"].items()}
    assert len({r["tokens"] for r in local.values()}) == 1 and local["no memory"]["tokens"] > 0
    assert (local["no memory"]["tokens"] + sum(n for _, n in counts["no memory"])
            <= report["results"]["no memory"]["tokens"])
    assert all(0 < r["loss"] < 20 for r in local.values()) and "0 (local)" in printed
    # The reference reads 64 tokens at a time with the same weights: on a document's first segment
    # of 16 it sees what the model without memory sees, further on more.
    ppl = {name: {row["start"]: row["perplexity"] for row in r["by_position"]} for name, r in report["results"].items()}
    assert all(ppl[reference][start] == pytest.approx(ppl["no memory"][start], rel=1e-4)
               for start in ppl[reference] if start < 16)
    assert ppl[reference][32] != pytest.approx(ppl["no memory"][32], rel=1e-3)
    assert (out / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_diverged_checkpoint_reports_an_infinite_perplexity(single_rank, data, tmp_path, capsys):
    """Finite weights whose loss is past ~709 (a diverged run): exp overflows, the perplexity is inf."""
    state = train_state(data, tmp_path / "run" / "checkpoints", segment_length=16)
    with torch.no_grad():
        state.model_chunks[0].output_layer.weight.mul_(1e9)
    saved = Checkpointer(state.run_config.checkpoint).save(state)

    out = tmp_path / "eval"
    assert perplexity_cli.main(["--checkpoint", str(saved), "--data", data, "--memory-sizes", "16", "--max-steps", "2",
                                "--out", str(out)]) == 0
    report = json.loads((out / "perplexity.json").read_text())
    for result in report["results"].values():
        assert 1e3 < result["loss"] < math.inf and result["perplexity"] == math.inf
        assert all(row["perplexity"] == math.inf for row in result["by_position"][1:])
    assert " inf " in capsys.readouterr().out


@pytest.fixture(scope="module")
def other_tokenizer_data(tmp_path_factory):
    """The same kind of data, tokenized with another tokenizer (another recall vocabulary)."""
    out = tmp_path_factory.mktemp("recall-other")
    build(out, RecallSpec(num_keys=48, num_values=6, statements=40), {"train": 3, "validation": 5})
    return str(out / "validation")


@pytest.mark.parametrize("command", ["perplexity", "recall", "inspect_retrieval", "lookup_heads", "memory_lookups"])
def test_data_of_another_tokenizer_is_refused_before_any_number(single_rank, data, other_tokenizer_data, tmp_path,
                                                                  capsys, command):
    from megatron_memorizing.eval import inspect_retrieval, lookup_heads, memory_lookups, recall

    main = {"perplexity": perplexity_cli.main, "recall": recall.main, "inspect_retrieval": inspect_retrieval.main,
            "lookup_heads": lookup_heads.main, "memory_lookups": memory_lookups.main}[command]
    state = train_state(data, tmp_path / "run" / "checkpoints", segment_length=16)
    saved = Checkpointer(state.run_config.checkpoint).save(state)
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(saved.parent), "--data", other_tokenizer_data,
              "--out" if command != "inspect_retrieval" else "--html", str(tmp_path / "eval")])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    message = captured.err.strip().splitlines()
    assert len(message) == 1 and "error:" in message[0]
    assert (str(saved / "tokenizer.model") in message[0]
            and "tokenizer.model" in message[0].split(other_tokenizer_data)[-1])
    assert "perplexity" not in captured.out and not (tmp_path / "eval").exists()


@pytest.mark.parametrize("command", ["perplexity_cli", "recall", "inspect_retrieval", "lookup_heads",
                                     "memory_lookups"])
def test_a_path_without_a_checkpoint_is_one_line_and_exit_2(command, tmp_path, capsys):
    import importlib

    main = importlib.import_module(f"megatron_memorizing.eval.{command}").main
    (tmp_path / "checkpoints").mkdir()  # e.g. a run that has not saved yet
    with pytest.raises(SystemExit) as exit:
        main(["--checkpoint", str(tmp_path / "checkpoints")])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no complete checkpoint" in err and "iter_*" in err


@pytest.fixture(scope="module")
def saved(single_rank, data, tmp_path_factory):
    """A checkpoint of the tiny model (memory in layer 3), with the run's validation split."""
    state = train_state(data, tmp_path_factory.mktemp("run") / "checkpoints", segment_length=16)
    state.run_config.data.validation = data
    return Checkpointer(state.run_config.checkpoint).save(state)


@pytest.mark.parametrize("args, named", [
    (["--memory-sizes", "0"], "argument --memory-sizes: 0 is not allowed: it must be at least 1"),
    (["--memory-sizes", "16", "-5"], "argument --memory-sizes: -5 is not allowed"),
    (["--max-steps", "0"], "argument --max-steps: 0 is not allowed"),
    (["--slots", "0"], "argument --slots: 0 is not allowed"),
    (["--set", "model.memory_sizee=64"], "--set: unknown field(s) ['memory_sizee'] in model"),
    ([], "iter_0000002.tmp is an incomplete checkpoint"),
], ids=["memory-size-0", "memory-size-negative", "max-steps-0", "slots-0", "set-typo", "iter-tmp"])
def test_bad_arguments_are_one_line_naming_them_and_exit_2(saved, tmp_path, capsys, args, named):
    checkpoint = saved
    if not args:  # what a save cut short, or discarded by the trainer's NaN guard, leaves
        checkpoint = shutil.copytree(saved, tmp_path / "checkpoints" / "iter_0000002.tmp")
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as exit_:
        perplexity_cli.main(["--checkpoint", str(checkpoint), *args, "--out", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # argparse puts its usage first
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1] and named in errors[0]
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("overrides, named", [
    (["model.memory_layers=[2]"], "memory_layers: saved [3], now [2]"),
    (["model.memory_layers=[]"], "memory_layers: saved [3], now []"),
    (["model.num_layers=6"], "num_layers: saved 4, now 6"),
], ids=["moved", "dropped", "architecture"])
def test_a_set_that_changes_the_trained_parameters_is_refused(saved, tmp_path, capsys, overrides, named):
    """Evaluating another model than the trained one (a trained memory layer's parameters dropped,
    new ones initialised) takes --allow-other-model."""
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as exit_:
        perplexity_cli.main(["--checkpoint", str(saved), *(f"--set={o}" for o in overrides), "--out", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "--allow-other-model" in err and not out.exists()


def test_memory_layers_may_be_added_and_with_allow_other_model_moved(single_rank, data, saved, tmp_path):
    """A checkpoint trained without memory, given a memory layer for a training-free look, needs no
    flag; moving a trained memory layer evaluates another model, and needs --allow-other-model."""
    vanilla_state = train_state(data, tmp_path / "vanilla" / "checkpoints", segment_length=16, memory_layers=())
    vanilla = Checkpointer(vanilla_state.run_config.checkpoint).save(vanilla_state)
    evaluate_briefly = ["--data", data, "--memory-sizes", "16", "--max-steps", "1"]
    with pytest.warns(UserWarning, match="keep their initial values"):
        assert perplexity_cli.main(["--checkpoint", str(vanilla), "--set", "model.memory_layers=[3]", *evaluate_briefly,
                                    "--out", str(tmp_path / "look")]) == 0
    assert "memory 16" in json.loads((tmp_path / "look" / "perplexity.json").read_text())["results"]
    with pytest.warns(UserWarning, match="keep their initial values"):
        assert perplexity_cli.main(["--checkpoint", str(saved), "--set", "model.memory_layers=[2]",
                                    "--allow-other-model", *evaluate_briefly, "--out", str(tmp_path / "moved")]) == 0
