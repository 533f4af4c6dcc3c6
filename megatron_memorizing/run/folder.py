"""A run's checkpoint folder: which iterations it holds, which one a tool loads, and the
primitives that save into it without ever leaving half a checkpoint or deleting what others wrote.

The layout follows Megatron-LM's conventions:

    <dir>/latest_checkpointed_iteration.txt   the newest complete checkpoint's step; written last
    <dir>/iter_0000100/checkpoint.json         format, step and the layout that saved it
    <dir>/iter_0000100/config.yaml             the RunConfig
    <dir>/iter_0000100/model/                  megatron.core.dist_checkpointing
    <dir>/iter_0000100.tmp/                    a save in progress, marked by PARTIAL

Training, evaluation and export all find the checkpoint to load with `resolve`: the tracker's,
or without a tracker the newest complete iteration. A folder marked PARTIAL is this project's to
remove (megatron_memorizing/owned.py `remove_marked`); nothing else in the folder is ever deleted.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

# PARTIAL: written into a folder before a save writes anything else into it, and before a deletion
# renames it; removed last. A leftover folder holding it is this project's to remove; one without it, the user's.
from megatron_memorizing.owned import PARTIAL, delete, make_marked_dir, remove_marked

FORMAT = "megatron-memorizing-checkpoint/1"
TRACKER = "latest_checkpointed_iteration.txt"
TMP = ".tmp"
_ITERATION = re.compile(r"iter_(\d{7,})")
# Left behind by a save or a deletion that was cut short: the names a save stages in and a deletion renames to.
LEFTOVER = re.compile(r"iter_\d{7,}(\.deleted)?\.tmp")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or loaded as asked; the message names the cause and the fix."""


def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def step_of(path: Path) -> int:
    return int(_ITERATION.fullmatch(path.name).group(1))


def iteration_steps(root: Path) -> list[int]:
    """The steps of the folder's iter_* directories, complete or not, in order."""
    if not root.is_dir():
        return []
    found = (_ITERATION.fullmatch(p.name) for p in root.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def has_tracker(root: Path) -> bool:
    return (root / TRACKER).is_file()


def latest(root: Path) -> Optional[Path]:
    """The newest complete checkpoint of `root`: the one the tracker file names; without a tracker
    file, the newest complete iter_* directory; None if there is none."""
    tracker = root / TRACKER
    if not tracker.is_file():
        complete = [step for step in iteration_steps(root) if is_complete(iteration_dir(root, step))]
        return iteration_dir(root, complete[-1]) if complete else None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number: fix or delete it.")
    path = iteration_dir(root, int(text))
    if not path.is_dir():
        raise CheckpointError(
            f"{tracker} names iteration {int(text)}, but {path} does not exist: it was deleted or moved. "
            f"Restore it, or point the tracker at an existing iter_* directory."
        )
    return path


def resolve(path: str | Path) -> Path:
    """The iteration directory to load, given it or the checkpoint folder above it (then `latest`).
    An interrupted or discarded save is refused; any other path is returned as it is, for
    `read_info` to say what it lacks."""
    path = _not_partial(Path(path))
    if not (has_tracker(path) or iteration_steps(path)):
        return path
    found = latest(path)
    if found is None:
        raise CheckpointError(
            f"{path} holds no complete checkpoint: each of its iter_* directories lacks a part (interrupted saves?). "
            f"Pass a checkpoint directory written by megatron-memorizing-train or one complete iter_* directory in it."
        )
    return found


def read_info(path: Path) -> dict:
    """checkpoint.json of the complete checkpoint `path` (an iteration directory); CheckpointError,
    naming what is wrong, for anything else."""
    if not _not_partial(path).is_dir():
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


def _not_partial(path: Path) -> Path:
    if path.name.endswith(TMP):
        raise CheckpointError(
            f"{path} is an incomplete checkpoint (a save or deletion that was interrupted, or weights the trainer "
            f"discarded as diverged); use the one that {path.parent / TRACKER} names."
        )
    return path


def is_complete(path: Path) -> bool:
    """Whether `path` holds every part of a checkpoint, every rank's state included."""
    try:
        info = read_info(path)
    except (CheckpointError, ValueError):
        return False
    return info.get("weights_only", False) or (
        len(list((path / "rank_state").glob("rank_*.pt"))) == info.get("world_size")
    )


# --- saving and deleting (rank 0 only) -------------------------------------------------------------
def stage(root: Path, tmp: Path) -> Optional[str]:
    """Create `tmp` in `root`, marked as a save in progress, after removing what interrupted saves
    and deletions left. Returns the problem if `tmp` is in the way and not such a leftover."""
    root.mkdir(parents=True, exist_ok=True)
    for path in root.iterdir():
        if LEFTOVER.fullmatch(path.name) and (path / PARTIAL).is_file():
            remove_marked(path)
    if tmp.exists():
        return (
            f"{tmp} is in the way of this save, and it is not one an interrupted save left (it has no "
            f"{PARTIAL}): move it out of checkpoint.dir {root}."
        )
    make_marked_dir(tmp)
    return None


def publish(tmp: Path, final: Path, step: int) -> None:
    """Make the fully written `tmp` the latest checkpoint: rename it, then move the tracker."""
    if final.exists():  # from a run killed before its tracker reached this step: never the latest
        delete(final)
    os.rename(tmp, final)
    (final / PARTIAL).unlink()  # complete; a run killed just before this leaves a harmless empty marker
    tracker = final.parent / TRACKER
    staged = tracker.with_name(tracker.name + TMP)
    with open(staged, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(staged, tracker)
