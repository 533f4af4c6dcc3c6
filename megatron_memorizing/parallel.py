"""Starting and stopping torch.distributed and Megatron-Core's model-parallel state.

The one place that decides the backend: NCCL when CUDA is available, otherwise gloo with the CPU
patches from ``patches`` applied. The same call serves torchrun, the deepspeed launcher (both set
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and a plain single-process run.
"""

import datetime
import os
import random
import socket
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

import patches
from megatron_memorizing.config import ConfigError


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _default_to_single_process() -> None:
    # DeepSpeed reads these too (without them it falls back to MPI discovery), so they are set in
    # the environment rather than passed to init_process_group.
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _seed(seed: int) -> None:
    # Megatron's convention: pipeline stages draw different dropout masks; TP ranks share this
    # seed (their model-parallel stream is derived from it by the RNG tracker).
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    # On CPU this is also the generator that the patched tracker treats as "the device" one.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    context_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> None:
    """Initializes the process group, Megatron's parallel groups, and every RNG this run uses.

    Data parallelism takes the remaining factor of the world size.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model_parallel_size = (
        tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    )
    if world_size % model_parallel_size:
        how = "one process: start it with a launcher" if world_size == 1 else f"{world_size} processes"
        raise ConfigError(
            f"world size {world_size} is not a multiple of tensor ({tensor_model_parallel_size}) x "
            f"pipeline ({pipeline_model_parallel_size}) x context ({context_parallel_size}) "
            f"parallel sizes = {model_parallel_size} ({how}): run {model_parallel_size} processes or a "
            f"multiple, e.g. NPROC={model_parallel_size} launch_scripts/local_cpu.sh CONFIG on CPU, or "
            f"NUM_GPUS={model_parallel_size} launch_scripts/gpu_node.sh CONFIG"
        )
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        patches.apply_cpu_patches()
    _default_to_single_process()

    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            rank=int(os.environ["RANK"]),
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    _seed(seed)


# What the collective libraries say when another rank is gone: its process died (connections
# reset or closed), or it stopped answering (a timeout).
_LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Connection refused", "Socket Timeout",
              "Timed out waiting", "timed out", "NCCL communicator was aborted", "Broken pipe")


def lost_contact(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another rank died or stopped answering."""
    if isinstance(error, (dist.DistNetworkError, dist.DistStoreError)):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in _LOST_PEER)


def destroy_distributed() -> None:
    """Tears down Megatron's parallel groups and the process group (safe to call twice)."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def current_layout() -> dict:
    """The running model-parallel layout, as checkpoints record it."""
    return {
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        "data": parallel_state.get_data_parallel_world_size(),
    }


def describe_layout(layout: dict) -> str:
    vpp = f" x VPP={layout['virtual_pipeline']}" if layout["virtual_pipeline"] else ""
    return f"TP={layout['tensor']} x PP={layout['pipeline']}{vpp} x DP={layout['data']}"


def raise_on_every_rank(problem: Optional[str], error: type[Exception]) -> None:
    """Raise rank 0's `problem` (None: there is none) as `error` on every rank (collective): a
    rank raising alone would leave the others waiting at the next collective."""
    verdict = [problem]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise error(verdict[0])
