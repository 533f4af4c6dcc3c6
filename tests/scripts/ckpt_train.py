"""Train the tiny memorizing model on a real indexed dataset with checkpoints; log per-step losses.

Launched by tests/test_checkpoint.py. Everything that makes resume hard is on: the kNN memory
fills and wraps across steps, the XL cache carries the previous segment, dropout draws from both
the default generator and Megatron's model-parallel one, AdamW has moments, and the learning rate
follows warmup. A run resumes from the newest complete checkpoint in --dir if there is one.

Rank 0 appends one JSON line per step to --losses: the step, its loss and the tokens consumed so far
(kept in TrainState.extra, so it is checkpointed too). A killed run leaves its lines behind.

--kill-at-step M    SIGKILL this process after step M (and its checkpoint, if any)
--kill-in-save-at S SIGKILL this process inside the save of step S, after every rank wrote the
                    checkpoint into its temporary directory and before it is published
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import psutil
import torch
from megatron.core import parallel_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for `tiny`, `distributed`

from megatron_memorizing.data import DocumentStream  # noqa: E402
from megatron_memorizing.memories import ModelMemories  # noqa: E402
from megatron_memorizing.model import build_model  # noqa: E402
from megatron_memorizing.parallel import destroy_distributed, initialize_distributed  # noqa: E402
from megatron_memorizing.run import folder  # noqa: E402
from megatron_memorizing.run.config import CheckpointConfig, DataConfig, OptimizerConfig, RunConfig, TrainingConfig  # noqa: E402
from megatron_memorizing.step import forward_backward, sum_over_data_parallel  # noqa: E402
from megatron_memorizing.training.checkpoint import Checkpointer, TrainState  # noqa: E402
from megatron_memorizing.training.optimizer import build_optimizer  # noqa: E402
from megatron_memorizing.training.schedules import learning_rate  # noqa: E402

from distributed import write_result  # noqa: E402
from tiny import tiny_config  # noqa: E402

VOCAB = 1024  # the test dataset's tokenizer has 1000 pieces


def die(*_) -> None:
    """SIGKILL the way a job scheduler does it, to the whole process tree: a child left behind (the
    manager process dist_checkpointing starts) would hold the launcher's output pipe open."""
    for child in psutil.Process().children(recursive=True):
        child.kill()
    os.kill(os.getpid(), signal.SIGKILL)


def run_config(args) -> RunConfig:
    return RunConfig(
        model=tiny_config(vocab_size=VOCAB, xl_cache=True, hidden_dropout=0.1, attention_dropout=0.1),
        data=DataConfig(train=args.data, validation=None, seed=3),
        optimizer=OptimizerConfig(backend=args.backend, zero_stage=1, lr=3e-3, min_lr=3e-4, warmup_steps=2),
        training=TrainingConfig(steps=args.steps, seed=1234),
        checkpoint=CheckpointConfig(dir=args.dir, interval=args.interval, keep_last=2),
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--data", required=True, help="indexed dataset prefix")
    parser.add_argument("--backend", default="megatron")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-in-save-at", type=int)
    parser.add_argument("--losses", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    config = run_config(args)
    model = config.model
    initialize_distributed(seed=config.training.seed)
    chunks = build_model(model)
    memories = ModelMemories(chunks, model.micro_batch_size)
    optimizer = build_optimizer(config, chunks)
    stream = DocumentStream(
        args.data, model.memory_slots, model.segment_length,
        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(), seed=config.data.seed,
    )
    state = TrainState(chunks, optimizer, memories, stream, config)
    checkpointer = Checkpointer(config.checkpoint)
    resumed_from = checkpointer.latest()
    if resumed_from is not None:
        checkpointer.load(resumed_from, state)

    while state.step < config.training.steps:
        optimizer.zero_grad()
        step_loss = forward_backward(optimizer.model_chunks, memories, next(stream))
        optimizer.step(learning_rate(state.step, config.optimizer, config.training.steps))
        memories.commit()
        state.step += 1
        loss_sum, tokens = sum_over_data_parallel(torch.tensor([step_loss.loss_sum, step_loss.tokens])).tolist()
        state.extra["tokens"] = state.extra.get("tokens", 0) + tokens
        if torch.distributed.get_rank() == 0:
            with open(args.losses, "a") as log:
                log.write(json.dumps({"step": state.step, "loss": loss_sum / tokens,
                                      "tokens": state.extra["tokens"]}) + "\n")
        if state.step % config.checkpoint.interval == 0 or state.step == config.training.steps:
            if state.step == args.kill_in_save_at:
                folder.publish = die  # after every rank wrote, before the rename
            checkpointer.save(state)
        if state.step == args.kill_at_step:
            die()

    write_result(args.result, {"resumed_from": str(resumed_from) if resumed_from else None})
    destroy_distributed()


if __name__ == "__main__":
    main()
