"""A training run's checkpoints: saving them atomically and resuming exactly.

The folder and its iterations are described in run/folder.py (Megatron-LM's layout); a training
checkpoint holds, besides checkpoint.json, config.yaml and model/ (run/weights.py):

    iter_0000100/
        optimizer/               the optimizer backend's own files
        rank_state/rank_00000.pt per global rank: step, extra, RNG states, memory contents, stream position,
                                 as tensors and plain values only (read with torch.load(weights_only=True))
        tokenizer.model          the dataset's tokenizer, when its manifest names one (HF export needs it);
                                 tokenizer.json (+ tokenizer_config.json) for a Hugging Face tokenizer
        hf_tokenizer/, hf_config.json   what an imported model came with (hf/importer.py), carried along

Memory contents, optimizer state and stream positions belong to one rank each, so a checkpoint
resumes only on the layout that saved it; `run.weights.load_weights` takes the model weights alone
into any layout.

A save is atomic: every rank writes into `iter_0000100.tmp/`, then rank 0 renames it and only
then rewrites the tracker file. A run killed at any point leaves the previous checkpoint as the
latest one; what it leaves (marked `iter_*.tmp` folders) is removed by the next save; any other
`*.tmp` in the folder is left alone. The trainer publishes a written checkpoint (`write`, then
`publish`) only once the loss computed from its weights came out sane (training/divergence.py), so
the checkpoint a diverged run names as good never holds the diverged weights.

Nothing this run did not write is deleted: pruning (`keep_last`) removes only checkpoints this
process saved and those up to the one it resumed from.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pickle
import random
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from numpy.core.multiarray import _reconstruct

from megatron_memorizing import owned
from megatron_memorizing.data import (
    DataError,
    DocumentStream,
    IncompatibleError,
    dataset_tokenizer_path,
    load_tokenizer,
    read_manifest,
)
from megatron_memorizing.data.manifest import IMPORTED_CONFIG_FILE, IMPORTED_TOKENIZER_DIR, checkpoint_tokenizers
from megatron_memorizing.data.tokenizer import file_sha256
from megatron_memorizing.memories import ModelMemories
from megatron_memorizing.parallel import current_layout, describe_layout, raise_on_every_rank
from megatron_memorizing.run import folder
from megatron_memorizing.run.config import CheckpointConfig, RunConfig
from megatron_memorizing.run.folder import (
    FORMAT,
    TMP,
    CheckpointError,
    delete,
    iteration_dir,
    iteration_steps,
    read_info,
    resolve,
    step_of,
)
from megatron_memorizing.run.weights import WEIGHT_SHAPE_FIELDS, differences, load_model, model_state
from patches.checkpoint_writer import tie_checkpoint_writer_to_this_process

if TYPE_CHECKING:
    from megatron_memorizing.training.optimizer import OptimizerBackend

LOCK = ".lock"  # held by the run writing into the folder
_DISK_FULL = 64 * 2**20  # bytes free below which a failed save is put down to a full disk
# What unpickles a NumPy array (as rank files held the NumPy RNG state until it was saved as a list);
# Megatron-Core allows the same classes to torch.load(weights_only=True) in every process it runs in.
_NUMPY_ARRAY = [_reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
# Carried from an imported model's checkpoint into every checkpoint trained from it.
IMPORTED_FILES = (IMPORTED_TOKENIZER_DIR, IMPORTED_CONFIG_FILE)
# Model fields that shape the parameters, the memory contents or the per-slot state; a resumed
# run must agree on all of them.
_RESUME_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "kv_channels", "num_query_groups",
    "ffn_hidden_size", "vocab_size", "position_embedding_type", "normalization", "gated_linear_unit",
    "add_bias_linear", "add_qkv_bias", "share_embeddings_and_output_weights", "memory_layers", "memory_dtype",
    "xl_cache", "segment_length", "micro_batch_size", "num_micro_batches",
)


@dataclass
class TrainState:
    """Everything a resumed run needs."""

    model_chunks: list  # raw GPTModel chunks (unwrapped)
    optimizer: OptimizerBackend
    memories: ModelMemories
    stream: DocumentStream
    run_config: RunConfig
    step: int = 0  # completed optimizer steps
    extra: dict = field(default_factory=dict)  # JSON-serialisable, e.g. consumed tokens


class Checkpointer:
    def __init__(self, config: CheckpointConfig):
        if not config.dir:
            raise CheckpointError("checkpoint.dir is not set: set it to the directory checkpoints go to.")
        self.config = config
        self.root = Path(config.dir)
        self._written: set[int] = set()  # steps this process saved
        self._resumed_step: Optional[int] = None  # the step of the checkpoint this run continues
        self._pending: Optional[tuple[Path, Path, int]] = None  # (tmp, final, step) written, not published

    # --- owning the folder ------------------------------------------------------------------------
    def lock(self) -> None:
        """Claim the checkpoint folder for this run (collective), before step 1: it must be writable,
        and no other live run may be writing into it. The claim is an advisory lock on `.lock`,
        which the operating system releases when this run's rank 0 exits, however it exits."""
        problem = None
        if dist.get_rank() == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                self._lock_file = open(self.root / LOCK, "a+")
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock_file.seek(0)
                self._lock_file.truncate()
                self._lock_file.write(f"{socket.gethostname()} pid {os.getpid()}\n")
                self._lock_file.flush()
            except BlockingIOError:
                holder = (self.root / LOCK).read_text().strip() or "another process"
                problem = (
                    f"checkpoint.dir {self.root} is in use by another run ({holder}): two runs writing one folder "
                    f"would overwrite each other's checkpoints. Wait for it to finish, or use another checkpoint.dir."
                )
            except OSError as error:
                problem = (
                    f"checkpoint.dir {self.root} is not writable ({error.strerror or error}): fix its permissions "
                    f"or choose another checkpoint.dir."
                )
        raise_on_every_rank(problem, CheckpointError)

    # --- finding ---------------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint (run/folder.py `latest`); None if there is none."""
        return folder.latest(self.root)

    def has_tracker(self) -> bool:
        return folder.has_tracker(self.root)

    # --- saving ----------------------------------------------------------------------------------
    def save(self, state: TrainState) -> Path:
        """Write and publish a checkpoint of `state` (collective). Call it after `memories.commit()`:
        staged, uncommitted memory writes are not part of a checkpoint."""
        if not self.write(state):
            raise CheckpointError(f"step {state.step}: the model has non-finite weights; no checkpoint was written.")
        return self.publish()

    def write(self, state: TrainState) -> bool:
        """Write a checkpoint of `state` into `iter_N.tmp/` (collective), to be made the latest by
        `publish()`. Weights that are not all finite are not written: returns False."""
        if not _all_finite(state.model_chunks):
            self._pending = None
            return False
        latest = self.latest()
        if latest is not None and step_of(latest) >= state.step:
            raise CheckpointError(
                f"{self.root} already holds a checkpoint of step {step_of(latest)} ({latest}), and this run, "
                f"now at step {state.step}, did not resume from it: saving would mix two runs. Resume from it "
                f"(checkpoint.resume=true) or use a fresh checkpoint.dir."
            )
        final = iteration_dir(self.root, state.step)
        tmp = final.with_name(final.name + TMP)
        with self._disk_full_named(tmp, state.step):
            self._stage(tmp)
            if dist.get_rank() == 0:
                for part in ("model", "optimizer", "rank_state"):
                    (tmp / part).mkdir(parents=True)
                info = {"format": FORMAT, "step": state.step, "layout": current_layout(),
                        "world_size": dist.get_world_size()}
                (tmp / "checkpoint.json").write_text(json.dumps(info, indent=2) + "\n")
                state.run_config.save(tmp / "config.yaml")
                _copy_tokenizer(state.run_config, tmp)
            dist.barrier()
            tie_checkpoint_writer_to_this_process()  # its helper process must not outlive this rank
            dist_checkpointing.save(model_state(state.model_chunks), str(tmp / "model"))
            state.optimizer.save(tmp / "optimizer")
            torch.save(_rank_state(state), tmp / "rank_state" / _rank_file())
        dist.barrier()
        self._pending = (tmp, final, state.step)
        return True

    @contextlib.contextmanager
    def _disk_full_named(self, tmp: Path, step: int):
        """A save that runs out of disk space fails deep inside torch's writers ("[enforce fail at
        inline_container.cc]", "iostream error"): name the cause instead, after removing the
        partial save (only its own `*.tmp` directory, marked PARTIAL by `folder.stage`; every rank
        that fails tries, and what one cannot remove stays marked for the next save to remove)."""
        try:
            yield
        except CheckpointError:  # refused before anything was written: no partial save to remove
            raise
        except (OSError, RuntimeError) as error:
            if not (getattr(error, "errno", None) == errno.ENOSPC or shutil.disk_usage(self.root).free < _DISK_FULL):
                raise
            owned.discard(tmp)
            free = shutil.disk_usage(self.root).free / 2**20
            raise CheckpointError(
                f"no space left on the device of checkpoint.dir {self.root} while saving step {step} "
                f"({free:.1f} MiB free after removing the partial save): free space or move checkpoint.dir; "
                f"the latest checkpoint, {self.latest() or 'none yet'}, is intact."
            ) from None

    def publish(self) -> Optional[Path]:
        """Make the checkpoint `write` wrote the latest one, and prune (collective); returns it, or
        None if nothing was waiting."""
        if self._pending is None:
            return None
        tmp, final, step = self._pending
        self._pending = None
        self._written.add(step)
        if dist.get_rank() == 0:
            folder.publish(tmp, final, step)
            self._prune(step)
        dist.barrier()
        return final

    def discard(self) -> None:
        """Forget a written, unpublished checkpoint; its `*.tmp` directory goes with the next save."""
        self._pending = None

    def _prune(self, newest: int) -> None:
        """Keep the `keep_last` newest checkpoints of this run up to `newest`: the ones this process
        wrote and those up to the one it resumed from. Any other iteration is left alone."""
        ours = [
            step for step in iteration_steps(self.root)
            if step <= newest
            and (step in self._written or (self._resumed_step is not None and step <= self._resumed_step))
        ]
        for step in ours[: -self.config.keep_last]:
            delete(iteration_dir(self.root, step))

    def _stage(self, tmp: Path) -> None:
        """Create `tmp`, marked as a save in progress, after removing what interrupted saves and
        deletions left (collective: rank 0 decides, every rank raises). A `tmp` that is not such a
        leftover is refused untouched."""
        raise_on_every_rank(folder.stage(self.root, tmp) if dist.get_rank() == 0 else None, CheckpointError)

    # --- loading ---------------------------------------------------------------------------------
    def load(self, path: str | Path, state: TrainState) -> None:
        """Restore `state` from checkpoint `path` (collective): weights, optimizer, memories, data
        stream, RNG states, step and extra. Needs the layout and the model that saved it."""
        path = resolve(path)
        info = read_info(path)
        if info.get("weights_only"):
            raise CheckpointError(
                f"{path} holds model weights only (an imported model), nothing to resume: start a run from it "
                f"with checkpoint.init_from={path.parent} and a checkpoint.dir of its own."
            )
        now = current_layout()
        if info["layout"] != now:
            raise CheckpointError(
                f"{path} was saved with layout {describe_layout(info['layout'])}, "
                f"but this run is {describe_layout(now)}. "
                f"Optimizer state and memory contents belong to one rank each and resume only on the layout "
                f"that saved them. To start from its weights on this layout, set checkpoint.init_from={path} "
                f"and a fresh checkpoint.dir."
            )
        _check_same_model(path, state.run_config)
        if len(list((path / "rank_state").glob("rank_*.pt"))) != info["world_size"]:
            raise CheckpointError(
                f"{path} is incomplete: rank_state/ lacks the files of some of its {info['world_size']} ranks."
            )
        rank_state = _read_rank_state(path)

        state.stream.load_state_dict(rank_state["stream"])
        try:
            state.memories.load_state_dict(rank_state["memories"])
        except ValueError as error:
            raise CheckpointError(f"{path}: {error}") from None
        load_model(path / "model", state.model_chunks, allow_memory_mismatch=False)
        state.optimizer.load(path / "optimizer")
        _set_rng_state(rank_state["rng"])
        state.step, state.extra = rank_state["step"], rank_state["extra"]
        self._resumed_step = state.step


def _all_finite(model_chunks) -> bool:
    """Whether every weight on every rank is finite (collective)."""
    parameters = [p for chunk in model_chunks for p in chunk.parameters()]
    local = all(bool(torch.isfinite(p).all()) for p in parameters)
    # On the parameters' device: NCCL reduces CUDA tensors only.
    flag = torch.tensor([1.0 if local else 0.0], device=parameters[0].device if parameters else None)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def check_checkpoint_tokenizer(path: Path, tokenizer: Path) -> None:
    """Raise IncompatibleError unless the checkpoint at `path` was trained with `tokenizer` (when
    the checkpoint carries its tokenizer; older ones may not)."""
    own = checkpoint_tokenizers(path)
    if own and file_sha256(tokenizer) not in {file_sha256(f) for f in own}:
        raise IncompatibleError(
            f"{path} was trained with the tokenizer {own[0]}, but this run's data was tokenized with {tokenizer} "
            f"(sha256 differs): re-tokenize the data with {own[0]}, or start from a checkpoint of this tokenizer."
        )


# --- the parts of a checkpoint ---------------------------------------------------------------------
def _rank_file() -> str:
    return f"rank_{dist.get_rank():05d}.pt"


def _rank_state(state: TrainState) -> dict:
    return {
        "step": state.step,
        "extra": state.extra,
        "rng": _rng_state(),
        "memories": state.memories.state_dict(),
        "stream": state.stream.state_dict(),
    }


def _read_rank_state(path: Path) -> dict:
    """This rank's state file in checkpoint `path`, read with torch.load(weights_only=True): tensors
    and plain values, and NumPy arrays for the RNG state of files saved before it was a list. A file
    holding anything else (code to run, say) was not written by a save: it is refused, not loaded."""
    rank_file = path / "rank_state" / _rank_file()
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY):
            return torch.load(rank_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{rank_file} holds objects other than tensors, plain values and NumPy arrays, which no save writes: "
            f"it was altered after the save, and loading it could run code. Resume from a checkpoint you trust."
        ) from None


def _rng_state() -> dict:
    """Every generator's state in tensors, tuples and numbers (NumPy's key array as a list), which
    torch.load(weights_only=True) reads back."""
    kind, keys, *rest = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), *rest),
        "torch": torch.get_rng_state(),
        "model_parallel": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # the keys as a list, or (saved before) as an array
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["model_parallel"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _copy_tokenizer(run_config: RunConfig, target: Path) -> None:
    """The dataset's tokenizer (tokenizer.model, or tokenizer.json and its config); and what an
    imported model came with (its Hugging Face tokenizer and config.json), carried from the
    checkpoint the run started from, for the export."""
    prefix = run_config.data.train
    try:
        manifest = read_manifest(prefix)
    except DataError:  # a dataset without a manifest names no tokenizer
        manifest = None
    if manifest is not None and dataset_tokenizer_path(prefix, manifest).is_file():
        for name, source in load_tokenizer(dataset_tokenizer_path(prefix, manifest)).files().items():
            shutil.copy2(source, target / name)
    if run_config.checkpoint.init_from:
        origin = resolve(run_config.checkpoint.init_from)
        for name in IMPORTED_FILES:
            if (origin / name).is_dir():
                shutil.copytree(origin / name, target / name)
            elif (origin / name).is_file():
                shutil.copy2(origin / name, target / name)


def _own_memory_scalars_group(run_config: RunConfig) -> bool:
    """Whether the optimizer keeps the memory's scalars in a parameter group of their own."""
    return run_config.optimizer.memory_scalars_lr_mult != 1.0 and bool(run_config.model.memory_layers)


def _check_same_model(path: Path, run_config: RunConfig) -> None:
    saved_config = RunConfig.load(path / "config.yaml")
    if _own_memory_scalars_group(saved_config) != _own_memory_scalars_group(run_config):
        raise CheckpointError(
            f"{path} was saved with optimizer.memory_scalars_lr_mult={saved_config.optimizer.memory_scalars_lr_mult}, "
            f"now {run_config.optimizer.memory_scalars_lr_mult}: the memory's scalars have an optimizer parameter "
            f"group of their own only when it is not 1, so the saved optimizer state does not fit. Resume with "
            f"{saved_config.optimizer.memory_scalars_lr_mult}, or start from its weights with "
            f"checkpoint.init_from={path} and a fresh checkpoint.dir."
        )
    saved = saved_config.model.to_dict()
    mine = run_config.model.to_dict()
    changed = [name for name in _RESUME_FIELDS if saved[name] != mine[name]]
    if changed:
        differ = differences(saved_config.model, run_config.model, changed)
        if any(name in WEIGHT_SHAPE_FIELDS for name in changed):
            fix = ("its weights do not fit this model either, so train it from scratch in a fresh "
                   "checkpoint.dir, or set the model back to the saved values")
        else:
            fix = f"to start from its weights instead, set checkpoint.init_from={path} and a fresh checkpoint.dir"
        raise CheckpointError(
            f"{path} was saved by another model ({differ}). Resuming needs the model that saved it; {fix}."
        )
