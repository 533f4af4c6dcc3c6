"""The optimizer backends of the trainer: DeepSpeed ZeRO, or Megatron-Core's optimizer with its DDP.

Both run AdamW (no weight decay on biases and 1-d parameters) behind one interface:

    backend = build_optimizer(run_config, model_chunks)
    backend.zero_grad()
    forward_backward(backend.model_chunks, memories, batch)   # Megatron's schedule, plain autograd
    result = backend.step(lr)                                  # reduce, clip, update
    memories.commit()

Load module weights into the chunks *before* `build_optimizer`: ZeRO copies them into its fp32
master partitions when it is built, and a later in-place load would be undone by the next step.

DeepSpeed (`optimizer.backend="deepspeed"`, ZeRO-1/2):
  Megatron's schedule runs forward and backward on the bare module, so none of DeepSpeed's
  per-backward bookkeeping (loss scaling by the accumulation steps, the post-backward reduction)
  runs. Megatron already divides the loss by the micro-batch count, so nothing must be rescaled.
  The whole step is one `engine.coalesce_grad_reduction()` block, opened by `zero_grad` and closed
  by `step`: inside it ZeRO's gradient hooks leave every micro-batch's gradient to accumulate in
  `param.grad`; closing it reduces (ZeRO-1: all-reduce, ZeRO-2: reduce-scatter) once over the
  data-parallel group into ZeRO's partitions. Then `engine.step()` clips and updates. The engine
  is pinned at a gradient-accumulation boundary, since every `step` is one.
Megatron (`optimizer.backend="megatron"`):
  each chunk is wrapped in Megatron-Core's DistributedDataParallel, and the chunks' config gets
  `no_sync_func`/`finalize_model_grads_func` as in Megatron-LM, so the schedule itself reduces
  gradients over data parallelism (and tied embeddings over pipeline stages).

Arithmetic differences between the two (same hyperparameters): both use torch's AdamW on CPU (eps
outside the square root, after bias correction); ZeRO updates flat fp32 partitions, Megatron each
parameter; ZeRO reduces gradients in the parameter dtype, Megatron's DDP in fp32 under bf16. On
GPU Megatron uses Transformer Engine's or Apex's fused Adam (same formula, other rounding).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import ParamKey, get_megatron_optimizer, get_standard_config_overrides

import patches
from megatron_memorizing.knn_attention import MEMORY_PARAMETERS
from megatron_memorizing.run.config import RunConfig
from megatron_memorizing.training import deepspeed_mpu

# DeepSpeed's checkpoint tag (a subdirectory): `save`/`load` take one directory per checkpoint.
DEEPSPEED_TAG = "deepspeed"


@dataclass
class StepResult:
    grad_norm: float  # global gradient norm before clipping (same value on every rank)
    skipped: bool  # True if the update was skipped (non-finite gradients)


class OptimizerBackend(Protocol):
    model_chunks: list[torch.nn.Module]  # pass these to forward_backward, one per virtual stage

    def zero_grad(self) -> None: ...

    def step(self, lr: float) -> StepResult: ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...

    def close(self) -> None: ...  # collective: finish what a step left open, before the process group ends


def build_optimizer(run_config: RunConfig, model_chunks: list[GPTModel]) -> OptimizerBackend:
    """The backend `run_config.optimizer.backend` names, over this rank's model chunks.

    RunConfig.validate() has already refused the combinations these backends cannot run.
    """
    if run_config.optimizer.backend == "deepspeed":
        return DeepSpeedBackend(run_config, model_chunks)
    return MegatronBackend(run_config, model_chunks)


def _adamw_param_groups(module: torch.nn.Module, weight_decay: float, memory_scalars_lr_mult: float) -> list[dict]:
    # Megatron-LM's rule, which get_megatron_optimizer applies itself: no decay on 1-d or bias.
    # The memory's scalars get a group of their own only when their learning rate differs, so
    # that runs without a multiplier keep the optimizer-state layout of their checkpoints.
    decay, no_decay, memory_scalars = [], [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if memory_scalars_lr_mult != 1.0 and name.endswith(MEMORY_PARAMETERS):
            memory_scalars.append(param)
        else:
            (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if memory_scalars:
        groups.append({"params": memory_scalars, "weight_decay": 0.0, "lr_mult": memory_scalars_lr_mult})
    return groups


def _memory_scalars_overrides(config: MegatronOptimizerConfig, lr_mult: float) -> dict:
    """get_megatron_optimizer's standard parameter-group overrides, plus `lr_mult` on the memory's scalars."""
    overrides = get_standard_config_overrides(config)
    if lr_mult != 1.0:
        overrides[ParamKey(name=tuple(f"*.{name}" for name in MEMORY_PARAMETERS))] = {"lr_mult": lr_mult}
    return overrides


# ---------------------------------------------------------------------------------------------------
class DeepSpeedBackend:
    def __init__(self, run_config: RunConfig, model_chunks: list[GPTModel]):
        import deepspeed

        (module,) = model_chunks  # RunConfig refuses virtual stages with DeepSpeed
        opt = run_config.optimizer
        if not torch.cuda.is_available():
            patches.skip_deepspeed_shm_comm_build()
        _mark_tied_embedding_copy(module)
        self.engine, *_ = deepspeed.initialize(
            model=module,
            optimizer=torch.optim.AdamW(
                _adamw_param_groups(module, opt.weight_decay, opt.memory_scalars_lr_mult),
                lr=opt.lr,
                betas=(opt.adam_beta1, opt.adam_beta2),
                eps=opt.adam_eps,
            ),
            config=deepspeed_config(run_config),
            mpu=deepspeed_mpu,
        )
        self.engine.set_gradient_accumulation_boundary(True)
        self.model_chunks = [module]
        self._open_reduction: contextlib.ExitStack | None = None

    def zero_grad(self) -> None:
        if self._open_reduction is not None:  # a step that never reached step(): drop its gradients
            self._open_reduction.close()
        self.engine.optimizer.zero_grad()
        self._open_reduction = contextlib.ExitStack()
        self._open_reduction.enter_context(self.engine.coalesce_grad_reduction())

    def step(self, lr: float) -> StepResult:
        if self._open_reduction is None:
            raise RuntimeError("DeepSpeedBackend.step() without zero_grad() and a backward pass before it.")
        _allreduce_tied_embedding_grad(self.model_chunks[0])
        self._open_reduction.close()  # the data-parallel reduction into ZeRO's partitions
        self._open_reduction = None
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        return StepResult(grad_norm=float(grad_norm), skipped=not self.engine.was_step_applied())

    def close(self) -> None:
        # A run stopped between zero_grad() and step() (a non-finite loss) leaves the reduction
        # block open; closing it later, after the process group is gone, would fail.
        if self._open_reduction is not None:
            self._open_reduction.close()
            self._open_reduction = None

    def save(self, directory: Path) -> None:
        # Also writes the module weights (DeepSpeed always does); `load` only checks them.
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory),
            tag=DEEPSPEED_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            custom_load_fn=_check_module_unchanged,
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed optimizer checkpoint under {directory}/{DEEPSPEED_TAG}")


def deepspeed_config(run_config: RunConfig) -> dict:
    opt, model = run_config.optimizer, run_config.model
    return {
        # DeepSpeed derives the global batch from these and the data-parallel size; it never sees
        # the micro-batches themselves (Megatron's schedule runs them).
        "train_micro_batch_size_per_gpu": model.micro_batch_size,
        "gradient_accumulation_steps": model.num_micro_batches,
        "gradient_clipping": opt.clip_grad,
        "zero_optimization": {"stage": opt.zero_stage},
        "bf16": {"enabled": model.bf16},
        "steps_per_print": 2**31 - 1,  # the trainer logs
    }


def _mark_tied_embedding_copy(module: GPTModel) -> None:
    # With tied embeddings over several pipeline stages, the last stage holds a copy of the word
    # embedding (Megatron marks it `shared`). DeepSpeed's gradient norm skips parameters marked
    # `ds_pipe_replicated`, so that the copy is counted once, as Megatron counts it.
    for param in module.parameters():
        if getattr(param, "shared", False):
            param.ds_pipe_replicated = True


def _allreduce_tied_embedding_grad(module: GPTModel) -> None:
    # What Megatron's finalize_model_grads does for DDP-wrapped chunks: the first and last stage
    # each hold the tied word embedding; both must apply the sum of their gradients.
    if not (module.share_embeddings_and_output_weights and parallel_state.is_rank_in_embedding_group()):
        return
    group = parallel_state.get_embedding_group()
    if dist.get_world_size(group) == 1:
        return
    grad = module.shared_embedding_or_output_weight().grad
    if grad is not None:
        dist.all_reduce(grad, group=group)


def _check_module_unchanged(src: dict, dst: torch.nn.Module) -> None:
    # The trainer restores module weights from its own checkpoint; the copy in DeepSpeed's must be
    # the same, or its fp32 master weights (restored with the optimizer state) would replace them.
    current = dst.state_dict()
    differing = [
        name
        for name, saved in src.items()
        if isinstance(saved, torch.Tensor) and (name not in current or not torch.equal(current[name], saved))
    ]
    if differing:
        raise RuntimeError(
            f"the DeepSpeed optimizer checkpoint was saved with other module weights than the ones "
            f"loaded ({len(differing)} tensors differ, e.g. {differing[0]}): load weights and optimizer "
            f"state from the same checkpoint, or start the optimizer fresh."
        )


# ---------------------------------------------------------------------------------------------------
class MegatronBackend:
    def __init__(self, run_config: RunConfig, model_chunks: list[GPTModel]):
        opt, model = run_config.optimizer, run_config.model
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=model.bf16,
            overlap_grad_reduce=False,
            use_distributed_optimizer=False,  # asserts CUDA tensors; its state shards would be ZeRO-1
        )
        self.model_chunks = [
            # Only the first chunk buckets: Megatron-LM's choice, so later chunks reduce in one go.
            DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(model_chunks)
        ]
        no_sync = [chunk.no_sync for chunk in self.model_chunks]
        for chunk in model_chunks:
            chunk.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
            chunk.config.finalize_model_grads_func = finalize_model_grads
        megatron_config = MegatronOptimizerConfig(
            optimizer="adam",
            lr=opt.lr,
            min_lr=opt.min_lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2,
            adam_eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            bf16=model.bf16,
            params_dtype=torch.bfloat16 if model.bf16 else torch.float32,
            use_distributed_optimizer=False,
        )
        self.optimizer = get_megatron_optimizer(
            megatron_config,
            self.model_chunks,
            config_overrides=_memory_scalars_overrides(megatron_config, opt.memory_scalars_lr_mult),
        )
        # Megatron-LM's LR scheduler applies `wd_mult` (0 for biases and 1-d parameters) at every
        # step; without it every group would keep the full weight decay it was built with.
        for group in self.optimizer.param_groups:
            group["weight_decay"] = opt.weight_decay * group.get("wd_mult", 1.0)

    def close(self) -> None:
        pass  # nothing is left open between steps

    def zero_grad(self) -> None:
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self, lr: float) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        # optimizer.step() computes the norm only when clipping, and would apply a non-finite
        # gradient (only fp16 checks for overflow): check first, then let it clip and update.
        found_inf = self.optimizer.prepare_grads()
        grad_norm = self.optimizer.get_grad_norm()
        if found_inf or not math.isfinite(grad_norm):
            return StepResult(grad_norm=float(grad_norm), skipped=True)
        updated, _, _ = self.optimizer.step()
        return StepResult(grad_norm=float(grad_norm), skipped=not updated)

    def _sharded_state_dict(self, is_loading: bool) -> dict:
        model_state = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(self.model_chunks)}
        return self.optimizer.sharded_state_dict(model_state, is_loading=is_loading)

    def save(self, directory: Path) -> None:
        # dist_checkpointing: the state is keyed by the parameters' global shards, so it loads
        # into another tensor/pipeline layout, like the module weights.
        Path(directory).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(self._sharded_state_dict(is_loading=False), str(directory))

    def load(self, directory: Path) -> None:
        state = dist_checkpointing.load(self._sharded_state_dict(is_loading=True), str(directory))
        self.optimizer.load_state_dict(state)
