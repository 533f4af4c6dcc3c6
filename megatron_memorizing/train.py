"""Train a memorizing GPT: `megatron-memorizing-train --config configs/tiny-cpu.yaml [--set a.b=c ...]`.

Runs unchanged under `torchrun`, the `deepspeed` launcher (which appends --local_rank) and SLURM's
srun (via launch_scripts/), or as one plain process.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_memorizing.cli_arguments import config_override, existing_file, file_in_the_way, not_a_folder
from megatron_memorizing.config import ConfigError
from megatron_memorizing.lifetime import die_with_parent, exit_cleanly_on_signals
from megatron_memorizing.run.config import RunConfig


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="megatron-memorizing-train",
        description="Train a Memorizing Transformer on Megatron-Core (DeepSpeed ZeRO or Megatron's optimizer).",
    )
    parser.add_argument("--config", required=True, type=existing_file,
                        help="YAML run config (see configs/ and docs/training.md)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        type=config_override,
        help="override one config field, e.g. --set optimizer.lr=3e-4 --set model.memory_size=65536 (repeatable)",
    )
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher; ignored (LOCAL_RANK is read from the environment)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if "LOCAL_RANK" in os.environ:  # started by a launcher: stop when it does, even if it is killed
        die_with_parent()
    with exit_cleanly_on_signals():
        return _train(args)


def _check_paths(config: RunConfig) -> None:
    """The paths the config names, before any process group: a folder that is a file, a
    checkpoint or dataset that is not there is a ConfigError naming the field."""
    for field, folder in (("checkpoint.dir", config.checkpoint.dir), ("logging.dir", config.logging.dir)):
        blocking = file_in_the_way(folder) if folder else None
        if blocking is not None:
            raise ConfigError(f"{field}={not_a_folder(Path(folder), blocking)}: choose another {field}.")
    init_from = config.checkpoint.init_from
    if init_from and not os.path.isdir(init_from):
        raise ConfigError(f"checkpoint.init_from={init_from} is not a folder: pass a checkpoint directory or one "
                          f"iter_* directory in it.")
    from megatron_memorizing.data.errors import DataError
    from megatron_memorizing.data.manifest import check_prefix

    for field, prefix in (("data.train", config.data.train), ("data.validation", config.data.validation)):
        try:
            if prefix:
                check_prefix(prefix)
        except DataError as error:
            raise ConfigError(f"{field}={prefix}: {error}") from None


def _train(args: argparse.Namespace) -> int:
    try:
        config = RunConfig.load(args.config, args.set)
        _check_paths(config)
    except ConfigError as error:  # before any process group: a clean message, no traceback
        print(f"megatron-memorizing-train: bad config: {error}", file=sys.stderr)
        return 2

    # Heavy imports: the config is good.
    import torch.distributed

    from megatron_memorizing.data import DataError
    from megatron_memorizing.parallel import destroy_distributed, lost_contact
    from megatron_memorizing.run.folder import CheckpointError
    from megatron_memorizing.training.divergence import DivergedError
    from megatron_memorizing.training.trainer import Trainer

    try:
        trainer = Trainer(config)
    except (CheckpointError, DataError, ConfigError) as error:  # found before step 1
        destroy_distributed()
        print(f"megatron-memorizing-train: {error}", file=sys.stderr)
        return 2
    try:
        result = trainer.fit()
    except (DivergedError, CheckpointError) as error:
        print(f"megatron-memorizing-train: {error}", file=sys.stderr)
        return 1
    except DataError as error:  # data found bad during training
        print(f"megatron-memorizing-train: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if not lost_contact(error):
            raise
        latest = trainer.checkpointer.latest() if trainer.checkpointer else None
        first_line = str(error).strip().splitlines()[0][:200]
        print(
            f"megatron-memorizing-train: rank {torch.distributed.get_rank()} lost contact with another rank at step "
            f"{trainer.state.step + 1} ({first_line}): a process or node of this job died, hangs or was cut off. "
            f"Restart the job on all nodes; it resumes from the last complete checkpoint "
            f"({latest or 'none yet: it starts over'}).",
            file=sys.stderr,
        )
        # Nothing is left to do with the other ranks gone, and any cleanup would talk to them
        # (flushing a gradient reduction, tearing down groups): fail again or wait for them.
        sys.stderr.flush()
        os._exit(3)
    finally:
        trainer.close()
    if trainer.logger.is_writer:
        print(f"trained {result.steps} steps; final training loss {result.train_loss:.4f}")
        if result.validation is not None:
            label = "with memory:   " if result.validation_without_memory is not None else "(no memory layer):"
            print(f"validation perplexity {label} {result.validation.perplexity:.3f}")
        if result.validation_without_memory is not None:
            print(f"validation perplexity memory disabled: {result.validation_without_memory.perplexity:.3f}")
            print("(the same weights both times: the difference is how much this model reads its memory. What memory "
                  "gains is measured against a twin trained without it, model.memory_layers=[]: docs/results.md)")
        print(f"tensorboard logs: {result.log_dir}   (tensorboard --logdir {result.log_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
