"""Checkpoint a memorizing and a vanilla tiny model at TP=2 x PP=2, for loading at other layouts.

Launched by tests/test_checkpoint.py on 4 processes; `--save DIR` writes DIR/memorizing and
DIR/vanilla (complete checkpoints at step 0: weights, optimizer state, memories, stream) and
reports the memorizing model's loss on fresh documents. The test imports `train_state` and
`segment_losses` to build and evaluate the same models in its own process.
"""

import argparse
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for `tiny`, `distributed`

from megatron_memorizing.data import DocumentStream  # noqa: E402
from megatron_memorizing.memories import ModelMemories  # noqa: E402
from megatron_memorizing.model import build_model  # noqa: E402
from megatron_memorizing.parallel import destroy_distributed, initialize_distributed  # noqa: E402
from megatron_memorizing.run.config import CheckpointConfig, DataConfig, OptimizerConfig, RunConfig  # noqa: E402
from megatron_memorizing.step import forward_backward, sum_over_data_parallel  # noqa: E402
from megatron_memorizing.training.checkpoint import Checkpointer, TrainState  # noqa: E402
from megatron_memorizing.training.optimizer import build_optimizer  # noqa: E402

from distributed import write_result  # noqa: E402
from tiny import document_batches, tiny_config  # noqa: E402

VOCAB = 1024  # the test dataset's tokenizer has 1000 pieces


def train_state(data: str, checkpoint_dir: Path, **model_overrides) -> TrainState:
    """A fresh tiny model (memory in layer 3 unless overridden) with everything a checkpoint holds."""
    model = tiny_config(**{"vocab_size": VOCAB, **model_overrides})
    config = RunConfig(
        model=model,
        data=DataConfig(train=str(data), validation=None),
        optimizer=OptimizerConfig(backend="megatron"),
        checkpoint=CheckpointConfig(dir=str(checkpoint_dir)),
    )
    chunks = build_model(model)
    stream = DocumentStream(
        data, model.memory_slots, model.segment_length,
        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
    )
    return TrainState(
        chunks, build_optimizer(config, chunks), ModelMemories(chunks, model.micro_batch_size), stream, config
    )


def segment_losses(state: TrainState, segments: int) -> list[float]:
    """Forward-only losses over consecutive segments of fresh documents: from the second segment
    on, the memory holds the earlier ones."""
    model = state.run_config.model
    losses = []
    for batch in document_batches(segments, model.memory_slots, model.segment_length, VOCAB, boundaries=(), seed=5):
        step_loss = forward_backward(state.model_chunks, state.memories, batch, forward_only=True)
        state.memories.commit()
        loss_sum, tokens = sum_over_data_parallel(torch.tensor([step_loss.loss_sum, step_loss.tokens])).tolist()
        losses.append(loss_sum / tokens)
    return losses


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--save", type=Path, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    initialize_distributed(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    layout = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    memorizing = train_state(args.data, args.save / "memorizing", **layout)
    Checkpointer(memorizing.run_config.checkpoint).save(memorizing)
    vanilla = train_state(args.data, args.save / "vanilla", memory_layers=(), **layout)
    Checkpointer(vanilla.run_config.checkpoint).save(vanilla)
    write_result(args.result, {"losses": segment_losses(memorizing, segments=1)})
    destroy_distributed()


if __name__ == "__main__":
    main()
