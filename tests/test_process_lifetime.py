"""No process of a run outlives it: killed by SIGKILL or SIGTERM, with or without its launcher,
a run leaves nothing behind (Megatron's checkpoint-writer helpers included)."""

import signal
import subprocess
import sys
import time

import psutil
import pytest
from test_training import REPO, data, overrides, user_shell  # noqa: F401  (data: the module's fixture)

# Checkpoints at every step: the writer's helper processes exist from the first save on.
STEADY = ["training.steps=100000", "checkpoint.interval=1"]


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, env=user_shell(VENV=sys.prefix, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(run, root, process) -> list[psutil.Process]:
    """Wait until a checkpoint was published, then return every descendant of `process`."""
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "latest_checkpointed_iteration.txt").exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.5)
    time.sleep(1.0)  # into the following steps and saves
    return psutil.Process(root).children(recursive=True)


def alive(processes: list[psutil.Process]) -> list[str]:
    return [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in processes
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def gone_within(processes, seconds=60.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.25)
    return alive(processes)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_run_leaves_no_process(data, tmp_path, sig):  # noqa: F811
    run = start([sys.executable, "-m", "megatron_memorizing.train", "--config", "configs/tiny-cpu.yaml",
                 *overrides(data, tmp_path, *STEADY)])
    helpers = wait_for_checkpoint(tmp_path, run.pid, run)
    assert helpers, "the run started no helper process: nothing was tested"
    run.send_signal(sig)
    run.wait(timeout=60)
    if sig == signal.SIGTERM:  # a clean exit through Python's shutdown, not a default-action death
        assert run.returncode == 128 + signal.SIGTERM, run.stderr.read()[-3000:]
    assert gone_within(helpers) == []


def test_killing_the_launcher_stops_its_ranks_and_their_helpers(data, tmp_path):  # noqa: F811
    launcher = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      "-m", "megatron_memorizing.train", "--config", "configs/tiny-cpu.yaml",
                      *overrides(data, tmp_path, *STEADY)])
    everything = wait_for_checkpoint(tmp_path, launcher.pid, launcher)
    ranks = [p for p in psutil.Process(launcher.pid).children() if "megatron_memorizing.train" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    launcher.kill()
    launcher.wait(timeout=60)
    assert gone_within(everything) == []
