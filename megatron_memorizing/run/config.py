"""The run configuration: one YAML file, every field documented here, overridable from the command line.

    model:       MemorizingConfig (architecture, memory, parallel layout; see megatron_memorizing/config.py)
    data:        DataConfig        which indexed datasets to stream
    optimizer:   OptimizerConfig   AdamW, LR schedule, clipping, DeepSpeed ZeRO or Megatron's optimizer
    training:    TrainingConfig    steps, seed, memory curriculum, evaluation
    checkpoint:  CheckpointConfig  where, how often, how many to keep, what to start from
    logging:     LoggingConfig     tensorboard directory, console interval

Overrides use dotted paths: `--set optimizer.lr=3e-4 --set model.memory_size=65536`. The whole
config is validated before any process group exists, and saved beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml

from megatron_memorizing.config import ConfigError, MemorizingConfig, checked_fields


@dataclass
class DataConfig:
    train: str = "data/stdlib/train"  # indexed dataset prefix (path without .bin/.idx)
    validation: Optional[str] = "data/stdlib/validation"  # None: no evaluation
    seed: int = 0  # document order (the stream shuffles documents by this seed)


@dataclass
class OptimizerConfig:
    backend: str = "deepspeed"  # "deepspeed" (ZeRO) or "megatron" (Megatron-Core's optimizer, DDP)
    zero_stage: int = 1  # DeepSpeed ZeRO stage: 1 (optimizer states) or 2 (+ gradients; not with PP)
    lr: float = 1e-3  # peak learning rate, reached after warmup
    min_lr: float = 1e-4  # floor of the cosine decay
    warmup_steps: int = 100
    decay_steps: Optional[int] = None  # cosine decay length; None -> training.steps - warmup
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient-norm clipping; 0 disables
    # Learning-rate multiplier of the memory layers' per-head scalars (gate bias, memory logit
    # scale), as Megatron-LM's lr_mult for a parameter group. Adam moves a parameter by about the
    # learning rate per step, so at 1 these two per head cannot travel the ~1 (log scale) they
    # need in a short run (docs/results.md, "The recipe that works"); 10 lets them.
    memory_scalars_lr_mult: float = 1.0


def _pipeline_ranks_without_memory(model: MemorizingConfig) -> list[int]:
    """The pipeline ranks none of whose layers (over all their virtual stages) has memory."""
    pp, vpp = model.pipeline_model_parallel_size, model.virtual_pipeline_model_parallel_size or 1
    per_chunk = model.num_layers // (pp * vpp)
    def layers(rank: int) -> set[int]:
        return {(chunk * pp + rank) * per_chunk + i + 1 for chunk in range(vpp) for i in range(per_chunk)}
    return [rank for rank in range(pp) if not layers(rank) & set(model.memory_layers)]


@dataclass
class TrainingConfig:
    steps: int = 1000  # optimizer steps; each streams one segment into every slot
    seed: int = 1234
    # Memory curriculum: [[step, memory_size], ...], sizes growing over the run (contents kept).
    # Empty: model.memory_size throughout.
    memory_curriculum: list = field(default_factory=list)
    # Train only the layers from this one up (1-based); the embedding and the layers below it stay
    # frozen (and a tied output layer with the embedding): adding memory to a pretrained model,
    # layers below the memory layer can keep their pretrained weights. 1: train everything.
    train_from_layer: int = 1
    # The run has diverged, and stops, when a step's loss is not finite, or is above both ln(vocab)
    # (a uniform guess) and this many times the recent average loss; the checkpoint whose weights
    # gave that loss is never published (training/divergence.py). 0: only a non-finite loss.
    divergence_factor: float = 4.0
    eval_interval: int = 0  # steps between validation passes; 0: only at the end
    eval_segments: int = 64  # validation segments per slot in one pass (None-like 0: whole split)
    # How long a collective waits for the other ranks before failing (Megatron-LM's
    # --distributed-timeout-minutes): a rank whose peer hangs, or whose node is cut off, stops
    # after this long. A peer that dies outright is noticed at once (its connections close).
    distributed_timeout_minutes: float = 10.0
    # Stop with a checkpoint once this many minutes of training have passed (Megatron-LM's
    # --exit-duration-in-mins), so that a run longer than a job's time limit is a series of jobs:
    # the same command continues where it stopped. Needs checkpoint.dir. 0: never.
    exit_duration_minutes: float = 0.0


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # None: no checkpoints
    interval: int = 100  # steps between checkpoints (and one at the end)
    keep_last: int = 3  # older complete checkpoints are deleted
    resume: bool = True  # continue from the newest complete checkpoint in `dir`, if any
    # A checkpoint (e.g. of a vanilla model) to take weights from at step 0; parameters it
    # lacks (the memory gate and scale) keep their initial values: the paper's fine-tuning recipe.
    init_from: Optional[str] = None


@dataclass
class LoggingConfig:
    dir: str = "runs/default"  # tensorboard event files and the console log go here
    interval: int = 10  # steps between console lines


@dataclass
class RunConfig:
    model: MemorizingConfig = field(default_factory=MemorizingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        opt, model, training = self.optimizer, self.model, self.training
        if opt.backend not in ("deepspeed", "megatron"):
            raise ConfigError(f"optimizer.backend={opt.backend!r}: use 'deepspeed' or 'megatron'.")
        if opt.backend == "megatron" and model.bf16 and not torch.cuda.is_available():
            raise ConfigError(
                "model.bf16 with optimizer.backend=megatron needs CUDA: Megatron-Core's mixed-precision "
                "optimizer accepts only CUDA tensors. On CPU use optimizer.backend=deepspeed for bf16, "
                "or model.bf16=false."
            )
        if opt.backend == "deepspeed":
            self._validate_deepspeed()
        if training.steps < 1:
            raise ConfigError(f"training.steps={training.steps} must be at least 1.")
        if opt.lr <= 0:
            raise ConfigError(f"optimizer.lr={opt.lr} must be above 0.")
        if not 0 <= opt.min_lr <= opt.lr:
            raise ConfigError(f"optimizer.min_lr={opt.min_lr} must be between 0 and optimizer.lr={opt.lr}.")
        if opt.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps={opt.warmup_steps} must be at least 0.")
        if opt.memory_scalars_lr_mult <= 0:
            raise ConfigError(
                f"optimizer.memory_scalars_lr_mult={opt.memory_scalars_lr_mult} must be > 0 (1: no change)."
            )
        stages = _pipeline_ranks_without_memory(model)
        if opt.memory_scalars_lr_mult != 1.0 and model.memory_layers and stages:
            # The multiplier is a parameter group of its own, on the ranks that hold memory layers
            # only; the optimizers reduce per group across the pipeline, so the ranks would wait
            # on each other for ever.
            raise ConfigError(
                f"optimizer.memory_scalars_lr_mult={opt.memory_scalars_lr_mult} needs a memory layer on every "
                f"pipeline rank, but pipeline rank(s) {stages} hold none of model.memory_layers="
                f"{list(model.memory_layers)}: put one in each stage, or set optimizer.memory_scalars_lr_mult=1."
            )
        sizes = [size for _, size in training.memory_curriculum]
        steps = [step for step, _ in training.memory_curriculum]
        if steps != sorted(steps) or sizes != sorted(sizes):
            raise ConfigError(
                f"training.memory_curriculum={training.memory_curriculum}: steps and memory sizes must "
                f"both increase (small memory first, then larger: the memory grows, keeping its contents)."
            )
        if any(size < model.knn_top_k for size in sizes):
            raise ConfigError(
                f"training.memory_curriculum has a memory size below model.knn_top_k={model.knn_top_k}."
            )
        if training.divergence_factor != 0 and not training.divergence_factor > 1:
            raise ConfigError(
                f"training.divergence_factor={training.divergence_factor} must be above 1 (a loss that many times "
                f"the recent average stops the run), or 0 to stop only on a non-finite loss."
            )
        if not 1 <= training.train_from_layer <= model.num_layers:
            raise ConfigError(
                f"training.train_from_layer={training.train_from_layer} must be a layer number, 1 (train every "
                f"layer) to model.num_layers={model.num_layers}."
            )
        if training.exit_duration_minutes < 0:
            raise ConfigError(
                f"training.exit_duration_minutes={training.exit_duration_minutes} must be >= 0 (0: never)."
            )
        if training.exit_duration_minutes and not self.checkpoint.dir:
            raise ConfigError(
                f"training.exit_duration_minutes={training.exit_duration_minutes} stops the run to be continued "
                f"from its checkpoint: set checkpoint.dir, or training.exit_duration_minutes=0."
            )
        at_least = {
            "checkpoint.keep_last": (self.checkpoint.keep_last, 1),
            "checkpoint.interval": (self.checkpoint.interval, 1),
            "logging.interval": (self.logging.interval, 1),
            "training.eval_interval": (training.eval_interval, 0),
            "training.eval_segments": (training.eval_segments, 0),
            "training.distributed_timeout_minutes": (training.distributed_timeout_minutes, 0.05),
        }
        for name, (value, least) in at_least.items():
            if value < least:
                raise ConfigError(f"{name}={value} must be at least {least}.")

    def _validate_deepspeed(self) -> None:
        opt, model = self.optimizer, self.model
        if model.virtual_pipeline_model_parallel_size is not None:
            raise ConfigError(
                f"model.virtual_pipeline_model_parallel_size={model.virtual_pipeline_model_parallel_size} "
                f"with optimizer.backend=deepspeed: a DeepSpeed engine wraps one module, and a rank holds "
                f"one model chunk per virtual stage. Use optimizer.backend=megatron with virtual pipeline "
                f"stages, or drop virtual_pipeline_model_parallel_size."
            )
        if opt.zero_stage == 0:
            raise ConfigError(
                "optimizer.zero_stage=0 with optimizer.backend=deepspeed: without ZeRO, DeepSpeed's fp32 "
                "gradient clipping counts replicated parameters (norms, biases) of the first pipeline "
                "stage only, and it reports no gradient norm. Use optimizer.backend=megatron for "
                "unpartitioned data parallelism, or zero_stage 1 or 2."
            )
        if opt.zero_stage == 3:
            # Training itself works (Megatron's modules gather their parameters through ZeRO-3's
            # hooks and give ZeRO-1's losses at TP=PP=1); checkpointing the weights does not.
            raise ConfigError(
                "optimizer.zero_stage=3 is not supported: ZeRO-3 leaves every parameter an empty "
                "placeholder outside forward/backward, and the trainer checkpoints module weights with "
                "Megatron's dist_checkpointing, whose model.sharded_state_dict() then fails (IndexError "
                "in ShardedTensor.from_rank_offsets). Use zero_stage 1 or 2 (ZeRO-2 also partitions "
                "gradients)."
            )
        if opt.zero_stage not in (1, 2):
            raise ConfigError(f"optimizer.zero_stage={opt.zero_stage}: DeepSpeed ZeRO stages are 0-3; use 1 or 2.")
        if opt.zero_stage == 2 and model.pipeline_model_parallel_size > 1:
            raise ConfigError(
                f"optimizer.zero_stage=2 with pipeline_model_parallel_size="
                f"{model.pipeline_model_parallel_size}: ZeRO-2 partitions gradients during backward, "
                f"which pipeline schedules interleave across micro-batches (Megatron-DeepSpeed refuses "
                f"this too). Use zero_stage=1 with pipeline parallelism."
            )

    # ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        sections = {f.name: f.default_factory for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(sections))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; sections are {sorted(sections)}.")
        built = {}
        for name, values in d.items():
            if name == "model":
                built[name] = MemorizingConfig.from_dict(values or {})
            else:
                built[name] = sections[name](**checked_fields(sections[name], values or {}, name))
        return cls(**built)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> "RunConfig":
        return cls.from_dict(read_sections(path, overrides))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def read_sections(path: str | Path, overrides: list[str] = ()) -> dict:
    """A config file (a run's config.yaml, or one of configs/) as a dict of sections, `overrides`
    applied, not yet checked: `RunConfig.load` checks every section, export only the model's."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist (shipped configs are in configs/).")
    d = _parse_yaml(path.read_text(), f"{path}") or {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path} holds {type(d).__name__}, not a mapping of sections (model:, data:, ...).")
    for override in overrides:
        apply_override(d, override)
    return d


def apply_override(d: dict, override: str) -> None:
    """Set `section.field=value` in a config dict; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in override or "." not in override.split("=", 1)[0]:
        raise ConfigError(f"override {override!r} must look like section.field=value, e.g. optimizer.lr=3e-4")
    key, value = override.split("=", 1)
    section, name = key.split(".", 1)
    d.setdefault(section, {})
    if d[section] is None:
        d[section] = {}
    d[section][name] = _parse_yaml(value, f"--set {override}")


def _parse_yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML: {problem}{at}.") from None
