"""launch_scripts/slurm.sbatch on a real SLURM cluster: slurmctld, a slurmd on each of the two
nodes of `launch_scripts/two_nodes.sh`, and munge, brought up by `launch_scripts/two_nodes_slurm.sh`.

sbatch submits from node 0, SLURM allocates both nodes, and srun starts the script's torchrun on
each node, in that node's network (a TaskProlog gives each task its node's interface). The job
must train with exactly the losses of the same run on one node. Needs root, iproute2 and the
Debian packages slurmctld slurmd slurm-client munge; without them the test is skipped, saying why.
"""

import os
import shutil
import subprocess
import sys

import pytest

from distributed import environment_without_launcher
from test_multi_node import PREFIX, REPO, SUBNET, TIMEOUT, data, losses, nodes, one_node, settings  # noqa: F401 (fixtures)

TWO_NODES_SLURM = REPO / "launch_scripts" / "two_nodes_slurm.sh"
PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol")
NODES_ENV = {"TWO_NODES_PREFIX": PREFIX, "TWO_NODES_SUBNET": SUBNET}


def two_nodes_slurm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TWO_NODES_SLURM), *args], capture_output=True, text=True,
                          env={**os.environ, **NODES_ENV}, timeout=120)


@pytest.fixture(scope="module")
def slurm(nodes):
    missing = [program for program in PROGRAMS if shutil.which(program) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} not found): "
                    "apt-get install slurmctld slurmd slurm-client munge")
    try:
        made = two_nodes_slurm("up")
        assert made.returncode == 0, made.stdout + made.stderr
        yield
    finally:
        two_nodes_slurm("down")


def test_sbatch_trains_on_two_slurm_nodes_as_on_one_node(slurm, data, tmp_path):
    """`sbatch --nodes 2 launch_scripts/slurm.sbatch` with one CPU rank per node: the two ranks
    (data parallel across the nodes) meet in torchrun's rendezvous on the first node."""
    one_node(settings(data, tmp_path / "one", 4), 2)
    env = {**environment_without_launcher(), **NODES_ENV, "VENV": sys.prefix, "NPROC_PER_NODE": "1",
           "MASTER_PORT": "29615", "OMP_NUM_THREADS": "1"}
    job = subprocess.run(
        ["bash", str(TWO_NODES_SLURM), "run", "sbatch", "--wait", "--nodes", "2", "--output",
         str(tmp_path / "slurm-%j.out"), "launch_scripts/slurm.sbatch", "configs/tiny-cpu.yaml",
         *settings(data, tmp_path / "two", 4)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )
    outputs = "".join(path.read_text() for path in tmp_path.glob("slurm-*.out"))
    assert job.returncode == 0, (job.stdout + job.stderr + outputs)[-4000:]
    assert len(losses(tmp_path / "two")) == 4
    assert losses(tmp_path / "two") == losses(tmp_path / "one")
