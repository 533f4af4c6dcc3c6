"""Launching a test script on several CPU processes with torchrun, and reading back its result.

A launched script receives ``--result PATH`` after its own arguments and writes a JSON object
there (typically from rank 0); ``run_torchrun`` returns that object. Results travel through a
file, not the log, so that Megatron's and DeepSpeed's chatter cannot corrupt them.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"

# Set by torchrun for each worker; inherited copies (from a test process that initialized
# torch.distributed for itself) must not leak into the launch.
_LAUNCHER_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)

# How much of a failed launch's output to show: enough for the traceback of the first rank.
_OUTPUT_TAIL_CHARS = 6000


class TorchrunError(RuntimeError):
    pass


def environment_without_launcher() -> Dict[str, str]:
    """This process's environment minus the variables a launcher sets for its workers."""
    return {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}


def run_torchrun(
    script: Path,
    nproc: int,
    args: Sequence[str] = (),
    timeout: float = 300.0,
    env: Optional[Dict[str, str]] = None,
) -> Dict[str, Any]:
    """Runs ``script`` on ``nproc`` local processes and returns the JSON object it wrote.

    Each process gets one CPU thread (several ranks share few cores). Raises ``TorchrunError``
    with the tail of the combined output when the launch fails, times out, or writes no result.
    """
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(script),
            *args,
            "--result",
            str(result_path),
        ]
        launch_env = {
            **environment_without_launcher(),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
            ),
            **(env or {}),
        }
        try:
            completed = subprocess.run(
                command,
                cwd=REPO_ROOT,
                env=launch_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as error:
            output = error.stdout or b""
            if isinstance(output, bytes):
                output = output.decode(errors="replace")
            raise TorchrunError(
                f"{script.name} on {nproc} processes timed out after {timeout:.0f} s:\n"
                f"{output[-_OUTPUT_TAIL_CHARS:]}"
            ) from None
        if completed.returncode != 0 or not result_path.exists():
            raise TorchrunError(
                f"{script.name} on {nproc} processes exited with {completed.returncode}"
                f"{'' if result_path.exists() else ' and wrote no result'}:\n"
                f"{completed.stdout[-_OUTPUT_TAIL_CHARS:]}"
            )
        return json.loads(result_path.read_text())


def write_result(path: str, result: Dict[str, Any]) -> None:
    """For launched scripts: writes ``result`` as the launch's answer, from global rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        Path(path).write_text(json.dumps(result))
