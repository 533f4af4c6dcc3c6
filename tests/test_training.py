"""The training entry point end to end, as users launch it (subprocesses on CPU ranks)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import environment_without_launcher
from fixtures.data_corpus import VOCAB, build_small_data

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_small_data(tmp_path_factory.mktemp("training_data"))


def overrides(data, run: Path, *extra: str) -> list[str]:
    fields = [
        f"data.train={data.prefix('train')}",
        f"data.validation={data.prefix('validation')}",
        f"model.vocab_size={VOCAB}",
        "model.num_layers=2",
        "model.memory_layers=[2]",
        "model.hidden_size=64",
        "model.segment_length=64",
        "model.memory_size=256",
        "training.eval_segments=2",
        f"checkpoint.dir={run / 'checkpoints'}",
        "checkpoint.interval=2",
        f"logging.dir={run}",
        "logging.interval=1",
        *extra,
    ]
    return [arg for field in fields for arg in ("--set", field)]


def user_shell(**env: str) -> dict:
    """The environment of a user who has not activated any virtual environment. An in-process
    test may have set RANK/MASTER_PORT here (its own process group): those are not passed on."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != bin_dir)
    shell = {k: v for k, v in environment_without_launcher().items() if k != "VIRTUAL_ENV"}
    return {**shell, "PATH": path, **env}


def launch(command: list[str], **env: str) -> subprocess.CompletedProcess:
    # The launch scripts find the project's environment themselves: `make setup` makes .venv, CI
    # one per line; VENV names it.
    return subprocess.run(
        command, cwd=REPO, env=user_shell(VENV=sys.prefix, **env), capture_output=True, text=True, timeout=TIMEOUT
    )


def test_launch_script_without_an_environment_says_how_to_make_one(tmp_path):
    done = subprocess.run(
        ["bash", "launch_scripts/local_cpu.sh", "configs/tiny-cpu.yaml"],
        cwd=REPO, env=user_shell(VENV=str(tmp_path / "no-venv"), PATH="/usr/bin:/bin"),
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "run 'make setup'" in done.stderr and str(tmp_path / "no-venv") in done.stderr


def test_deepspeed_launcher_trains_on_two_cpu_ranks(data, tmp_path):
    done = launch(
        ["bash", "launch_scripts/local_cpu.sh", "configs/tiny-cpu.yaml",
         *overrides(data, tmp_path, "training.steps=3")],
        LAUNCHER="deepspeed", NPROC="2",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "trained 3 steps" in done.stdout
    assert "validation perplexity with memory" in done.stdout
    assert "validation perplexity memory disabled" in done.stdout
    assert (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert (tmp_path / "checkpoints" / "iter_0000003" / "config.yaml").exists()
    assert list(tmp_path.glob("events.out.tfevents.*")), "no tensorboard event file"


def step_losses(output: str) -> dict[int, str]:
    """The loss each console line of a run reports, by step."""
    fields = [line.split("|") for line in output.splitlines() if line.startswith("step ")]
    return {int(f[0].split()[1]): f[1].split()[1] for f in fields}


def test_a_diverged_run_names_a_checkpoint_a_sane_resume_recovers_from(data, tmp_path):
    """Three sane steps, then a learning rate a billion times too high: the next loss is finite but
    enormous (1e10 and more). The run stops there, before the update, and names the checkpoint of
    step 3: the one written after step 4 holds the thrown weights and is never published, nor is
    it when step 4 is the run's last (its validation loss judges it). Resumed from step 3 at the
    sane rate, the run trains on exactly as a run that never diverged."""
    train = [sys.executable, "-m", "megatron_memorizing.train", "--config", "configs/tiny-cpu.yaml"]
    schedule = ["optimizer.warmup_steps=0", "optimizer.decay_steps=6", "checkpoint.interval=1"]
    sane = [*schedule, "optimizer.lr=1e-3", "optimizer.min_lr=1e-4"]
    run = tmp_path / "run"
    first = launch([*train, *overrides(data, run, "training.steps=3", *sane)])
    assert first.returncode == 0, first.stderr[-3000:]

    # Diverging in the last update: no step judges those weights, the validation at the end does.
    exploding = [*schedule, "optimizer.lr=1e6", "optimizer.clip_grad=0"]
    last = launch([*train, *overrides(data, run, "training.steps=4", *exploding)])
    assert last.returncode == 1, last.stderr[-3000:]
    message = last.stderr.strip().splitlines()[-1]
    assert "the final weights (step 4) diverged: on the validation data the loss is" in message, message
    assert f"The last good checkpoint is {run / 'checkpoints' / 'iter_0000003'}." in message
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"

    diverged = launch([*train, *overrides(data, run, "training.steps=6", *exploding)])
    assert diverged.returncode == 1, diverged.stderr[-3000:]
    message = diverged.stderr.strip().splitlines()[-1]
    assert "step 5: the loss is" in message, message
    assert f"The last good checkpoint is {run / 'checkpoints' / 'iter_0000003'}." in message
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"

    resumed = launch([*train, *overrides(data, run, "training.steps=6", *sane)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = launch([*train, *overrides(data, tmp_path / "straight", "training.steps=6", *sane)])
    assert straight.returncode == 0, straight.stderr[-3000:]
    recovered, never_diverged = step_losses(resumed.stdout), step_losses(straight.stdout)
    assert sorted(recovered) == [4, 5, 6]
    assert recovered == {step: never_diverged[step] for step in (4, 5, 6)}


def test_checkpoints_without_a_tracker_are_resumed_not_deleted(data, tmp_path):
    """A copied iteration, or a tracker deleted by hand: the run resumes from the newest complete
    iteration and says so; keep_last never deletes what the run did not write."""
    args = [sys.executable, "-m", "megatron_memorizing.train", "--config", "configs/tiny-cpu.yaml"]
    first = launch([*args, *overrides(data, tmp_path, "training.steps=2")])
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "latest_checkpointed_iteration.txt").unlink()
    saved = (checkpoints / "iter_0000002" / "model" / "metadata.json").read_bytes()

    again = launch([*args, *overrides(data, tmp_path, "training.steps=4", "checkpoint.keep_last=2")])
    assert again.returncode == 0, again.stderr[-3000:]
    output = again.stdout + again.stderr
    assert f"resumed from {checkpoints / 'iter_0000002'} at step 2 (no latest_checkpointed_iteration.txt" in output
    assert (checkpoints / "iter_0000002" / "model" / "metadata.json").read_bytes() == saved
    assert (sorted(p.name for p in checkpoints.iterdir())
            == [".lock", "iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt"])

    # checkpoint.resume=false on that folder: refused before step 1, in one line, nothing touched.
    fresh = launch([*args, *overrides(data, tmp_path, "training.steps=4", "checkpoint.resume=false")])
    assert fresh.returncode == 2
    assert fresh.stderr.strip().splitlines()[-1].startswith("megatron-memorizing-train: checkpoint.dir")
    assert "checkpoint.resume=false" in fresh.stderr and "Traceback" not in fresh.stderr
    assert (sorted(p.name for p in checkpoints.iterdir())
            == [".lock", "iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt"])


def test_a_run_past_its_time_stops_with_a_checkpoint_and_the_same_command_continues(data, tmp_path):
    """training.exit_duration_minutes (Megatron-LM's --exit-duration-in-mins): a run longer than a
    job's time limit is a series of jobs with one command."""
    command = [sys.executable, "-m", "megatron_memorizing.train", "--config", "configs/tiny-cpu.yaml",
               *overrides(data, tmp_path, "training.steps=3", "checkpoint.interval=10",
                          "training.exit_duration_minutes=1e-9")]
    checkpoints = tmp_path / "checkpoints"
    first = launch(command)
    assert first.returncode == 0, first.stderr[-3000:]
    output = first.stdout + first.stderr
    assert "stopped at step 1 of 3 after training.exit_duration_minutes=1e-09" in output
    assert "validation perplexity" not in output  # stopped, not finished: no final evaluation
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "1"

    again = launch(command)
    assert again.returncode == 0, again.stderr[-3000:]
    output = again.stdout + again.stderr
    assert f"resumed from {checkpoints / 'iter_0000001'} at step 1" in output
    assert "stopped at step 2 of 3" in output

    last = launch(command)  # past its time at the last step too: it finishes as usual
    assert last.returncode == 0, last.stderr[-3000:]
    assert "stopped at" not in last.stdout + last.stderr and "validation perplexity" in last.stdout
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_validation_split_of_another_tokenizer_is_refused_before_step_1(data, tmp_path):
    from data_tools.recall_task import RecallSpec, build

    other = tmp_path / "other"
    build(other, RecallSpec(num_keys=48, num_values=6, statements=40), {"train": 2, "validation": 2})
    done = launch([sys.executable, "-m", "megatron_memorizing.train", "--config", "configs/tiny-cpu.yaml",
                   *overrides(data, tmp_path / "run", f"data.validation={other / 'validation'}")])
    assert done.returncode == 2, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert str(other / "tokenizer.model") in message and str(data.tokenizer) in message
    assert "Traceback" not in done.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_resuming_with_another_memory_size_says_what_happens_to_the_memory(data, tmp_path):
    args = [sys.executable, "-m", "megatron_memorizing.train", "--config", "configs/tiny-cpu.yaml"]
    assert launch([*args, *overrides(data, tmp_path, "training.steps=2")]).returncode == 0
    grown = launch([*args, *overrides(data, tmp_path, "training.steps=3", "model.memory_size=512")])
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert ("hold up to 256 pairs per slot and head, this run uses 512 from step 2: it grows, keeping every pair"
            in grown.stdout)
    shrunk = launch([*args, *overrides(data, tmp_path, "training.steps=4", "model.memory_size=128")])
    assert shrunk.returncode == 0, shrunk.stderr[-3000:]
    assert "this run uses 128 from step 3: it shrinks, keeping the newest 128 pairs" in shrunk.stdout


def test_a_second_run_into_the_same_folder_or_an_unwritable_one_stops_before_step_1(data, tmp_path):
    import fcntl

    args = [sys.executable, "-m", "megatron_memorizing.train", "--config", "configs/tiny-cpu.yaml"]
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    with open(checkpoints / ".lock", "a+") as held:  # a run in progress holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("node7 pid 4242\n")
        held.flush()
        second = launch([*args, *overrides(data, tmp_path)])
    assert second.returncode == 2
    assert f"checkpoint.dir {checkpoints} is in use by another run (node7 pid 4242)" in second.stderr.splitlines()[-1]
    assert sorted(p.name for p in checkpoints.iterdir()) == [".lock"]

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    unwritable = launch([*args, *overrides(data, tmp_path, f"checkpoint.dir={blocked / 'checkpoints'}")])
    assert unwritable.returncode == 2
    refusal = unwritable.stderr.splitlines()[-1]
    assert f"checkpoint.dir={blocked / 'checkpoints'}" in refusal and f"{blocked} is a file, not a folder" in refusal
    assert "Traceback" not in second.stderr + unwritable.stderr


def copy_split(data, split: str, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in (f"{split}.bin", f"{split}.idx", f"{split}.json", "tokenizer.model"):
        shutil.copy(data.out / name, target / name)
    return target / split


def test_corrupt_data_is_named_before_step_1_or_at_the_step_that_reads_it(data, tmp_path):
    args = [sys.executable, "-m", "megatron_memorizing.train", "--config", "configs/tiny-cpu.yaml"]
    # A validation split with bytes overwritten in place: found by checksum before step 1, not
    # after the last step.
    validation = copy_split(data, "validation", tmp_path / "validation")
    with open(validation.with_suffix(".bin"), "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 64)
    done = launch([*args, *overrides(data, tmp_path / "run", f"data.validation={validation}")])
    assert done.returncode == 2
    assert f"{validation}.bin is corrupt" in done.stderr.splitlines()[-1]
    assert not (tmp_path / "run" / "checkpoints").exists()

    # A training split whose manifest predates checksums: the first out-of-vocabulary id is a data
    # error naming the dataset and the step, not an IndexError.
    train = copy_split(data, "train", tmp_path / "train")
    manifest = json.loads(train.with_suffix(".json").read_text())
    del manifest["files_sha256"]
    train.with_suffix(".json").write_text(json.dumps(manifest))
    size = train.with_suffix(".bin").stat().st_size
    train.with_suffix(".bin").write_bytes(b"\xff" * size)
    done = launch([*args, *overrides(data, tmp_path / "run2", f"data.train={train}")])
    assert done.returncode == 2, done.stderr[-2000:]
    message = done.stderr.splitlines()[-1]
    assert f"{train}: token id 65535 in the batch of step 1 is outside the model's vocabulary" in message
    assert "Traceback" not in done.stderr


def test_a_full_disk_is_named_and_the_partial_save_removed(data, tmp_path):
    """A checkpoint folder on a 1 MiB tmpfs (the tests run as root): the first save cannot fit."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(disk)], check=True)
    try:
        done = launch([sys.executable, "-m", "megatron_memorizing.train", "--config", "configs/tiny-cpu.yaml",
                       *overrides(data, tmp_path, f"checkpoint.dir={disk / 'checkpoints'}", "training.steps=2")])
        assert done.returncode == 1
        message = done.stderr.strip().splitlines()[-1]
        assert f"no space left on the device of checkpoint.dir {disk / 'checkpoints'} while saving step 2" in message
        assert "the latest checkpoint, none yet, is intact" in message
        assert "Traceback" not in done.stderr
        assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == [".lock"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_train_from_layer_keeps_the_layers_below_and_the_embedding_as_they_were(data, tmp_path, single_rank):
    from megatron_memorizing.model import build_model
    from megatron_memorizing.run.config import RunConfig
    from megatron_memorizing.run.weights import load_weights

    done = launch([sys.executable, "-m", "megatron_memorizing.train", "--config", "configs/tiny-cpu.yaml",
                   *overrides(data, tmp_path, "training.steps=2", "checkpoint.interval=1",
                              "training.train_from_layer=2")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training layers 2-2 only" in done.stdout + done.stderr

    def weights(step):
        iteration = tmp_path / "checkpoints" / f"iter_{step:07d}"
        (model,) = build_model(RunConfig.load(iteration / "config.yaml").model)
        load_weights(iteration, [model])
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    first, second = weights(1), weights(2)
    changed = {name for name in first if not torch.equal(first[name], second[name])}
    assert changed and all(name.startswith(("decoder.layers.1.", "decoder.final_layernorm")) for name in changed)
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in changed


def test_the_log_reports_an_overflowing_perplexity_as_inf(single_rank, tmp_path, capsys):
    """A finite loss past ~709 (a diverging run) has no float exp: the log says inf, as evaluation does."""
    from megatron_memorizing.run.config import LoggingConfig
    from megatron_memorizing.training.logger import TrainingLogger

    logger = TrainingLogger(LoggingConfig(dir=str(tmp_path), interval=1), total_steps=1, start_step=0)
    logger.step(1, loss=1e11, tokens=64.0, lr=1e-3, grad_norm=1.0, memory_stats={})
    logger.close()
    assert "| ppl       inf |" in capsys.readouterr().out
