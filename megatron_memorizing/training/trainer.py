"""The training recipe of a memorizing GPT, on any layout from one CPU process to a GPU cluster.

    build the model on Megatron-Core's parallel state, the optimizer (DeepSpeed ZeRO or Megatron's)
    for every step:
        grow the memory when the curriculum says so; empty the XL caches the dropout draws
        read one segment per slot; slots that start a new document forget the old one
        forward and backward over the micro-batches (memory read-only)
        stop on a diverged loss, before the update, naming the last good checkpoint
        optimizer step, then commit this step's keys and values to the memory
        log; checkpoint; evaluate
    evaluate with memory and with memory disabled
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from megatron.core import parallel_state

from megatron_memorizing.data import DataError, DocumentStream, check_compatible, dataset_tokenizer_path
from megatron_memorizing.eval.perplexity import Perplexity, evaluate
from megatron_memorizing.memories import ModelMemories
from megatron_memorizing.model import build_model
from megatron_memorizing.parallel import destroy_distributed, initialize_distributed
from megatron_memorizing.run.config import RunConfig
from megatron_memorizing.run.folder import TRACKER, CheckpointError, resolve
from megatron_memorizing.run.weights import load_weights
from megatron_memorizing.segment_attention import state_device
from megatron_memorizing.step import forward_backward, sum_over_data_parallel
from megatron_memorizing.training.checkpoint import Checkpointer, TrainState, check_checkpoint_tokenizer
from megatron_memorizing.training.divergence import DivergedError, DivergenceGuard
from megatron_memorizing.training.freezing import freeze_below
from megatron_memorizing.training.logger import TrainingLogger
from megatron_memorizing.training.optimizer import build_optimizer
from megatron_memorizing.training.schedules import learning_rate, memory_size


@dataclass
class TrainingResult:
    steps: int
    train_loss: float
    validation: Optional[Perplexity]  # with memory
    validation_without_memory: Optional[Perplexity]
    log_dir: str


class Trainer:
    def __init__(self, config: RunConfig):
        self.config = config
        model = config.model
        initialize_distributed(
            tensor_model_parallel_size=model.tensor_model_parallel_size,
            pipeline_model_parallel_size=model.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=model.virtual_pipeline_model_parallel_size,
            seed=config.training.seed,
            timeout_minutes=config.training.distributed_timeout_minutes,
        )
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        # Everything that can be checked is checked before any compute is spent.
        tokenizer = self._check_data()
        self.checkpointer = Checkpointer(config.checkpoint) if config.checkpoint.dir else None
        resume_from = self._claim_checkpoints(tokenizer)

        self.model_chunks = build_model(model)
        self.memories = ModelMemories(self.model_chunks, model.micro_batch_size)
        if resume_from is None and config.checkpoint.init_from:
            # Before the optimizer exists: ZeRO copies the weights into its fp32 master partitions.
            load_weights(config.checkpoint.init_from, self.model_chunks)
        trained = freeze_below(self.model_chunks, config.training.train_from_layer)
        self.optimizer = build_optimizer(config, self.model_chunks)
        stream = DocumentStream(
            config.data.train, model.memory_slots, model.segment_length, self.dp_rank, self.dp_size,
            seed=config.data.seed
        )
        self.state = TrainState(self.model_chunks, self.optimizer, self.memories, stream, config)
        if resume_from is not None:  # model, optimizer, memory, data position, RNG: all of it
            self.checkpointer.load(resume_from, self.state)
        self.divergence = DivergenceGuard(model.vocab_size, config.training.divergence_factor)
        self.divergence.load_state_dict(self.state.extra.get("divergence", {}))
        self.logger = TrainingLogger(config.logging, config.training.steps, self.state.step)
        if config.training.train_from_layer > 1:
            self.logger.message(
                f"training layers {config.training.train_from_layer}-{model.num_layers} only: {trained[0]:,} of "
                f"{trained[1]:,} parameters of this rank (training.train_from_layer)"
            )
        if resume_from is not None:
            how = "" if self.checkpointer.has_tracker() else (
                f" (no {TRACKER} in {self.checkpointer.root}: the newest complete iteration)"
            )
            self.logger.message(f"resumed from {resume_from} at step {self.state.step}{how}")
            self._say_what_happens_to_the_memory(resume_from)

    def _check_data(self) -> Path:
        """Both splits are whole and were tokenized with one tokenizer, whose ids the model embeds;
        returns that tokenizer."""
        data, vocab_size = self.config.data, self.config.model.vocab_size
        tokenizer = dataset_tokenizer_path(data.train, check_compatible(data.train, vocab_size))
        if data.validation:
            check_compatible(data.validation, vocab_size, tokenizer_path=tokenizer)
        return tokenizer

    def _claim_checkpoints(self, tokenizer: Path) -> Optional[Path]:
        """Lock the checkpoint folder for this run; returns the checkpoint to resume from, if any.
        A checkpoint this run starts from (resumed or `init_from`) must share the data's tokenizer."""
        checkpoint = self.config.checkpoint
        existing = None
        if self.checkpointer:
            self.checkpointer.lock()
            existing = self.checkpointer.latest()
        if existing is not None and not checkpoint.resume:
            raise CheckpointError(
                f"checkpoint.dir {self.checkpointer.root} already holds checkpoints (newest: {existing.name}) and "
                f"checkpoint.resume=false: this run would write over them. Use a fresh checkpoint.dir, or "
                f"checkpoint.resume=true to continue that run."
            )
        resume_from = existing if checkpoint.resume else None
        start = resume_from or (checkpoint.init_from and resolve(checkpoint.init_from))
        if start:
            check_checkpoint_tokenizer(start, tokenizer)
        return resume_from

    def _say_what_happens_to_the_memory(self, checkpoint) -> None:
        """A resumed run whose memory size differs from the checkpoint's (a changed memory_size or
        curriculum) resizes the memory at its first step: say how, since curricula rely on it."""
        if not self.config.model.memory_layers:
            return
        step, saved = self.state.step, RunConfig.load(checkpoint / "config.yaml")
        before = memory_size(step, saved.training.memory_curriculum, saved.model.memory_size)
        after = memory_size(step, self.config.training.memory_curriculum, self.config.model.memory_size)
        if after > before:
            what = "it grows, keeping every pair it holds"
        elif after < before:
            what = f"it shrinks, keeping the newest {after} pairs of each slot and head and forgetting older ones"
        else:
            return
        self.logger.message(
            f"memory size: the checkpoint's memories hold up to {before} pairs per slot and head, this run uses "
            f"{after} from step {step}: {what}"
        )

    # ---------------------------------------------------------------------------------------------
    def train_step(self, batch) -> tuple[float, float]:
        """One optimizer step; returns (mean loss, tokens) over all data-parallel ranks."""
        state, training = self.state, self.config.training
        largest = int(batch.tokens.max())
        if largest >= self.config.model.vocab_size:
            raise DataError(
                f"{self.config.data.train}: token id {largest} in the batch of step {state.step + 1} is outside the "
                f"model's vocabulary of {self.config.model.vocab_size}: the dataset is corrupt; check it with "
                f"`megatron-memorizing-data check {self.config.data.train}` and rebuild it"
            )
        wanted = memory_size(state.step, training.memory_curriculum, self.config.model.memory_size)
        self.memories.resize(wanted)

        self.optimizer.zero_grad()
        step_loss = forward_backward(self.optimizer.model_chunks, self.memories, batch)
        loss_sum, tokens = sum_over_data_parallel(torch.tensor([step_loss.loss_sum, step_loss.tokens])).tolist()
        loss = loss_sum / max(tokens, 1.0)
        diverged = self.divergence.problem(loss)
        if diverged:
            last = None
            if self.checkpointer:  # the checkpoint of the weights that gave this loss is not a good one
                self.checkpointer.discard()
                last = self.checkpointer.latest()
            raise DivergedError(
                f"step {state.step + 1}: {diverged}; stopping before the update. The last good checkpoint is "
                f"{last or 'none (no checkpoint was written yet)'}. Lower optimizer.lr, raise "
                f"optimizer.warmup_steps, or check the data around this step."
            )
        state.extra["divergence"] = self.divergence.state_dict()
        if self.checkpointer:  # its weights gave a sane loss: a good checkpoint
            self.checkpointer.publish()
        lr = learning_rate(state.step, self.config.optimizer, training.steps)
        result = self.optimizer.step(lr)
        self.memories.commit()
        state.step += 1
        state.extra["tokens"] = state.extra.get("tokens", 0) + tokens
        self.logger.step(state.step, loss, tokens, lr, result.grad_norm, self.memories.stats())
        return loss, tokens

    def validate(self, with_memory: bool = True) -> Optional[Perplexity]:
        data, model = self.config.data, self.config.model
        if not data.validation:
            return None
        stream = DocumentStream(
            data.validation, model.memory_slots, model.segment_length, self.dp_rank, self.dp_size, loop=False
        )
        saved = self.memories.snapshot()  # evaluation streams other documents through the slots
        try:
            if with_memory:
                return evaluate(
                    self.optimizer.model_chunks, self.memories, stream, self.config.training.eval_segments or None
                )
            with self.memories.disabled():
                return evaluate(
                    self.optimizer.model_chunks, self.memories, stream, self.config.training.eval_segments or None
                )
        finally:
            self.memories.load_state_dict(saved)

    def fit(self) -> TrainingResult:
        training, state = self.config.training, self.state
        loss = float("nan")
        started = time.monotonic()
        try:
            while state.step < training.steps:
                loss, _ = self.train_step(next(state.stream))
                out_of_time = self._out_of_time(started)
                if self.checkpointer and (
                    out_of_time or state.step % self.config.checkpoint.interval == 0 or state.step == training.steps
                ):
                    # Published by the next step, once its weights give a finite loss.
                    self.checkpointer.write(state)
                if out_of_time:
                    break
                if training.eval_interval and state.step % training.eval_interval == 0 and state.step < training.steps:
                    self._report(self.validate(), "validation", state.step)
            if state.step < training.steps:
                if self.checkpointer:  # its weights were checked finite when written
                    self.checkpointer.publish()
                self.logger.message(
                    f"stopped at step {state.step} of {training.steps} after training.exit_duration_minutes="
                    f"{training.exit_duration_minutes:g}: the same command continues from step {state.step}"
                )
                return TrainingResult(state.step, loss, None, None, str(self.logger.directory))
            with_memory = self.validate(with_memory=True)
            self._publish_final(with_memory)
            # Decided from the config, not this rank's layers: every rank must take part in evaluation.
            without_memory = self.validate(with_memory=False) if self.config.model.memory_layers else None
            self._report(with_memory, "validation", state.step)
            self._report(without_memory, "validation_without_memory", state.step)
            return TrainingResult(state.step, loss, with_memory, without_memory, str(self.logger.directory))
        finally:
            self.logger.close()

    def _publish_final(self, validation: Optional[Perplexity]) -> None:
        """Publish the run's last checkpoint, whose weights no training step has judged: they were
        checked finite when written, and with validation data their validation loss must be sane too."""
        if not self.checkpointer:
            return
        diverged = validation is not None and self.divergence.problem(validation.loss)
        if diverged:
            self.checkpointer.discard()
            raise DivergedError(
                f"the final weights (step {self.state.step}) diverged: on the validation data {diverged}. The last "
                f"good checkpoint is {self.checkpointer.latest() or 'none (no checkpoint was written yet)'}. Lower "
                f"optimizer.lr, raise optimizer.warmup_steps, or check the data."
            )
        self.checkpointer.publish()

    def _out_of_time(self, started: float) -> bool:
        """Whether training.exit_duration_minutes have passed, on any rank: all stop at the same step."""
        minutes = self.config.training.exit_duration_minutes
        if not minutes:
            return False
        late = torch.tensor([time.monotonic() - started > 60 * minutes], dtype=torch.int32, device=state_device())
        torch.distributed.all_reduce(late, op=torch.distributed.ReduceOp.MAX)
        return bool(late.item())

    def _report(self, result: Optional[Perplexity], name: str, step: int) -> None:
        if result is None:
            return
        self.logger.scalars({f"{name}/loss": result.loss, f"{name}/perplexity": result.perplexity}, step)
        self.logger.message(f"{name}: perplexity {result.perplexity:.3f} over {result.tokens:,.0f} tokens")

    def close(self) -> None:
        self.optimizer.close()
        destroy_distributed()
