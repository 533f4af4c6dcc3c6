"""Side-by-side reports: evaluations of several runs (from megatron-memorizing-eval's JSON) and
training curves (from tensorboard logs)."""

import json
import math
import re
from pathlib import Path

import pytest
from scripts.ckpt_weights import train_state
from torch.utils.tensorboard import SummaryWriter

from data_tools.recall_task import RecallSpec, build
from megatron_memorizing.eval import compare, curves, perplexity_cli
from megatron_memorizing.eval.report import run_labels
from megatron_memorizing.training.checkpoint import Checkpointer

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("recall")
    build(out, RecallSpec(num_keys=64, num_values=8, statements=40), {"train": 3, "validation": 5})
    return str(out / "validation")


def as_trained_without_memory(evaluation: dict) -> dict:
    """What the evaluation of a run trained without memory holds: the no-memory condition only."""
    return dict(evaluation, training_memory_size=0, results={"no memory": evaluation["results"]["no memory"]})


def test_compare_puts_runs_side_by_side(single_rank, data, tmp_path, capsys):
    state = train_state(data, tmp_path / "run" / "checkpoints", segment_length=16)
    state.run_config.data.validation = data
    saved = Checkpointer(state.run_config.checkpoint).save(state)
    evaluations = tmp_path / "eval"
    assert perplexity_cli.main(["--checkpoint", str(saved.parent), "--memory-sizes", "40", "256",
                                "--out", str(evaluations / "memory")]) == 0
    memory = json.loads((evaluations / "memory" / "perplexity.json").read_text())
    (evaluations / "plain").mkdir()
    (evaluations / "plain" / "perplexity.json").write_text(json.dumps(as_trained_without_memory(memory)))
    capsys.readouterr()

    plot = tmp_path / "cmp.png"
    assert compare.main([str(evaluations / "plain"), str(evaluations / "memory"), "--baseline", "plain",
                         "--out", str(plot)]) == 0
    printed = capsys.readouterr().out
    table = printed.split("perplexity by position")[0]
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.split()[:1] in (["plain"], ["memory"])}
    # Each run at its training condition: the memory run at 40 (its training size), the other without.
    own = memory["results"]["memory 40"]["perplexity"]
    base = memory["results"]["no memory"]["perplexity"]
    assert rows["memory"][3] == f"{own:.3f}" and rows["plain"][3] == f"{base:.3f}"
    assert rows["memory"][-1] == f"{100 * (own / base - 1):+.2f}%" and rows["plain"][-1] == "+0.00%"
    # Conditions a run was not evaluated at stay empty: the plain row has no memory columns.
    assert len(rows["plain"]) == len(rows["memory"]) - 2
    first_bucket = memory["results"]["memory 40"]["by_position"][0]
    assert f"{first_bucket['perplexity']:.3f}" in printed.split("perplexity by position")[1]
    assert plot.read_bytes()[:8] == PNG


def test_compare_refuses_evaluations_of_different_data(tmp_path, capsys):
    for name, data in (("a", "data/x/validation"), ("b", "data/y/validation")):
        (tmp_path / name).mkdir()
        result = {"loss": 1.0, "perplexity": math.e, "tokens": 10, "by_position": []}
        (tmp_path / name / "perplexity.json").write_text(json.dumps(
            {"data": data, "step": 1, "training_memory_size": 0, "results": {"no memory": result}}))
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path / "a"), str(tmp_path / "b")])
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        compare.main([str(tmp_path / "empty")])
    assert exit_.value.code == 2 and "empty/perplexity.json does not exist" in capsys.readouterr().err


def write_scalars(directory, values: dict[int, float], tag="train/loss"):
    writer = SummaryWriter(str(directory))
    for step, value in values.items():
        writer.add_scalar(tag, value, step)
    writer.close()


def test_curves_table_smoothing_and_plot(tmp_path, capsys):
    write_scalars(tmp_path / "a", {25: 4.0, 50: 2.0, 75: 3.0, 100: 1.0})
    write_scalars(tmp_path / "b", {25: 8.0, 50: 6.0, 75: 4.0})
    plot = tmp_path / "loss.png"
    assert curves.main([str(tmp_path / "a"), str(tmp_path / "b"), "--smooth", "2", "--out", str(plot)]) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines()[3:]
            if line[:1].isspace() or line[:1].isdigit()}
    # Common steps only (b stops at 75); each value the mean of the last two logged.
    assert rows == {"25": ["4.0000", "8.0000"], "50": ["3.0000", "7.0000"], "75": ["2.5000", "5.0000"]}
    assert plot.read_bytes()[:8] == PNG


def test_curves_tell_runs_of_the_same_name_apart(tmp_path, capsys):
    write_scalars(tmp_path / "lr1" / "xl", {25: 4.0})
    write_scalars(tmp_path / "lr2" / "xl", {25: 5.0})
    write_scalars(tmp_path / "lr2" / "plain", {25: 6.0})
    assert curves.main([str(tmp_path / "lr1" / "xl"), str(tmp_path / "lr2" / "xl"),
                        str(tmp_path / "lr2" / "plain")]) == 0
    header = capsys.readouterr().out.splitlines()[1].split()
    assert header == ["step", "lr1/xl", "lr2/xl", "plain"]


def test_curves_name_the_scalars_a_run_has(tmp_path, capsys):
    write_scalars(tmp_path / "a", {1: 1.0})
    with pytest.raises(SystemExit) as exit_:
        curves.main([str(tmp_path / "a"), "--scalar", "validation/perplexity"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and re.search("--scalar .*has no scalar 'validation/perplexity'.*train/loss", error)


def evaluation_json(directory, run, step, perplexity, memory=0):
    """A perplexity.json as megatron-memorizing-eval writes it (the fields compare reads)."""
    condition = f"memory {memory:,}" if memory else "no memory"
    result = dict(perplexity=perplexity, tokens=1000.0,
                  by_position=[dict(start=0, perplexity=perplexity, tokens=1000.0)])
    results = {condition: result, "local window 512, no memory": dict(result, perplexity=perplexity * 0.9)}
    if memory:
        results["no memory"] = dict(result, perplexity=perplexity * 1.1)
    directory.mkdir(parents=True)
    (directory / "perplexity.json").write_text(json.dumps(dict(
        checkpoint=f"runs/{run}/checkpoints/iter_{step:07d}", step=step, data="data/x/validation",
        training_memory_size=memory, results=results)))
    return str(directory)


def test_checkpoints_of_the_same_runs_give_perplexity_over_training(tmp_path, capsys):
    plain = {1000: 300.0, 2000: 250.0}
    memory = {1000: 310.0, 2000: 240.0}
    dirs = [evaluation_json(tmp_path / f"plain-{s}", "plain", s, p) for s, p in plain.items()]
    dirs += [evaluation_json(tmp_path / f"memory-{s}", "memory", s, p, memory=1536) for s, p in memory.items()]
    plot = tmp_path / "steps.png"
    assert compare.main([*dirs, "--baseline", "plain-1000", "--out-steps", str(plot)]) == 0
    printed = capsys.readouterr().out
    # The long-context reference is a column of its own, after no memory.
    header = printed.splitlines()[1].split("  ")
    assert ([h.strip() for h in header if h.strip()][-3:]
            == ["no memory", "local window 512, no memory", "vs plain-1000"])
    over = printed.split("perplexity over training")[1].splitlines()
    rows = {line.split()[0]: line.split() for line in over if line.strip()[:1].isdigit()}
    assert rows["1,000"] == ["1,000", "300.000", "310.000", "+3.33%"]
    assert rows["2,000"] == ["2,000", "250.000", "240.000", "-4.00%"]
    assert plot.read_bytes()[:8] == PNG
    # With a baseline the plot has a second panel, the change against it: a figure twice as wide.
    width = int.from_bytes(plot.read_bytes()[16:20], "big")
    assert compare.main([*dirs, "--out-steps", str(plot)]) == 0
    assert width > 1.5 * int.from_bytes(plot.read_bytes()[16:20], "big")


def test_two_seeds_at_once_each_run_against_its_own_twin(tmp_path, capsys):
    """Runs named alike in two folders (two seeds) are told apart, and each is compared with the
    baseline of its own folder, at every step."""
    perplexities = {"seed1": {"plain": {1000: 300.0, 2000: 250.0}, "memory": {1000: 270.0, 2000: 200.0}},
                    "seed2": {"plain": {1000: 400.0, 2000: 320.0}, "memory": {1000: 380.0, 2000: 240.0}}}
    dirs = [evaluation_json(tmp_path / seed / f"{run}-{step}", f"{seed}/{run}", step, p,
                            memory=1536 if run == "memory" else 0)
            for seed, runs in perplexities.items() for run, steps in runs.items() for step, p in steps.items()]
    assert compare.main([*dirs, "--baseline", "plain-2000"]) == 0
    printed = capsys.readouterr().out
    final = {line.split()[0]: line.split()[-1] for line in printed.split("perplexity by position")[0].splitlines()
             if line.strip().startswith("seed") and "-2000" in line}
    assert final == {"seed1/plain-2000": "+0.00%", "seed1/memory-2000": "-20.00%",
                     "seed2/plain-2000": "+0.00%", "seed2/memory-2000": "-25.00%"}
    over = printed.split("perplexity over training")[1].splitlines()
    assert over[1].split()[1:5] == ["seed1/plain", "seed1/memory", "seed2/plain", "seed2/memory"]
    assert over[1].rstrip().endswith("seed1/memory vs seed1/plain  seed2/memory vs seed2/plain")
    rows = {line.split()[0]: line.split()[-2:] for line in over if line.strip()[:1].isdigit()}
    assert rows == {"1,000": ["-10.00%", "-5.00%"], "2,000": ["-20.00%", "-25.00%"]}
    # Folder names sharing leading words label runs by the words that differ.
    runs = [Path("runs/cmp-1500-seed1/memory"), Path("runs/cmp-1500-seed2/memory"), Path("runs/cmp-1500-seed2/plain")]
    assert run_labels(runs) == ["seed1/memory", "seed2/memory", "plain"]
