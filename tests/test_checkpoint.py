"""Checkpoints: exact resume after SIGKILL, atomic saves, pruning, and weights across layouts and models.

Resumed training runs are torchrun launches of tests/scripts/ckpt_train.py. A killed run has
logged each step's loss as it went, so the run that resumes after it is compared, bit for bit,
with the very steps it replays. The other tests run in this process (TP=PP=DP=1) on checkpoints
they write, or that tests/scripts/ckpt_weights.py wrote at TP=2 x PP=2.
"""

import contextlib
import json
import random
import shutil

import numpy as np
import pytest
import torch
from megatron.core import tensor_parallel
from scripts.ckpt_weights import segment_losses, train_state

from megatron_memorizing.data import IncompatibleError
from megatron_memorizing.eval.loading import load_checkpoint
from megatron_memorizing.hf.convert import EXPORT_MARKER, ExportError, export
from megatron_memorizing.run.config import CheckpointConfig
from megatron_memorizing.run.folder import PARTIAL, TRACKER, CheckpointError
from megatron_memorizing.run.weights import load_weights
from megatron_memorizing.step import forward_backward
from megatron_memorizing.training.checkpoint import Checkpointer, check_checkpoint_tokenizer

from distributed import SCRIPTS, TorchrunError, run_torchrun
from fixtures.data_corpus import build_small_data

GATE = ["decoder.layers.2.self_attention.core_attention.gate_bias",
        "decoder.layers.2.self_attention.core_attention.memory_log_scale"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_small_data(tmp_path_factory.getbasetemp() / "small_data").prefix("train")


def read_log(path) -> dict:
    return {entry["step"]: entry for entry in map(json.loads, path.read_text().splitlines())}


def listing(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize(
    "nproc, backend, kill, left_behind",
    [
        # Killed inside the save of step 6, after every rank wrote its part, before the rename.
        (1, "megatron", ["--kill-in-save-at", "6"], ["iter_0000003", "iter_0000006.tmp", TRACKER]),
        # DP=2 with ZeRO-1 partitions of the optimizer state; killed between checkpoints.
        (2, "deepspeed", ["--kill-at-step", "5"], ["iter_0000003", TRACKER]),
    ],
    ids=["one-rank-killed-mid-save", "DP2-ZeRO1-killed-between-saves"],
)
def test_resume_after_sigkill_replays_the_same_steps(data, tmp_path, nproc, backend, kill, left_behind):
    root = tmp_path / "checkpoints"
    args = ["--dir", str(root), "--data", str(data), "--backend", backend, "--steps", "8", "--interval", "3"]
    with pytest.raises(TorchrunError, match="SIGKILL"):
        run_torchrun(SCRIPTS / "ckpt_train.py", nproc, [*args, *kill, "--losses", str(tmp_path / "killed.jsonl")])
    assert listing(root) == left_behind
    assert Checkpointer(CheckpointConfig(dir=str(root))).latest() == root / "iter_0000003"

    result = run_torchrun(SCRIPTS / "ckpt_train.py", nproc, [*args, "--losses", str(tmp_path / "resumed.jsonl")])
    assert result["resumed_from"] == str(root / "iter_0000003")
    killed, resumed = read_log(tmp_path / "killed.jsonl"), read_log(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == [4, 5, 6, 7, 8]
    replayed = sorted(set(killed) & set(resumed))
    assert len(replayed) >= 2
    # Losses and the token count carried in TrainState.extra, exactly.
    assert [resumed[s] for s in replayed] == [killed[s] for s in replayed]
    # keep_last=2 pruned step 3; the interrupted save's leftovers are gone.
    assert listing(root) == ["iter_0000006", "iter_0000008", TRACKER]


def test_keep_last_prunes_and_interrupted_saves_are_ignored(single_rank, data, tmp_path):
    root = tmp_path / "checkpoints"
    (root / "iter_0000002.tmp" / "model").mkdir(parents=True)  # a save that was killed
    (root / "iter_0000002.tmp" / PARTIAL).touch()
    checkpointer = Checkpointer(CheckpointConfig(dir=str(root), keep_last=2))
    assert checkpointer.latest() is None
    state = train_state(data, root)
    for step in range(1, 5):
        state.step = step
        assert checkpointer.save(state) == checkpointer.latest() == root / f"iter_{step:07d}"
    assert listing(root) == ["iter_0000003", "iter_0000004", TRACKER]
    assert (root / "iter_0000004" / "tokenizer.model").read_bytes() == (data.parent / "tokenizer.model").read_bytes()

    state.step = 2  # a fresh run pointed at this directory instead of resuming from it
    with pytest.raises(CheckpointError, match="step 4.*did not resume from it"):
        checkpointer.save(state)


def test_without_a_tracker_the_newest_complete_iteration_is_the_latest(single_rank, data, tmp_path):
    """To training, export and evaluation alike: the folder is the same checkpoint to all three."""
    root = tmp_path / "checkpoints"
    state = train_state(data, root)
    state.step = 300
    Checkpointer(state.run_config.checkpoint).save(state)
    (root / TRACKER).unlink()  # a copied iteration, or a tracker deleted by hand
    shutil.copytree(root / "iter_0000300", root / "iter_0000400")
    shutil.rmtree(root / "iter_0000400" / "rank_state")  # a newer one, incomplete
    assert Checkpointer(state.run_config.checkpoint).latest() == root / "iter_0000300"
    exported = export(root, tmp_path / "hf")
    assert json.loads((exported / EXPORT_MARKER).read_text())["exported_from"] == str(root / "iter_0000300")
    assert load_checkpoint(root).path == root / "iter_0000300"

    shutil.rmtree(root / "iter_0000300" / "rank_state")  # no complete one left: named, not guessed
    with pytest.raises(ExportError, match=f"{root} holds no complete checkpoint"):
        export(root, tmp_path / "hf2")
    with pytest.raises(CheckpointError, match=f"{root} holds no complete checkpoint"):
        load_checkpoint(root)


def trained_one_step(state):
    """`state` after one optimizer step: an optimizer state to save and load back."""
    state.optimizer.zero_grad()
    forward_backward(state.optimizer.model_chunks, state.memories, next(state.stream))
    state.optimizer.step(1e-3)
    state.memories.commit()
    state.step += 1
    return state


def generators() -> list:
    """The next draws of Python's, NumPy's and torch's generators, and the model-parallel tracker's states."""
    tracker = {name: state.clone() for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items()}
    return [random.random(), np.random.rand(), torch.rand(3).tolist(), tracker]


def scramble_generators() -> None:
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {name: torch.zeros_like(state) for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items()})


def same_generators(a: list, b: list) -> bool:
    (*draws_a, tracker_a), (*draws_b, tracker_b) = a, b
    return draws_a == draws_b and tracker_a.keys() == tracker_b.keys() and all(
        torch.equal(tracker_a[name], tracker_b[name]) for name in tracker_a)


@contextlib.contextmanager
def torch_safe_globals_only():
    """torch.load(weights_only=True) as plain torch has it: without the classes Megatron-Core
    allows process-wide (NumPy arrays among them)."""
    allowed = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        yield
    finally:
        torch.serialization.add_safe_globals(allowed)


class RunsCode:
    """What a tampered file can hold: an object whose unpickling runs code."""

    def __reduce__(self):
        return exec, ("raise SystemExit('a checkpoint ran code')",)


def test_rank_state_loads_with_weights_only_and_resumes_every_generator(single_rank, data, tmp_path):
    """A rank's state file holds tensors and plain values only: torch.load(weights_only=True) reads
    it, and resuming restores every generator. A file altered to run code is refused, not run."""
    state = trained_one_step(train_state(data, tmp_path / "checkpoints"))
    saved = Checkpointer(state.run_config.checkpoint).save(state)
    expected = generators()
    rank_file = saved / "rank_state" / "rank_00000.pt"
    with torch_safe_globals_only():
        rank_state = torch.load(rank_file, weights_only=True)
    assert rank_state["step"] == 1 and set(rank_state["rng"]) >= {"python", "numpy", "torch", "model_parallel"}

    resumed = train_state(data, tmp_path / "checkpoints")
    scramble_generators()
    Checkpointer(resumed.run_config.checkpoint).load(saved, resumed)
    assert same_generators(generators(), expected)

    torch.save({**rank_state, "extra": RunsCode()}, rank_file)
    with pytest.raises(CheckpointError, match="rank_00000.pt holds objects other than .* could run code"):
        Checkpointer(resumed.run_config.checkpoint).load(saved, resumed)


def test_a_rank_state_saved_before_the_rng_state_was_plain_still_resumes(single_rank, data, tmp_path):
    """Rank files saved before NumPy's RNG state was stored as a list hold it as an array: read
    with weights_only=True all the same, and resumed exactly."""
    state = trained_one_step(train_state(data, tmp_path / "checkpoints"))
    saved = Checkpointer(state.run_config.checkpoint).save(state)
    expected = generators()
    rank_file = saved / "rank_state" / "rank_00000.pt"
    rank_state = torch.load(rank_file, weights_only=True)
    kind, keys, *rest = rank_state["rng"]["numpy"]
    rank_state["rng"]["numpy"] = (kind, np.array(keys, dtype=np.uint32), *rest)  # as it was saved then
    torch.save(rank_state, rank_file)

    resumed = train_state(data, tmp_path / "checkpoints")
    scramble_generators()
    with torch_safe_globals_only():  # the array is allowed by the load itself
        Checkpointer(resumed.run_config.checkpoint).load(saved, resumed)
    assert same_generators(generators(), expected)


def test_pruning_deletes_only_this_runs_checkpoints(single_rank, data, tmp_path):
    """keep_last prunes what this run saved (and what it resumed from: the SIGKILL test above),
    never an iteration that some other run left in the folder."""
    root = tmp_path / "checkpoints"
    state = train_state(data, root)
    checkpointer = Checkpointer(CheckpointConfig(dir=str(root), keep_last=2))
    state.step = 3
    first = checkpointer.save(state)
    shutil.copytree(first, root / "iter_0000300")  # copied in by the user
    for step in (4, 5, 6):
        state.step = step
        checkpointer.save(state)
    assert listing(root) == ["iter_0000005", "iter_0000006", "iter_0000300", TRACKER]


def test_a_save_removes_only_the_leftovers_of_saves_and_deletions(single_rank, data, tmp_path):
    """Interrupted saves and deletions leave marked `iter_*.tmp` folders; any other `*.tmp` is the
    user's, kept, and one in the way of a save is refused untouched."""
    root = tmp_path / "checkpoints"
    (root / "old.tmp").mkdir(parents=True)
    (root / "notes.tmp").write_text("mine")
    (root / "iter_0000009.tmp").mkdir()  # the user's: no marker
    for leftover in ("iter_0000001.tmp", "iter_0000001.deleted.tmp"):  # a killed save, a deletion cut short
        (root / leftover / "model").mkdir(parents=True)
        (root / leftover / PARTIAL).touch()
    state = train_state(data, root)
    state.step = 2
    Checkpointer(state.run_config.checkpoint).save(state)
    assert listing(root) == ["iter_0000002", "iter_0000009.tmp", TRACKER, "notes.tmp", "old.tmp"]
    assert (root / "notes.tmp").read_text() == "mine" and not (root / "iter_0000002" / PARTIAL).exists()

    state.step = 9
    with pytest.raises(CheckpointError, match=r"iter_0000009.tmp is in the way of this save.*move it out"):
        Checkpointer(state.run_config.checkpoint).save(state)
    assert listing(root) == ["iter_0000002", "iter_0000009.tmp", TRACKER, "notes.tmp", "old.tmp"]


def test_a_checkpoint_of_another_tokenizer_is_refused(single_rank, data, tmp_path):
    import sentencepiece as spm

    state = train_state(data, tmp_path / "checkpoints")
    saved = Checkpointer(state.run_config.checkpoint).save(state)
    check_checkpoint_tokenizer(saved, data.parent / "tokenizer.model")  # its own: fine
    spm.SentencePieceTrainer.train(input=str(data.parent / "train.json"), model_prefix=str(tmp_path / "other"),
                                   vocab_size=100, minloglevel=2)
    with pytest.raises(
        IncompatibleError, match=rf"{saved} was trained with the tokenizer .*tokenizer.model, but .*other.model"
    ):
        check_checkpoint_tokenizer(saved, tmp_path / "other.model")


def test_bad_directories_are_named(single_rank, data, tmp_path):
    root = tmp_path / "checkpoints"
    state = train_state(data, root)
    saved = Checkpointer(state.run_config.checkpoint).save(state)
    assert load_weights(root, state.model_chunks) == []  # the directory above resolves to its latest

    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "nowhere", state.model_chunks)
    incomplete = shutil.copytree(saved, tmp_path / "copy" / saved.name)
    shutil.rmtree(incomplete / "model")
    with pytest.raises(CheckpointError, match="not a complete .* lacks model/metadata.json"):
        Checkpointer(state.run_config.checkpoint).load(incomplete, state)
    interrupted = saved.rename(saved.with_name(saved.name + ".tmp"))
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        load_weights(interrupted, state.model_chunks)
    with pytest.raises(CheckpointError, match="names iteration 0, but .* does not exist"):
        Checkpointer(state.run_config.checkpoint).latest()


def test_resume_and_weights_refuse_another_model(single_rank, data, tmp_path):
    state = train_state(data, tmp_path / "checkpoints")
    saved = Checkpointer(state.run_config.checkpoint).save(state)

    other = train_state(data, tmp_path / "checkpoints", memory_layers=(2,))
    with pytest.raises(CheckpointError, match=r"another model \(memory_layers: saved \[3\], now \[2\]\).*init_from"):
        Checkpointer(other.run_config.checkpoint).load(saved, other)
    other = train_state(data, tmp_path / "checkpoints")
    other.run_config.optimizer.memory_scalars_lr_mult = 10.0  # the optimizer's groups differ
    with pytest.raises(CheckpointError, match=r"memory_scalars_lr_mult=1.0, now 10.0: .*parameter group.*init_from"):
        Checkpointer(other.run_config.checkpoint).load(saved, other)
    wider = train_state(data, tmp_path / "checkpoints", vocab_size=2048)
    # A model of another shape cannot take the weights: init_from is not offered as the fix.
    with pytest.raises(CheckpointError, match=r"vocab_size: saved 1024, now 2048\).*from scratch") as refused:
        Checkpointer(wider.run_config.checkpoint).load(saved, wider)
    assert "init_from" not in str(refused.value)
    with pytest.raises(
        CheckpointError, match=r"embedding.word_embeddings.weight \(checkpoint \(1024, 64\), model \(2048, 64\)\)"
    ):
        load_weights(saved, wider.model_chunks)
    deeper = train_state(data, tmp_path / "checkpoints", num_layers=6)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: decoder\.layers\.4\."):
        load_weights(saved, deeper.model_chunks)


def test_weights_across_layouts_and_into_a_memorizing_model(single_rank, data, tmp_path):
    saved = run_torchrun(SCRIPTS / "ckpt_weights.py", 4, ["--save", str(tmp_path), "--data", str(data)])

    # TP=2 x PP=2 weights at TP=1: the same model.
    memorizing = train_state(data, tmp_path / "memorizing")
    assert load_weights(tmp_path / "memorizing", memorizing.model_chunks) == []
    assert segment_losses(memorizing, 1) == pytest.approx(saved["losses"], rel=1e-5)
    # ...but its memories and optimizer state do not resume there.
    with pytest.raises(
        CheckpointError, match=r"saved with layout TP=2 x PP=2 x DP=1, but this run is TP=1 x PP=1 x DP=1.*init_from"
    ):
        Checkpointer(memorizing.run_config.checkpoint).load(tmp_path / "memorizing", memorizing)

    # A vanilla model's weights in a memorizing model: only the gate and scale stay at init, and
    # with the gate closed the memorizing model computes the vanilla model's losses exactly, also
    # on a second segment, where the memory holds the first one.
    vanilla = train_state(data, tmp_path / "vanilla", memory_layers=())
    assert load_weights(tmp_path / "vanilla", vanilla.model_chunks) == []
    closed = train_state(data, tmp_path / "vanilla", gate_init=-1e4)
    assert load_weights(tmp_path / "vanilla", closed.model_chunks) == GATE
    expected = segment_losses(vanilla, 2)
    assert segment_losses(closed, 2) == expected
    opened = train_state(data, tmp_path / "vanilla", gate_init=0.0)
    load_weights(tmp_path / "vanilla", opened.model_chunks)
    assert segment_losses(opened, 2)[1] != expected[1]  # the memory does change the loss

    # And the other way: a memorizing checkpoint into a vanilla model drops the gate and scale.
    assert load_weights(tmp_path / "memorizing", vanilla.model_chunks) == []
