"""Folders this project wrote, and the only code that removes folders.

A user action never deletes what this project did not write. A folder the project may remove
carries a marker file, written into it before anything else and removed after everything else:
PARTIAL for a folder still being written (a save, a conversion, a data build) or being deleted, or
a marker of its own kind (an export's megatron_memorizing_export.json). `remove_marked` refuses a
folder without its marker, and removes the marker last, so that a removal cut short leaves a folder
that is still marked and still this project's to remove. Single temporary files a process names
after itself (`.NAME.tmp-PID`), and `tempfile.TemporaryDirectory` folders (made under a fresh
unique name by the process that removes them), are removed where they are written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

PARTIAL = ".megatron-memorizing-partial"


class NotOursError(RuntimeError):
    """A folder without this project's marker: the user's, never removed."""


def is_marked(path: str | Path, marker: str = PARTIAL) -> bool:
    path = Path(path)
    return path.is_dir() and (path / marker).is_file()


def mark(path: str | Path, marker: str = PARTIAL) -> None:
    """Mark the existing folder `path` as this project's to remove."""
    (Path(path) / marker).touch()


def make_marked_dir(path: str | Path, marker: str = PARTIAL) -> Path:
    """Create the folder `path` (it must not exist) with `marker` in it, before anything else."""
    path = Path(path)
    path.mkdir(parents=True)
    mark(path, marker)
    return path


def remove_marked(path: str | Path, marker: str = PARTIAL, *, missing_ok: bool = False,
                  keep_folder: bool = False) -> None:
    """Remove the folder `path`, which must hold `marker`: its contents, then the marker, then the
    folder itself (unless `keep_folder`). NotOursError, and nothing removed, if it has no marker
    (or is a link, which only `keep_folder` empties: the link is not this project's)."""
    path = Path(path)
    if missing_ok and not os.path.lexists(path):
        return
    marked = is_marked(path, marker)
    if not marked or (path.is_symlink() and not keep_folder):
        what = f"is a link to {os.path.realpath(path)}" if marked else f"has no {marker}"
        raise NotOursError(
            f"{path} {what}: it is not this project's to remove. Move it away yourself if it is in the way."
        )
    for entry in path.iterdir():
        if entry.name == marker:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (path / marker).unlink()
    if not keep_folder:
        path.rmdir()


def discard(path: str | Path, marker: str = PARTIAL, *, keep_folder: bool = False) -> bool:
    """`remove_marked` as the clean-up after a failure: it never raises, so the failure stays the
    error reported. A folder without the marker is left as it is; so is what cannot be removed
    (still marked). Returns whether the folder is gone (emptied, with `keep_folder`)."""
    try:
        remove_marked(path, marker, missing_ok=True, keep_folder=keep_folder)
    except (OSError, NotOursError):
        return False
    return True


def delete(path: str | Path, marker: str = PARTIAL) -> None:
    """Delete a folder this project wrote (the caller knows it by its name and place): marked, then
    renamed to `*.deleted.tmp`, then removed, so that a deletion cut short leaves only a marked
    `*.deleted.tmp` folder, never a half of what it was under its own name."""
    path = Path(path)
    mark(path, marker)
    doomed = path.with_name(path.name + ".deleted.tmp")
    os.rename(path, doomed)
    remove_marked(doomed, marker)
