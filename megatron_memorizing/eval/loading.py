"""What every evaluation tool starts from: a trained checkpoint as a model in one process, and a
forward pass that returns logits instead of a loss.

The model is built from the checkpoint's own config.yaml, with tensor and pipeline parallelism
set to 1 (weights are resharded on load) and, optionally, another number of memory slots:
slots are per-document runtime state, not weights, so evaluation may stream more or fewer
documents side by side than training did. `--set` may change the config, but not which
parameters the model has (its architecture, memory layers it trained) unless asked to: that would
quietly evaluate another model. Memory layers added to a model are new parameters at their
initial values: a model trained without memory, say, given one for a look.
"""

from __future__ import annotations

import argparse
import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import yaml
from megatron.core import parallel_state

from megatron_memorizing.cli_arguments import config_override, dataset_prefix
from megatron_memorizing.config import ONE_PROCESS, ConfigError
from megatron_memorizing.data import Batch, DataError, DocumentStream, check_compatible, trained_tokenizer
from megatron_memorizing.memories import ModelMemories
from megatron_memorizing.model import build_model
from megatron_memorizing.parallel import initialize_distributed
from megatron_memorizing.run.config import RunConfig
from megatron_memorizing.run.folder import CheckpointError, read_info, resolve
from megatron_memorizing.run.weights import load_weights, parameter_changes

# As config overrides: the whole model in this process.
SINGLE_PROCESS = tuple(f"model.{name}={yaml.safe_dump(value).splitlines()[0]}" for name, value in ONE_PROCESS.items())


@dataclass
class LoadedModel:
    path: Path  # the iteration directory the weights came from
    config: RunConfig
    model_chunks: list[torch.nn.Module]
    memories: ModelMemories

    @property
    def step(self) -> int:
        return int(self.path.name.split("_")[-1]) if self.path.name.startswith("iter_") else 0

    @property
    def tokenizer(self) -> Optional[Path]:
        """The tokenizer the model was trained with: the checkpoint's copy, else the one its
        training data names; None if neither is there to read."""
        return trained_tokenizer(self.path, self.config.data.train)


def evaluation_data(loaded: LoadedModel, data: Optional[str], parser: argparse.ArgumentParser) -> str:
    """The dataset an evaluation command reads: --data, else the run's validation split. It must
    be whole and tokenized with the model's own tokenizer; otherwise the command stops here with
    one line naming both files (exit 2), before any number is computed."""
    prefix = data or loaded.config.data.validation
    if not prefix:
        parser.error("the checkpoint's config names no validation data: pass --data PREFIX")
    try:
        check_compatible(prefix, loaded.config.model.vocab_size, tokenizer_path=loaded.tokenizer)
    except DataError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return prefix


def add_checkpoint_arguments(parser: argparse.ArgumentParser, data_help: str) -> None:
    """--checkpoint, --data, --set and --allow-other-model, which every evaluation command takes."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or one iter_* directory in it")
    parser.add_argument("--data", type=dataset_prefix, help=f"{data_help} (default: the run's validation split)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", type=config_override,
                        help="override a field of the checkpoint's config (repeatable)")
    parser.add_argument("--allow-other-model", action="store_true",
                        help="let --set drop or move the memory layers the checkpoint trained: their parameters "
                             "are not loaded, new ones keep their initial values (refused without it)")


def load_checkpoint_argument(args: argparse.Namespace, parser: argparse.ArgumentParser, slots: Optional[int],
                             overrides: Sequence[str] = ()) -> LoadedModel:
    """`load_checkpoint` of the command line's --checkpoint and --set (then `overrides`); a path
    that holds no checkpoint, a bad --set or a checkpoint that cannot be loaded as asked ends the
    command with one line saying so (exit 2), not a traceback."""
    try:
        return load_checkpoint(args.checkpoint, [*args.set, *overrides], slots=slots,
                               allow_other_model=args.allow_other_model)
    except FileNotFoundError as error:
        parser.exit(2, f"{parser.prog}: error: --checkpoint {error}: pass a checkpoint directory written by "
                       f"megatron-memorizing-train (its latest iteration is read) or one iter_* directory in it\n")
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: --set: {error}\n")
    except CheckpointError as error:
        parser.exit(2, f"{parser.prog}: error: --checkpoint {error}\n")


def load_checkpoint(checkpoint: str | Path, overrides: Sequence[str] = (), slots: Optional[int] = None,
                    allow_other_model: bool = False) -> LoadedModel:
    """Build the checkpoint's model in this process (TP=PP=1) and load its weights.

    `checkpoint` is an iteration directory or a checkpoint directory (its latest iteration, the one
    training would resume from);
    `overrides` are `section.field=value` strings as for training; `slots` sets the number of
    documents streamed side by side (one micro-batch of that many sequences). Overrides that drop
    or reshape trained parameters are refused unless `allow_other_model`.
    """
    path = resolve(checkpoint)
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{checkpoint} holds no complete checkpoint (no config.yaml)")
    read_info(path)  # an interrupted save, say: refused before the model is built
    layout = list(SINGLE_PROCESS)
    if slots is not None:
        layout += [f"model.micro_batch_size={slots}", "model.num_micro_batches=1"]
    config = RunConfig.load(path / "config.yaml", [*layout, *overrides])
    changes = parameter_changes(RunConfig.load(path / "config.yaml").model, config.model)
    if changes and not allow_other_model:
        raise CheckpointError(
            f"{path}: --set changes which parameters the model has ({changes}), so another model than the "
            f"trained one would be evaluated: leave these fields as saved, or pass --allow-other-model."
        )
    if not parallel_state.model_parallel_is_initialized():  # else a caller (a test, a notebook) did
        initialize_distributed(seed=config.training.seed)
    elif (parallel_state.get_tensor_model_parallel_world_size()
          * parallel_state.get_pipeline_model_parallel_world_size() > 1):
        raise RuntimeError("load_checkpoint builds the whole model in one process: initialize with TP=PP=1")
    model_chunks = build_model(config.model)
    left_at_init = load_weights(path, model_chunks)
    if left_at_init:
        warnings.warn(f"{path} has no weights for {left_at_init}: they keep their initial values")
    for chunk in model_chunks:
        chunk.eval()
    return LoadedModel(path, config, model_chunks, ModelMemories(model_chunks, config.model.micro_batch_size))


@torch.no_grad()
def segments_to_read(args: argparse.Namespace,
                     parser: argparse.ArgumentParser) -> tuple[LoadedModel, str, Iterator[Batch]]:
    """For the tools that watch a model read: the checkpoint (--checkpoint, --set, --slots), the
    dataset (--data) and its first --segments segments per slot, streamed as in training."""
    loaded = load_checkpoint_argument(args, parser, slots=args.slots)
    data = evaluation_data(loaded, args.data, parser)
    model = loaded.config.model
    stream = DocumentStream(data, model.memory_slots, model.segment_length, loop=False)
    return loaded, data, itertools.islice(stream, args.segments)


def forward_logits(model_chunks: list[torch.nn.Module], memories: ModelMemories, batch: Batch) -> torch.Tensor:
    """Logits [slots, L, vocab] of a batch on a single-process model, reading the memory as it is.

    Slots that start a document are reset first; nothing is committed: the caller commits once it
    has run every forward pass it wants over this batch (with and without memory, say).
    """
    if len(model_chunks) != 1:
        raise ValueError("forward_logits needs the whole model in one chunk (pipeline parallelism 1)")
    (model,) = model_chunks
    memories.reset(batch.new_document)
    size = memories.micro_batch_size
    slots, length = batch.tokens.shape
    positions = torch.arange(length).expand(size, -1)
    outputs = []
    for j in range(slots // size):
        memories.use_micro_batch(j)
        outputs.append(model(batch.tokens[j * size : (j + 1) * size], positions, None).float())
    return torch.cat(outputs)


def token_losses(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-token cross-entropy [slots, L], 0 on padding."""
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="none")
    return losses.view_as(batch.loss_mask) * batch.loss_mask
