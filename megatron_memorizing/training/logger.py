"""Tensorboard scalars, a progress bar, and a console line every few steps (global rank 0 writes).

Memory statistics live on whichever pipeline stages hold memory layers, so they are gathered to
rank 0 at log steps only.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from megatron_memorizing.eval.perplexity import perplexity_of
from megatron_memorizing.run.config import LoggingConfig


class TrainingLogger:
    def __init__(self, config: LoggingConfig, total_steps: int, start_step: int):
        self.config = config
        self.is_writer = dist.get_rank() == 0
        self.writer = SummaryWriter(config.dir) if self.is_writer else None
        self.progress = tqdm(
            # disable=None: a bar on a terminal, none in a log file (the console lines remain).
            total=total_steps, initial=start_step, desc="train", unit="step", disable=None if self.is_writer else True,
            dynamic_ncols=True,
        )
        self._last_time, self._tokens_since = time.perf_counter(), 0.0

    def step(self, step: int, loss: float, tokens: float, lr: float, grad_norm: float, memory_stats: dict) -> None:
        """Record one finished step; `memory_stats` is this rank's (gathered to rank 0 when logging)."""
        self._tokens_since += tokens
        self.progress.update(1)
        self.progress.set_postfix_str(f"loss {loss:.3f} ppl {perplexity_of(loss):.1f} lr {lr:.2e}")
        if step % self.config.interval and step != self.progress.total:
            return
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, memory_stats)
        if not self.is_writer:
            return
        now = time.perf_counter()
        tokens_per_s = self._tokens_since / (now - self._last_time)
        self._last_time, self._tokens_since = now, 0.0
        scalars = {
            "train/loss": loss,
            "train/perplexity": perplexity_of(loss),
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": tokens_per_s,
        }
        for rank_stats in gathered:  # TP ranks of a stage report the same layers: any copy will do
            scalars.update(rank_stats)
        if torch.cuda.is_available():  # this rank's peak, as Megatron-LM logs it
            scalars["memory/gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        gates = " ".join(f"{k.split('/')[1]}:{v:.2f}" for k, v in sorted(scalars.items()) if k.endswith("/gate"))
        weights = " ".join(
            f"{k.split('/')[1]}:{v:.2f}" for k, v in sorted(scalars.items()) if k.endswith("/memory_weight")
        )
        self.progress.write(
            f"step {step:>6} | loss {loss:.4f} | ppl {perplexity_of(loss):9.2f} | lr {lr:.2e} | "
            f"grad {grad_norm:.3f} | {tokens_per_s:,.0f} tok/s"
            + (f" | {scalars['memory/gpu_max_allocated_gib']:.2f} GiB peak" if torch.cuda.is_available() else "")
            + (f" | gate {gates}" if gates else "")
            + (f" | memory weight {weights}" if weights else "")
        )

    def scalars(self, values: dict, step: int) -> None:
        if self.is_writer:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def message(self, text: str) -> None:
        if self.is_writer:
            self.progress.write(text)

    def close(self) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()

    @property
    def directory(self) -> Path:
        return Path(self.config.dir).resolve()
