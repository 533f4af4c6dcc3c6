"""DeepSpeed ZeRO-1 on CPU without building the shared-memory comm op.

Launched by tests/test_patches.py on two processes: applies
``patches.skip_deepspeed_shm_comm_build`` and trains a small torch model with a client AdamW for a
few steps, then reports the losses, whether the op was built, and how long initialization took.
"""

import argparse
import time

import deepspeed
import deepspeed.comm.comm as ds_comm
import torch

import patches
from tests.distributed import write_result

STEPS = 8


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    switch_found = patches.skip_deepspeed_shm_comm_build()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    started = time.perf_counter()
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        config={
            "train_micro_batch_size_per_gpu": 8,
            "zero_optimization": {"stage": 1},
            "steps_per_print": 10**9,
        },
    )
    init_seconds = time.perf_counter() - started

    # Each data-parallel rank fits its own samples of one linear target.
    generator = torch.Generator().manual_seed(engine.global_rank)
    inputs = torch.randn(8, 16, generator=generator)
    targets = inputs.sum(dim=1, keepdim=True)
    losses = []
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(engine(inputs), targets)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())

    write_result(
        args.result,
        dict(
            switch_found=switch_found,
            shm_comm_op_built=ds_comm.cdb.shm_comm_op is not None,
            init_seconds=init_seconds,
            losses=losses,
        ),
    )
    # Torn down before the interpreter exits: a process group left to exit-time destruction can
    # abort the process ("terminate called without an active exception", seen on Python 3.12).
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
