"""Token losses of an imported model loaded at a TP/PP layout (launched by tests/test_hf_import.py).

Builds the model that the import's config.yaml describes at `--tp` x `--pp`, loads the imported
weights as `checkpoint.init_from` does, and reports every token's loss over the test's document
batches (or the documents of `--tokens`, one per slot) with memory disabled, for comparison with
the Hugging Face model's on the same tokens.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for `tiny`, `distributed`

from megatron_memorizing.memories import ModelMemories  # noqa: E402
from megatron_memorizing.model import build_model  # noqa: E402
from megatron_memorizing.parallel import destroy_distributed, initialize_distributed  # noqa: E402
from megatron_memorizing.run.config import RunConfig  # noqa: E402
from megatron_memorizing.run.weights import load_weights  # noqa: E402
from megatron_memorizing.step import forward_backward  # noqa: E402

from distributed import write_result  # noqa: E402
from tiny import document_batches, segment_batches  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True, help="the import's output directory")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokens", help="a torch.save'd [slots, steps * segment + 1] tensor of documents to read")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    run = RunConfig.load(Path(args.checkpoint) / "iter_0000000" / "config.yaml")
    config = dataclasses.replace(run.model, tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    initialize_distributed(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    chunks = build_model(config)
    load_weights(args.checkpoint, chunks)
    for chunk in chunks:
        chunk.eval()
    memories = ModelMemories(chunks, config.micro_batch_size)
    if args.tokens:
        batches = segment_batches(torch.load(args.tokens), config.segment_length)
    else:
        batches = document_batches(args.steps, config.memory_slots, config.segment_length, config.vocab_size, seed=3)
    losses = []
    with torch.no_grad(), memories.disabled():
        for batch in batches:
            step = forward_backward(chunks, memories, batch, forward_only=True)
            memories.commit()
            # The last pipeline stage computed the losses: share them with rank 0, which reports.
            token_losses = step.token_losses if step.token_losses is not None else torch.zeros(batch.tokens.shape)
            torch.distributed.all_reduce(token_losses, group=parallel_state.get_pipeline_model_parallel_group())
            losses.append(token_losses.tolist())
    write_result(args.result, {"token_losses": losses})
    destroy_distributed()


if __name__ == "__main__":
    main()
