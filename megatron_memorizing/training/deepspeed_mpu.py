"""Megatron-Core's parallel groups, presented as the `mpu` object that `deepspeed.initialize` takes.

DeepSpeed partitions optimizer state over the data-parallel group, sums gradient norms over the
model-parallel group, and names checkpoint files by model-parallel rank; it learns all three from
this object. The groups are Megatron-Core's own (`parallel_state`), so DeepSpeed and Megatron
agree on who is a replica of whom.

Deliberately absent:
- `initialize_sequence_parallel`: DeepSpeed takes its presence to mean "Ulysses sequence
  parallelism" and then ignores the model-parallel groups altogether.
- `get_sequence_parallel_*`: DeepSpeed's sequence parallelism (Ulysses, a separate group) is not
  Megatron's `sequence_parallel` (a TP feature); without them DeepSpeed assumes none.
"""

import torch.distributed as dist
from megatron.core import parallel_state


# --- data parallelism: ZeRO partitions and averages over these ranks -----------------------------
def get_data_parallel_group():
    return parallel_state.get_data_parallel_group()


def get_data_parallel_world_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def get_data_parallel_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def get_data_parallel_group_ranks() -> list[int]:
    return dist.get_process_group_ranks(parallel_state.get_data_parallel_group())


# --- model parallelism (tensor x pipeline) -------------------------------------------------------
# Megatron-Core has the group but not its rank/size. The rank must be unique across pipeline
# stages too: DeepSpeed names checkpoint files `..._mp_rank_XX_...` by it, and two stages sharing
# a tensor-parallel rank would overwrite each other's file.
def get_model_parallel_group():
    return parallel_state.get_model_parallel_group()


def get_model_parallel_world_size() -> int:
    return dist.get_world_size(group=parallel_state.get_model_parallel_group())


def get_model_parallel_rank() -> int:
    return dist.get_rank(group=parallel_state.get_model_parallel_group())


# --- tensor parallelism: DeepSpeed's gradient norm counts a replicated (not TP-split) parameter
# only on tensor-parallel rank 0, then sums over the model-parallel group -------------------------
def get_tensor_model_parallel_group():
    return parallel_state.get_tensor_model_parallel_group()


def get_tensor_model_parallel_world_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def get_tensor_model_parallel_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def get_tensor_model_parallel_src_rank() -> int:
    return parallel_state.get_tensor_model_parallel_src_rank()


# --- pipeline parallelism ------------------------------------------------------------------------
def get_pipeline_model_parallel_group():
    return parallel_state.get_pipeline_model_parallel_group()


def get_pipeline_model_parallel_world_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size()


def get_pipeline_model_parallel_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_rank()
