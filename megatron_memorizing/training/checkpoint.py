"""Checkpoints: exact resume of a training run, and weights-only loading into any layout.

The layout follows Megatron-LM's conventions, so its users find their way around:

    <dir>/latest_checkpointed_iteration.txt   the newest complete checkpoint's step; written last
    <dir>/iter_0000100/
        checkpoint.json          format, step and the parallel layout that saved it
        config.yaml              the RunConfig
        model/                   megatron.core.dist_checkpointing: reshardable to any TP/PP layout
        optimizer/               the optimizer backend's own files
        rank_state/rank_00000.pt per global rank: step, extra, RNG states, memory contents, stream position,
                                 as tensors and plain values only (read with torch.load(weights_only=True))
        tokenizer.model          the dataset's tokenizer, when its manifest names one (HF export needs it);
                                 tokenizer.json (+ tokenizer_config.json) for a Hugging Face tokenizer
        hf_tokenizer/, hf_config.json   what an imported model came with (hf/importer.py), carried along

A weights-only checkpoint (`write_weights_only`: what megatron-memorizing-import writes) has
checkpoint.json, config.yaml and model/ only; runs start from it with `checkpoint.init_from`.

Memory contents, optimizer state and stream positions belong to one rank each, so a checkpoint
resumes only on the layout that saved it; `load_weights` takes the model weights alone into any
layout (and into a model with memory layers that the checkpoint's model lacked).

A save is atomic: every rank writes into `iter_0000100.tmp/`, then rank 0 renames it and only
then rewrites the tracker file. A run killed at any point leaves the previous checkpoint as the
latest one; what it leaves (`iter_*.tmp` folders marked by a file `.megatron-memorizing-partial`)
is ignored and removed by the next save; any other `*.tmp` in the folder is left alone. The trainer
publishes a written checkpoint (`write`, then `publish`) only once the loss computed from its
weights came out sane (training/divergence.py), so the checkpoint a diverged run names as good
never holds the diverged weights.

Nothing this run did not write is deleted: pruning (`keep_last`) removes only checkpoints this
process saved and those up to the one it resumed from. Without a tracker file (copied
iterations, a tracker deleted by hand) the newest complete iteration is the latest, for resuming,
`init_from`, export and evaluation alike (`resolve`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pickle
import random
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from numpy.core.multiarray import _reconstruct

from megatron_memorizing.config import MemorizingConfig
from megatron_memorizing.data import DataError, DocumentStream, IncompatibleError, dataset_tokenizer_path, load_tokenizer, read_manifest
from megatron_memorizing.data.manifest import IMPORTED_CONFIG_FILE, IMPORTED_TOKENIZER_DIR, checkpoint_tokenizers
from megatron_memorizing.data.tokenizer import file_sha256
from megatron_memorizing.knn_attention import MEMORY_PARAMETERS
from megatron_memorizing.memories import ModelMemories
from megatron_memorizing.training.config import CheckpointConfig, RunConfig
from patches.checkpoint_writer import tie_checkpoint_writer_to_this_process

if TYPE_CHECKING:
    from megatron_memorizing.training.optimizer import OptimizerBackend

FORMAT = "megatron-memorizing-checkpoint/1"
TRACKER = "latest_checkpointed_iteration.txt"
LOCK = ".lock"  # held by the run writing into the folder
_DISK_FULL = 64 * 2**20  # bytes free below which a failed save is put down to a full disk
_ITERATION = re.compile(r"iter_(\d{7,})")
_TMP = ".tmp"
# Left behind by a save or a deletion that was cut short: the names a save stages in and a deletion renames to.
_LEFTOVER = re.compile(r"iter_\d{7,}(\.deleted)?\.tmp")
# Written into a folder before a save writes anything else into it, and before a deletion renames it;
# removed last. A leftover folder holding it is this project's to remove; one without it, the user's.
PARTIAL = ".megatron-memorizing-partial"
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
    "add_bias_linear", "add_qkv_bias", "share_embeddings_and_output_weights", "memory_layers", "memory_dtype", "xl_cache",
    "xl_cache_contents", "segment_length", "micro_batch_size", "num_micro_batches",
)
# Those of them that shape the weights: a model differing in one cannot take the checkpoint's weights.
_WEIGHT_SHAPE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "kv_channels", "num_query_groups", "ffn_hidden_size",
    "vocab_size", "position_embedding_type", "normalization", "gated_linear_unit", "add_bias_linear", "add_qkv_bias",
    "share_embeddings_and_output_weights",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or loaded as asked; the message names the cause and the fix."""


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


def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def current_layout() -> dict:
    return {
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        "data": parallel_state.get_data_parallel_world_size(),
    }


def _describe(layout: dict) -> str:
    vpp = f" x VPP={layout['virtual_pipeline']}" if layout["virtual_pipeline"] else ""
    return f"TP={layout['tensor']} x PP={layout['pipeline']}{vpp} x DP={layout['data']}"


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
        _raise_on_every_rank(problem)

    # --- finding ---------------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint: the one the tracker file names; without a tracker file,
        the newest complete iter_* directory; None if there is none."""
        tracker = self.root / TRACKER
        if not tracker.is_file():
            complete = [step for step in self._iteration_steps() if _is_complete(iteration_dir(self.root, step))]
            return iteration_dir(self.root, complete[-1]) if complete else None
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number: fix or delete it.")
        path = iteration_dir(self.root, int(text))
        if not path.is_dir():
            raise CheckpointError(
                f"{tracker} names iteration {int(text)}, but {path} does not exist: it was deleted or moved. "
                f"Restore it, or point the tracker at an existing iter_* directory."
            )
        return path

    def _iteration_steps(self) -> list[int]:
        """The steps of the folder's iter_* directories, complete or not, in order."""
        if not self.root.is_dir():
            return []
        found = (_ITERATION.fullmatch(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def has_tracker(self) -> bool:
        return (self.root / TRACKER).is_file()

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
        if latest is not None and _step_of(latest) >= state.step:
            raise CheckpointError(
                f"{self.root} already holds a checkpoint of step {_step_of(latest)} ({latest}), and this run, "
                f"now at step {state.step}, did not resume from it: saving would mix two runs. Resume from it "
                f"(checkpoint.resume=true) or use a fresh checkpoint.dir."
            )
        final = iteration_dir(self.root, state.step)
        tmp = final.with_name(final.name + _TMP)
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
            dist_checkpointing.save(_model_state(state.model_chunks), str(tmp / "model"))
            state.optimizer.save(tmp / "optimizer")
            torch.save(_rank_state(state), tmp / "rank_state" / _rank_file())
        dist.barrier()
        self._pending = (tmp, final, state.step)
        return True

    @contextlib.contextmanager
    def _disk_full_named(self, tmp: Path, step: int):
        """A save that runs out of disk space fails deep inside torch's writers ("[enforce fail at
        inline_container.cc]", "iostream error"): name the cause instead, after removing the
        partial save (only its own `*.tmp` directory)."""
        try:
            yield
        except CheckpointError:  # refused before anything was written: no partial save to remove
            raise
        except (OSError, RuntimeError) as error:
            if not (getattr(error, "errno", None) == errno.ENOSPC or shutil.disk_usage(self.root).free < _DISK_FULL):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
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
            self._publish(tmp, final, step)
            self._prune(step)
        dist.barrier()
        return final

    def discard(self) -> None:
        """Forget a written, unpublished checkpoint; its `*.tmp` directory goes with the next save."""
        self._pending = None

    def _publish(self, tmp: Path, final: Path, step: int) -> None:
        """Make the fully written `tmp` the latest checkpoint: rename it, then move the tracker."""
        if final.exists():  # from a run killed before its tracker reached this step: never the latest
            _delete(final)
        os.rename(tmp, final)
        (final / PARTIAL).unlink()  # complete; a run killed just before this leaves a harmless empty marker
        tracker = self.root / TRACKER
        staged = tracker.with_name(tracker.name + _TMP)
        with open(staged, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(staged, tracker)

    def _prune(self, newest: int) -> None:
        """Keep the `keep_last` newest checkpoints of this run up to `newest`: the ones this process
        wrote and those up to the one it resumed from. Any other iteration is left alone."""
        ours = [
            step for step in self._iteration_steps()
            if step <= newest and (step in self._written or (self._resumed_step is not None and step <= self._resumed_step))
        ]
        for step in ours[: -self.config.keep_last]:
            _delete(iteration_dir(self.root, step))

    def _stage(self, tmp: Path) -> None:
        """Create `tmp`, marked as a save in progress, after removing what interrupted saves and
        deletions left (collective: rank 0 decides, every rank raises). A `tmp` that is not such a
        leftover is refused untouched."""
        problem = None
        if dist.get_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for path in self.root.iterdir():
                if _LEFTOVER.fullmatch(path.name) and (path / PARTIAL).is_file():
                    _remove_partial(path)
            if tmp.exists():
                problem = (
                    f"{tmp} is in the way of this save, and it is not one an interrupted save left (it has no "
                    f"{PARTIAL}): move it out of checkpoint.dir {self.root}."
                )
            else:
                tmp.mkdir()
                (tmp / PARTIAL).touch()
        _raise_on_every_rank(problem)

    def write_weights_only(self, model_chunks, run_config: RunConfig, files: dict[str, Path] = {}, **info) -> Path:
        """Save the model weights alone as step 0, the latest checkpoint of an empty folder
        (collective); `files` are copied in (relative name -> source file), `info` joins checkpoint.json."""
        if self.latest() is not None:
            raise CheckpointError(f"{self.root} already holds a checkpoint ({self.latest()}): choose an empty folder.")
        final = iteration_dir(self.root, 0)
        tmp = final.with_name(final.name + _TMP)
        self._stage(tmp)
        if dist.get_rank() == 0:
            (tmp / "model").mkdir()
            info = {"format": FORMAT, "step": 0, "layout": current_layout(), "weights_only": True, **info}
            (tmp / "checkpoint.json").write_text(json.dumps(info, indent=2) + "\n")
            run_config.save(tmp / "config.yaml")
            for name, source in files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, tmp / name)
        dist.barrier()
        dist_checkpointing.save(_model_state([_unwrap(c) for c in model_chunks]), str(tmp / "model"))
        dist.barrier()
        if dist.get_rank() == 0:
            self._publish(tmp, final, 0)
        dist.barrier()
        return final

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
                f"{path} was saved with layout {_describe(info['layout'])}, but this run is {_describe(now)}. "
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
        _load_model(path / "model", state.model_chunks, allow_memory_mismatch=False)
        state.optimizer.load(path / "optimizer")
        _set_rng_state(rank_state["rng"])
        state.step, state.extra = rank_state["step"], rank_state["extra"]
        self._resumed_step = state.step


def _raise_on_every_rank(problem: Optional[str]) -> None:
    """Raise rank 0's `problem` (None: there is none) as a CheckpointError on every rank
    (collective): a rank raising alone would leave the others waiting at the next collective."""
    verdict = [problem]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise CheckpointError(verdict[0])


def _step_of(path: Path) -> int:
    return int(_ITERATION.fullmatch(path.name).group(1))


def _is_complete(path: Path) -> bool:
    """Whether `path` holds every part of a checkpoint, every rank's state included."""
    try:
        info = read_info(path)
    except (CheckpointError, ValueError):
        return False
    return info.get("weights_only", False) or len(list((path / "rank_state").glob("rank_*.pt"))) == info.get("world_size")


def _all_finite(model_chunks) -> bool:
    """Whether every weight on every rank is finite (collective)."""
    parameters = [p for chunk in model_chunks for p in chunk.parameters()]
    local = all(bool(torch.isfinite(p).all()) for p in parameters)
    # On the parameters' device: NCCL reduces CUDA tensors only.
    flag = torch.tensor([1.0 if local else 0.0], device=parameters[0].device if parameters else None)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def resolve(path: str | Path) -> Path:
    """An iteration directory, given it or the checkpoint directory above it: then the one training
    resumes from (`Checkpointer.latest`), which export and evaluation read too. Any other path is
    returned as it is, for `read_info` to say what it lacks."""
    path = Path(path)
    checkpoints = Checkpointer(CheckpointConfig(dir=str(path)))
    if not (checkpoints.has_tracker() or checkpoints._iteration_steps()):
        return path
    latest = checkpoints.latest()
    if latest is None:
        raise CheckpointError(
            f"{path} holds no complete checkpoint: each of its iter_* directories lacks a part (interrupted saves?). "
            f"Pass a checkpoint directory written by megatron-memorizing-train or one complete iter_* directory in it."
        )
    return latest


def check_checkpoint_tokenizer(path: Path, tokenizer: Path) -> None:
    """Raise IncompatibleError unless the checkpoint at `path` was trained with `tokenizer` (when
    the checkpoint carries its tokenizer; older ones may not)."""
    own = checkpoint_tokenizers(path)
    if own and file_sha256(tokenizer) not in {file_sha256(f) for f in own}:
        raise IncompatibleError(
            f"{path} was trained with the tokenizer {own[0]}, but this run's data was tokenized with {tokenizer} "
            f"(sha256 differs): re-tokenize the data with {own[0]}, or start from a checkpoint of this tokenizer."
        )


def parameter_changes(saved: MemorizingConfig, model: MemorizingConfig) -> str:
    """The fields in which `model` drops or reshapes parameters that a model configured as `saved`
    trained ("field: saved X, now Y; ..."; "" if none): an architecture field, or memory_layers
    without all of the saved ones. Memory layers added are new parameters, which `load_weights`
    leaves at their initial values (a model trained without memory, given one for a look)."""
    changed = [name for name in _WEIGHT_SHAPE_FIELDS if getattr(saved, name) != getattr(model, name)]
    if not set(saved.memory_layers) <= set(model.memory_layers):
        changed.append("memory_layers")
    return _differences(saved, model, changed)


def load_weights(path: str | Path, model_chunks) -> list[str]:
    """Model weights only (`checkpoint.init_from`), into a model of any TP/PP layout (collective).

    The model may have memory layers that the checkpoint's model lacked (or the reverse): its
    memory parameters then keep their initial values. Anything else missing, extra or of another
    shape is an error. Returns the names of the parameters left at their initial values.
    """
    path = resolve(path)
    read_info(path)
    return _load_model(path / "model", [_unwrap(c) for c in model_chunks], allow_memory_mismatch=True)


# --- the parts of a checkpoint ---------------------------------------------------------------------
def _rank_file() -> str:
    return f"rank_{dist.get_rank():05d}.pt"


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):  # Megatron DDP and DeepSpeed engines keep the model in .module
        chunk = chunk.module
    return chunk


def _model_keys(chunks) -> list[str]:
    """Megatron-LM's names: "model", or "model0", "model1", ... for virtual pipeline stages."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _model_state(chunks) -> dict:
    return {key: chunk.sharded_state_dict() for key, chunk in zip(_model_keys(chunks), chunks)}


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


def _delete(path: Path) -> None:
    """Rename first, so that a deletion cut short leaves only a marked `*.tmp` that the next save
    removes, never a half checkpoint."""
    (path / PARTIAL).touch()
    doomed = path.with_name(path.name + ".deleted" + _TMP)
    os.rename(path, doomed)
    _remove_partial(doomed)


def _remove_partial(path: Path) -> None:
    """Remove a folder marked PARTIAL, the marker last: cut short, what is left is still marked."""
    for entry in path.iterdir():
        if entry.name == PARTIAL:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (path / PARTIAL).unlink()
    path.rmdir()


def read_info(path: Path) -> dict:
    """checkpoint.json of the complete checkpoint `path` (an iteration directory); CheckpointError,
    naming what is wrong, for anything else."""
    if path.name.endswith(_TMP):
        raise CheckpointError(
            f"{path} is an incomplete checkpoint (a save or deletion that was interrupted, or weights the trainer "
            f"discarded as non-finite); load the one that {path.parent / TRACKER} names."
        )
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    info = json.loads((path / "checkpoint.json").read_text()) if (path / "checkpoint.json").is_file() else {}
    parts = ("checkpoint.json", "config.yaml", "model/metadata.json")
    if not info.get("weights_only"):
        parts += ("optimizer", "rank_state")
    missing = [p for p in parts if not (path / p).exists()]
    if missing:
        raise CheckpointError(
            f"{path} is not a complete megatron-memorizing checkpoint: it lacks {', '.join(missing)}."
        )
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{path}/checkpoint.json has format {info.get('format')!r}, expected {FORMAT!r}.")
    return info


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
        differ = _differences(saved_config.model, run_config.model, changed)
        if any(name in _WEIGHT_SHAPE_FIELDS for name in changed):
            fix = ("its weights do not fit this model either, so train it from scratch in a fresh "
                   "checkpoint.dir, or set the model back to the saved values")
        else:
            fix = f"to start from its weights instead, set checkpoint.init_from={path} and a fresh checkpoint.dir"
        raise CheckpointError(f"{path} was saved by another model ({differ}). Resuming needs the model that saved it; {fix}.")


def _differences(saved: MemorizingConfig, model: MemorizingConfig, names: list[str]) -> str:
    """"name: saved X, now Y" for each of `names`, as the config files write the values."""
    saved, model = saved.to_dict(), model.to_dict()
    return "; ".join(f"{name}: saved {saved[name]}, now {model[name]}" for name in names)


# --- model weights ---------------------------------------------------------------------------------
_PER_LAYER_KEY = re.compile(r"decoder\.layers\.\d+\.")


@contextlib.contextmanager
def _layer_keys(chunks, per_layer: bool):
    """Name transformer-layer tensors per layer ("decoder.layers.3.x") or stacked along a layer
    axis ("decoder.layers.x"). Megatron stacks them unless layers differ; a model with memory in
    some layers names them per layer, so a vanilla checkpoint is read with the stacked names."""
    configs = [chunk.config for chunk in chunks]
    saved = [config.hetereogenous_dist_checkpoint for config in configs]
    for config in configs:
        config.hetereogenous_dist_checkpoint = per_layer
    try:
        yield
    finally:
        for config, value in zip(configs, saved):
            config.hetereogenous_dist_checkpoint = value


def _is_memory_parameter(key: str) -> bool:
    return key.endswith(MEMORY_PARAMETERS)


def _load_model(model_dir: Path, chunks, allow_memory_mismatch: bool) -> list[str]:
    """Load model weights from a dist_checkpointing directory after checking that every parameter
    is there with its shape (collective: all ranks agree on the verdict before anyone loads)."""
    saved = load_sharded_metadata(str(model_dir))
    names = [{k: v.key for k, v in chunk.sharded_state_dict().items()} for chunk in chunks]
    with _layer_keys(chunks, any(_PER_LAYER_KEY.match(key) for key in saved)):
        requests = [chunk.sharded_state_dict() for chunk in chunks]

    fit = {"requested": set(), "left_at_init": set(), "missing": set(), "mismatched": set()}
    for request, chunk_names in zip(requests, names):
        for local_key, sharded in list(request.items()):
            if sharded.key not in saved:
                del request[local_key]
                # Only tensors are weights; objects hold kernel metadata ("extra state"), which
                # builds with and without Transformer Engine keep differently.
                if isinstance(sharded, ShardedTensor):
                    name = chunk_names[local_key]
                    memory_only = allow_memory_mismatch and _is_memory_parameter(name)
                    fit["left_at_init" if memory_only else "missing"].add(name)
                continue
            fit["requested"].add(sharded.key)
            if isinstance(sharded, ShardedTensor):
                saved_shape, shape = tuple(saved[sharded.key].global_shape), tuple(sharded.global_shape)
                if saved_shape != shape:
                    fit["mismatched"].add(f"{sharded.key} (checkpoint {saved_shape}, model {shape})")

    # Under pipeline parallelism each rank sees its own stage only: decide on the union.
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, fit)
    fit = {kind: sorted(set().union(*(g[kind] for g in gathered))) for kind in fit}
    unexpected = [
        key for key, meta in sorted(saved.items())
        if isinstance(meta, ShardedTensor) and key not in fit["requested"]
        and not (allow_memory_mismatch and _is_memory_parameter(key))
    ]
    problems = [
        f"{what}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
        for what, keys in (("missing from the checkpoint", fit["missing"]), ("of another shape", fit["mismatched"]),
                           ("in the checkpoint but not in this model", unexpected))
        if keys
    ]
    if problems:
        also = "" if allow_memory_mismatch else ", memory layers"
        raise CheckpointError(
            f"{model_dir} does not fit this model ({'; '.join(problems)}): it was saved by a model of another "
            f"architecture (number of layers, hidden size, heads, vocabulary{also})."
        )

    loaded = dist_checkpointing.load(dict(zip(_model_keys(chunks), requests)), str(model_dir))
    for key, chunk in zip(_model_keys(chunks), chunks):
        chunk.load_state_dict(loaded[key], strict=False)
    return fit["left_at_init"]
