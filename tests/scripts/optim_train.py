"""Train the tiny memorizing model with real AdamW through each optimizer backend named; write losses.

Launched by tests/test_optimizers.py. One launch runs several cases in turn (`--case
deepspeed:1 --case megatron ...`), each from the same initial weights (a dist_checkpointing
checkpoint written by the first launch, resharded on load) over the same documents, so losses can
be compared across cases, layouts and launches. The memory fills and wraps across steps, and one
slot starts a new document mid-run; embeddings are tied (across stages under PP).

`--resume-at K` also saves everything after step K (module weights, optimizer state, memories),
then builds a fresh model and backend, loads, and replays steps K.. as `resumed_losses`.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for `tiny`

from megatron_memorizing.knn_attention import MEMORY_PARAMETERS  # noqa: E402
from megatron_memorizing.memories import ModelMemories  # noqa: E402
from megatron_memorizing.model import build_model  # noqa: E402
from megatron_memorizing.parallel import destroy_distributed, initialize_distributed  # noqa: E402
from megatron_memorizing.run.config import OptimizerConfig, RunConfig, TrainingConfig  # noqa: E402
from megatron_memorizing.step import forward_backward  # noqa: E402
from megatron_memorizing.training.optimizer import build_optimizer  # noqa: E402

from tiny import document_batches, tiny_config  # noqa: E402

GLOBAL_SLOTS = 4
STEPS = 5
LEARNING_RATE = 3e-3
CLIP_GRAD = 1.0


class Run:
    """One rank's model, memories and backend for one case, from weights on disk."""

    def __init__(self, run_config: RunConfig, weights: Path):
        torch.manual_seed(0)
        (self.model,) = build_model(run_config.model)
        self.model.load_state_dict(dist_checkpointing.load(self.model.sharded_state_dict(), str(weights)))
        self.memories = ModelMemories([self.model], run_config.model.micro_batch_size)
        self.backend = build_optimizer(run_config, [self.model])

    def train(self, batches) -> tuple[list[float], list[float]]:
        losses, norms = [], []
        for batch in batches:
            self.backend.zero_grad()
            step_loss = forward_backward(self.backend.model_chunks, self.memories, my_slots(batch))
            result = self.backend.step(LEARNING_RATE)
            assert not result.skipped
            self.memories.commit()
            losses.append(global_mean(step_loss))
            norms.append(result.grad_norm)
        return losses, norms

    def save(self, directory: Path) -> None:
        (directory / "weights").mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(self.model.sharded_state_dict(), str(directory / "weights"))
        self.backend.save(directory / "optimizer")
        torch.save(self.memories.state_dict(), directory / f"memories{dist.get_rank()}.pt")

    def load_rest(self, directory: Path) -> None:
        self.backend.load(directory / "optimizer")
        self.memories.load_state_dict(torch.load(directory / f"memories{dist.get_rank()}.pt"))


def my_slots(batch):
    slots = GLOBAL_SLOTS // parallel_state.get_data_parallel_world_size()
    rows = slice(parallel_state.get_data_parallel_rank() * slots, (parallel_state.get_data_parallel_rank() + 1) * slots)
    return type(batch)(**{k: getattr(batch, k)[rows] for k in vars(batch)})


def global_mean(step_loss) -> float:
    total = torch.tensor([step_loss.loss_sum, step_loss.tokens], dtype=torch.float64)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total[0] / total[1]).item()


def run_config_for(case: str, args) -> RunConfig:
    """`case` is BACKEND[:STAGE][/MULT]: MULT, the memory scalars' learning-rate multiplier."""
    case, _, lr_mult = case.partition("/")
    backend, _, stage = case.partition(":")
    model = tiny_config(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        micro_batch_size=1,
        num_micro_batches=GLOBAL_SLOTS // parallel_state.get_data_parallel_world_size(),
        xl_cache=True,
        share_embeddings_and_output_weights=True,
    )
    optimizer = OptimizerConfig(
        backend=backend, zero_stage=int(stage or 1), lr=LEARNING_RATE, min_lr=0.0, clip_grad=CLIP_GRAD,
        memory_scalars_lr_mult=float(lr_mult or 1),
    )
    return RunConfig(model=model, optimizer=optimizer, training=TrainingConfig(steps=STEPS))


def travel_start(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.ndim == 1}


def travel(model, before: dict) -> dict:
    """Mean distance this rank's memory scalars and other 1-d parameters moved, per element
    (None for a kind this rank holds none of: a pipeline stage without a memory layer)."""
    moved = {"memory_scalars_travel": [], "other_travel": []}
    for name, p in model.named_parameters():
        if name in before:
            kind = "memory_scalars_travel" if name.endswith(MEMORY_PARAMETERS) else "other_travel"
            moved[kind].append((p.detach() - before[name]).abs().flatten())
    return {kind: torch.cat(values).mean().item() if values else None for kind, values in moved.items()}


def run_case(case: str, args, batches) -> dict:
    run_config = run_config_for(case, args)
    run = Run(run_config, Path(args.init_checkpoint))
    if args.resume_at is None:
        before = travel_start(run.model)
        losses, norms = run.train(batches)
        return {"losses": losses, "grad_norms": norms, **travel(run.model, before)}

    saved = Path(args.work_dir) / case.replace(":", "")
    losses, norms = run.train(batches[: args.resume_at])
    run.save(saved)
    continued, _ = run.train(batches[args.resume_at :])

    fresh = Run(run_config, saved / "weights")
    fresh.load_rest(saved)
    resumed, _ = fresh.train(batches[args.resume_at :])
    result = {"losses": losses + continued, "grad_norms": norms, "resumed_losses": resumed}
    if run_config.optimizer.backend == "deepspeed":
        # Optimizer state saved beside other weights than the module holds must not load.
        try:
            Run(run_config, Path(args.init_checkpoint)).backend.load(saved / "optimizer")
            result["mismatch_refused"] = ""
        except RuntimeError as error:
            result["mismatch_refused"] = str(error)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--case", action="append", required=True,
                        help="megatron or deepspeed:STAGE, then /MULT for a memory scalars lr_mult")
    parser.add_argument("--resume-at", type=int, help="save after this step, reload, replay the rest")
    parser.add_argument("--work-dir", help="where --resume-at saves (shared by all ranks)")
    parser.add_argument("--init-checkpoint", required=True, help="written if absent, else loaded")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    initialize_distributed(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    checkpoint = Path(args.init_checkpoint)
    if not checkpoint.exists():
        torch.manual_seed(0)
        (model,) = build_model(run_config_for(args.case[0], args).model)
        checkpoint.mkdir(parents=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(checkpoint))

    config = tiny_config()
    batches = document_batches(STEPS, GLOBAL_SLOTS, config.segment_length, config.vocab_size)
    result = {case: run_case(case, args, batches) for case in args.case}

    last_stage = parallel_state.is_pipeline_last_stage()
    if (last_stage and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0):
        Path(args.result).write_text(json.dumps(result))
    destroy_distributed()


if __name__ == "__main__":
    main()
