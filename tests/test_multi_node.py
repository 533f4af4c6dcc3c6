"""Two nodes over a real network on one machine: the launch scripts as a cluster user runs them.

`launch_scripts/two_nodes.sh` makes two network namespaces joined by a veth pair (link-local
addresses); each "node" starts its own launcher, as on a cluster without ssh, and the ranks meet
over that link. Every layout must give exactly the losses of the same layout launched on one
node, each rank's memory must hold only its share, and the 2-node checkpoints must resume on 2
nodes. Needs root and iproute2; where namespaces cannot be made the tests are skipped, saying why.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_memorizing.eval.curves import read_scalar

from distributed import environment_without_launcher
from fixtures.data_corpus import VOCAB, build_small_data

REPO = Path(__file__).resolve().parents[1]
TWO_NODES = REPO / "launch_scripts" / "two_nodes.sh"
TIMEOUT = 300
# Names and addresses of this test session's nodes: not those a user's own `two_nodes.sh up` takes.
PREFIX, SUBNET = f"mmt{os.getpid() % 10000}n", "169.254.78"
HEADS, HEAD_DIM, MEMORY, SEGMENT = 4, 16, 256, 64


def two_nodes(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TWO_NODES_PREFIX": PREFIX, "TWO_NODES_SUBNET": SUBNET}
    return subprocess.run(["bash", str(TWO_NODES), *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(scope="module")
def nodes():
    made = two_nodes("up")
    if made.returncode != 0:
        pytest.skip(f"two network namespaces cannot be made here (needs root and iproute2): {made.stderr.strip()}")
    yield
    two_nodes("down")


@pytest.fixture(scope="module")
def ssh(nodes):
    """Passwordless ssh between the nodes (launch_scripts/two_nodes_ssh.sh), as the deepspeed
    launcher's default mode expects on a cluster."""
    env = {**os.environ, "TWO_NODES_PREFIX": PREFIX, "TWO_NODES_SUBNET": SUBNET}
    made = subprocess.run(["bash", str(REPO / "launch_scripts" / "two_nodes_ssh.sh"), "up"], capture_output=True,
                          text=True, env=env, timeout=60)
    if made.returncode == 2 and "not installed" in made.stderr:
        pytest.skip(made.stderr.strip())
    assert made.returncode == 0, made.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_small_data(tmp_path_factory.mktemp("multi_node_data"))


def settings(data, run: Path, steps: int, *extra: str) -> list[str]:
    fields = [
        f"data.train={data.prefix('train')}", f"data.validation={data.prefix('validation')}",
        f"model.vocab_size={VOCAB}", "model.num_layers=2", "model.memory_layers=[2]",
        f"model.hidden_size={HEADS * HEAD_DIM}",
        f"model.num_attention_heads={HEADS}", f"model.segment_length={SEGMENT}", f"model.memory_size={MEMORY}",
        "model.micro_batch_size=2", f"training.steps={steps}", "training.eval_segments=2",
        f"checkpoint.dir={run / 'checkpoints'}", "checkpoint.interval=2", f"logging.dir={run}", "logging.interval=1",
        *extra,
    ]
    return [arg for field in fields for arg in ("--set", field)]


def start_on_two_nodes(command_for_node, ranks_per_node: int) -> list[subprocess.Popen]:
    """Start `command_for_node(n)` on both nodes at once, as a cluster's per-node commands: [node 1, node 0]."""
    hostfile_lines = [f"{SUBNET}.{n + 1} slots={ranks_per_node}" for n in (0, 1)]
    processes = []
    for n in (1, 0):
        env = {**environment_without_launcher(), "OMP_NUM_THREADS": "1", "VENV": sys.prefix,
               "GLOO_SOCKET_IFNAME": f"{PREFIX}v{n}", "TWO_NODES_PREFIX": PREFIX, "TWO_NODES_SUBNET": SUBNET}
        processes.append(subprocess.Popen(
            ["bash", str(TWO_NODES), "run", str(n), *command_for_node(n, hostfile_lines)], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    return processes


def launch_on_two_nodes(command_for_node, ranks_per_node: int) -> list[str]:
    """Run `command_for_node(n)` on both nodes until both end; returns their logs."""
    processes = start_on_two_nodes(command_for_node, ranks_per_node)
    logs = [p.communicate(timeout=TIMEOUT)[0] for p in processes]
    for p, log in zip(processes, logs):
        assert p.returncode == 0, log[-4000:]
    return logs


def multi_node_sh(tmp_path: Path, sets: list[str]):
    """launch_scripts/multi_node.sh in its no-ssh mode: one command per node, same hostfile and master."""
    hostfile = tmp_path / "hostfile"

    def command(n, lines):
        hostfile.write_text("\n".join(lines) + "\n")
        return ["env", f"NODE_RANK={n}", f"MASTER_ADDR={SUBNET}.1", f"HOSTFILE={hostfile}", "MASTER_PORT=29611",
                "launch_scripts/multi_node.sh", "configs/tiny-cpu.yaml", *sets]

    return command


def deepspeed_no_ssh(tmp_path: Path, sets: list[str], ranks_per_node: int) -> list[str]:
    return launch_on_two_nodes(multi_node_sh(tmp_path, sets), ranks_per_node)


def one_node(sets: list[str], ranks: int) -> None:
    env = {**environment_without_launcher(), "OMP_NUM_THREADS": "1", "VENV": sys.prefix, "NPROC": str(ranks),
           "LAUNCHER": "deepspeed", "MASTER_PORT": "29612"}
    done = subprocess.run(["launch_scripts/local_cpu.sh", "configs/tiny-cpu.yaml", *sets], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def losses(run: Path) -> list[float]:
    return [value for _, value in read_scalar(run, "train/loss")]


def memory_bytes(checkpoint: Path) -> dict[int, int]:
    """Bytes of kNN memory (keys and values) each rank saved."""
    sizes = {}
    for path in sorted((checkpoint / "rank_state").glob("rank_*.pt")):
        memories = torch.load(path, map_location="cpu", weights_only=False)["memories"]
        sizes[int(path.stem.split("_")[1])] = sum(
            state[part].numel() * state[part].element_size()
            for state in memories.values() for part in ("keys", "values") if part in state
        )
    return sizes


# --------------------------------------------------------------------------------------------------

LAYOUTS = {
    # name: (model layout settings, ranks per node)
    "DP=2 across the nodes": ([], 1),
    "TP=2 (tensor) inside each node x DP=2 across": (["model.tensor_model_parallel_size=2"], 2),
    "PP=2, one stage per node": (["model.pipeline_model_parallel_size=2"], 1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_nodes_train_as_one_node_does(nodes, data, tmp_path, layout):
    fields, ranks_per_node = LAYOUTS[layout]
    one_node(settings(data, tmp_path / "one", 4, *fields), 2 * ranks_per_node)
    deepspeed_no_ssh(tmp_path, settings(data, tmp_path / "two", 4, *fields), ranks_per_node)

    assert len(losses(tmp_path / "two")) == 4
    assert losses(tmp_path / "two") == losses(tmp_path / "one")
    # Each rank's memory holds its own slots (2 per data-parallel rank), heads (all, or half under
    # TP=2) and stage (the memory layer is layer 2: under PP=2, only the second stage has one).
    tp = 2 if "tensor" in layout else 1
    share = 2 * (HEADS // tp) * MEMORY * HEAD_DIM * 4 * 2  # slots x heads x M x d x fp32 x (key, value)
    saved = memory_bytes(tmp_path / "two" / "checkpoints" / "iter_0000004")
    expected = {rank: 0 if "PP=2" in layout and rank == 0 else share for rank in saved}
    assert saved == expected


def test_the_deepspeed_launcher_starts_both_nodes_over_ssh(ssh, data, tmp_path):
    """multi_node.sh in its default mode, started on node 0 only: deepspeed logs into both nodes
    named in the hostfile with pdsh and ssh, and the job trains as on one node. Variables for every
    rank go through DeepSpeed's environment file, as on a cluster."""
    if shutil.which("pdsh") is None:
        pytest.skip("pdsh is not installed (the deepspeed launcher's way into the nodes): apt-get install pdsh")
    sets = settings(data, tmp_path / "two", 4)
    one_node(settings(data, tmp_path / "one", 4), 2)
    (tmp_path / "hostfile").write_text(f"{PREFIX}0 slots=1\n{PREFIX}1 slots=1\n")
    (tmp_path / "deepspeed_env").write_text("OMP_NUM_THREADS=1\n")
    env = {**environment_without_launcher(), "VENV": sys.prefix, "HOSTFILE": str(tmp_path / "hostfile"),
           "DS_ENV_FILE": str(tmp_path / "deepspeed_env"), "MASTER_PORT": "29614",
           "TWO_NODES_PREFIX": PREFIX, "TWO_NODES_SUBNET": SUBNET}
    job = subprocess.run(
        ["bash", str(TWO_NODES), "run", "0", "launch_scripts/multi_node.sh", "configs/tiny-cpu.yaml", *sets],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-4000:]
    assert f"cmd = pdsh -S -f 1024 -w {PREFIX}0,{PREFIX}1" in log
    assert losses(tmp_path / "two") == losses(tmp_path / "one")


def test_two_node_checkpoints_resume_on_two_nodes(nodes, data, tmp_path):
    one_node(settings(data, tmp_path / "one", 6), 2)
    deepspeed_no_ssh(tmp_path, settings(data, tmp_path / "two", 4), 1)
    deepspeed_no_ssh(tmp_path, settings(data, tmp_path / "two", 6), 1)  # resumes from step 4
    assert losses(tmp_path / "two") == losses(tmp_path / "one")


SRUN = """#!/usr/bin/env bash
# Stands in for srun inside the two-node sandbox: runs the job step's command once per node, with
# the node's SLURM_NODEID, on that node; fails if any node's command fails.
while [[ $1 == --* ]]; do shift; done
pids=()
for n in 0 1; do
    bash "$TWO_NODES" run $n env SLURM_NODEID=$n SLURM_PROCID=$n GLOO_SOCKET_IFNAME="${TWO_NODES_PREFIX}v$n" "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def test_slurm_script_runs_across_the_nodes(nodes, data, tmp_path):
    """launch_scripts/slurm.sbatch as SLURM runs it on a 2-node CPU allocation: its torchrun
    command on each node (a stand-in srun starts it there), meeting in the c10d rendezvous on the
    first node. There is no SLURM here: srun and scontrol are stand-ins; the script and torchrun
    are real."""
    one_node(settings(data, tmp_path / "one", 4), 2)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN)
    # Like a real scontrol on a long node list, it is still writing after the first line: a reader
    # that stops early (`| head -n 1`) would fail the job with SIGPIPE under pipefail.
    (bin_dir / "scontrol").write_text(f"#!/usr/bin/env bash\necho {PREFIX}0\nsleep 0.2\necho {PREFIX}1\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**environment_without_launcher(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": sys.prefix,
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NODELIST": f"{PREFIX}[0-1]", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "4242", "MASTER_PORT": "29613", "TWO_NODES": str(TWO_NODES),
           "TWO_NODES_PREFIX": PREFIX, "TWO_NODES_SUBNET": SUBNET}
    job = subprocess.run(
        ["bash", "launch_scripts/slurm.sbatch", "configs/tiny-cpu.yaml", *settings(data, tmp_path / "two", 4)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    assert losses(tmp_path / "two") == losses(tmp_path / "one")


def signal_node_1_at_checkpoint(tmp_path: Path, sets: list[str], step: int, signal: str):
    """Start the 2-node run and, once checkpoint `step` is there, send `signal` to every process of
    node 1. Returns node 1's launch, node 0's, node 1's process ids and when they were signalled."""
    node1, node0 = start_on_two_nodes(multi_node_sh(tmp_path, sets), 1)
    deadline = time.monotonic() + TIMEOUT
    while not (tmp_path / "two" / "checkpoints" / f"iter_{step:07d}").is_dir():
        assert time.monotonic() < deadline and node0.poll() is None, f"the run did not reach step {step}"
        time.sleep(0.2)
    pids = two_nodes("pids", "1").stdout.split()
    subprocess.run(["kill", f"-{signal}", *pids], check=True)
    return node1, node0, pids, time.monotonic()


def test_a_node_failure_stops_the_other_node_and_the_job_resumes(nodes, data, tmp_path):
    """Every process of node 1 is killed mid-run: node 0's rank stops within a bounded time with one
    clear line (not a hang, not a traceback), and both nodes restarted resume from the last complete
    checkpoint with exactly the losses of an uninterrupted run."""
    one_node(settings(data, tmp_path / "one", 12), 2)
    sets = settings(data, tmp_path / "two", 12)
    node1, node0, _, killed = signal_node_1_at_checkpoint(tmp_path, sets, 4, "KILL")
    log = node0.communicate(timeout=TIMEOUT)[0]
    stopped_after = time.monotonic() - killed
    node1.communicate(timeout=60)

    assert node0.returncode != 0
    assert stopped_after < 60, f"node 0 took {stopped_after:.0f} s to stop"
    lines = [line for line in log.splitlines() if line.startswith("megatron-memorizing-train: rank 0 lost contact")]
    assert len(lines) == 1 and "resumes from the last complete checkpoint" in lines[0], log[-3000:]
    assert "Traceback" not in log

    deepspeed_no_ssh(tmp_path, sets, 1)  # both nodes again: resumes
    assert losses(tmp_path / "two") == losses(tmp_path / "one")


def test_a_node_that_hangs_stops_the_other_after_the_collective_timeout(nodes, data, tmp_path):
    """Node 1 frozen (SIGSTOP: no connection closes, as when a node hangs or its network is cut):
    node 0 stops once training.distributed_timeout_minutes has passed, with the same clear line."""
    sets = settings(data, tmp_path / "two", 200, "training.distributed_timeout_minutes=0.25")
    node1, node0, frozen_pids, frozen = signal_node_1_at_checkpoint(tmp_path, sets, 2, "STOP")
    try:
        log = node0.communicate(timeout=TIMEOUT)[0]
        stopped_after = time.monotonic() - frozen
    finally:
        subprocess.run(["kill", "-9", *frozen_pids])
        node1.communicate(timeout=60)
    assert node0.returncode != 0
    assert 10 < stopped_after < 15 + 60, f"node 0 stopped {stopped_after:.0f} s after node 1 froze (timeout 15 s)"
    assert any(
        line.startswith("megatron-memorizing-train: rank 0 lost contact") for line in log.splitlines()
    ), log[-3000:]
