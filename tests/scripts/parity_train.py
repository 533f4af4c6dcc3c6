"""Train the tiny memorizing model for a few steps under one parallel layout; write losses as JSON.

Launched by tests/test_parallel_parity.py through torchrun. Every layout starts from the same
weights (a dist_checkpointing checkpoint written by the TP=1 run and resharded on load) and
streams the same documents, so the losses must agree across layouts. The memory fills across
steps (wrapping its ring) and one slot starts a new document mid-run.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for `tiny`

from megatron_memorizing.memories import ModelMemories  # noqa: E402
from megatron_memorizing.model import build_model  # noqa: E402
from megatron_memorizing.parallel import destroy_distributed, initialize_distributed  # noqa: E402
from megatron_memorizing.step import forward_backward  # noqa: E402

from tiny import document_batches, tiny_config  # noqa: E402

GLOBAL_SLOTS = 4
LEARNING_RATE = 0.5


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--recompute", default="none")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--init-checkpoint", required=True, help="written if absent, else loaded")
    parser.add_argument("--save-checkpoint", help="save the trained weights here")
    parser.add_argument("--eval-only", action="store_true", help="load --init-checkpoint, report the eval loss")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    initialize_distributed(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    slots = GLOBAL_SLOTS // dp_size
    config = tiny_config(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        micro_batch_size=1,
        num_micro_batches=slots,
        xl_cache=True,
        recompute=args.recompute,
    )
    torch.manual_seed(0)
    (model,) = build_model(config)
    memories = ModelMemories([model], config.micro_batch_size)

    checkpoint = Path(args.init_checkpoint)
    if checkpoint.exists():
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(checkpoint)))
    else:
        checkpoint.mkdir(parents=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(checkpoint))

    def my_slots(batch):
        rows = slice(dp_rank * slots, (dp_rank + 1) * slots)
        return type(batch)(**{k: getattr(batch, k)[rows] for k in vars(batch)})

    def global_mean(step_loss) -> float:
        total = torch.tensor([step_loss.loss_sum, step_loss.tokens], dtype=torch.float64)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return (total[0] / total[1]).item()

    result = {}
    if not args.eval_only:
        losses = []
        for batch in document_batches(args.steps, GLOBAL_SLOTS, config.segment_length, config.vocab_size):
            step_loss = forward_backward([model], memories, my_slots(batch))
            for p in model.parameters():  # plain SGD on the data-parallel mean gradient
                dist.all_reduce(p.grad, group=parallel_state.get_data_parallel_group())
                p.data.add_(p.grad, alpha=-LEARNING_RATE / dp_size)
                p.grad = None
            memories.commit()
            losses.append(global_mean(step_loss))
        result["losses"] = losses
        result["memory_fill"] = [layer.memory.fill.tolist() for layer in memories.knn_layers]
    if args.save_checkpoint:
        Path(args.save_checkpoint).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), args.save_checkpoint)

    # A fresh document in every slot, loss with empty memory: compares weights across layouts.
    (eval_batch,) = document_batches(1, GLOBAL_SLOTS, config.segment_length, config.vocab_size, seed=99)
    result["eval_loss"] = global_mean(forward_backward([model], memories, my_slots(eval_batch), forward_only=True))

    last_stage = parallel_state.is_pipeline_last_stage()
    if last_stage and parallel_state.get_tensor_model_parallel_rank() == 0 and dp_rank == 0:
        Path(args.result).write_text(json.dumps(result))
    destroy_distributed()


if __name__ == "__main__":
    main()
