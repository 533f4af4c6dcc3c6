"""argparse types shared by the command-line tools.

A bad argument is refused while the command line is read: argparse prints its usage and one line,
`PROG: error: argument --x: VALUE ...: what to do`, and exits with code 2, before anything heavy
is loaded or anything written. Each tool declares its arguments with these types;
tests/test_cli_arguments.py holds one case per tool and argument, and a new argument joins it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from pathlib import Path


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    """A count (sizes, slots, steps, documents, workers): 0 or less is refused."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: it must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    """An index or a count that may be 0 (a document's index, a distance where 0 means none)."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: it must be 0 or more")
    return value


def fraction(text: str) -> float:
    """A share or a threshold in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: it must be above 0 and at most 1")
    return value


def existing_file(text: str) -> Path:
    """A file to read."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder, not a file: pass a file")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{path} does not exist: check the path")
    return path


def existing_folder(text: str) -> Path:
    """A folder to read."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder: pass a folder")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{path} does not exist: check the path")
    return path


def existing_path(text: str) -> Path:
    """A file or a folder to read (a tokenizer file, or a folder holding one)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{path} does not exist: check the path")
    return path


def _file_above(path: Path) -> Path | None:
    return next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)


def file_in_the_way(folder: str | Path) -> Path | None:
    """What stops `folder` from being made or used as a folder: it, or a folder above it, being a
    file (that file); None if nothing does."""
    folder = Path(folder)
    return folder if folder.exists() and not folder.is_dir() else _file_above(folder)


def not_a_folder(path: Path, blocking: Path) -> str:
    """The message for a folder that `blocking` (a file: it, or one above it) stands in the way of."""
    where = "" if blocking == path else f"{path}: "
    return f"{where}{blocking} is a file, not a folder"


def output_folder(text: str) -> Path:
    """A folder to write into, made if missing: neither a file nor under one."""
    path = Path(text)
    blocking = file_in_the_way(path)
    if blocking is not None:
        raise argparse.ArgumentTypeError(f"{not_a_folder(path, blocking)}: choose another path")
    return path


def _new_file(text: str, when_a_folder: str) -> Path:
    """A path to write a file at: not a folder (`when_a_folder` says what to name instead), nor under a file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder{when_a_folder}")
    blocking = _file_above(path)
    if blocking is not None:
        raise argparse.ArgumentTypeError(f"{path}: {blocking} is a file, not a folder: choose another path")
    return path


def output_file(text: str) -> Path:
    """A file to write."""
    return _new_file(text, ", not a file: name the file to write")


def output_prefix(text: str) -> Path:
    """A dataset prefix to write (PREFIX.bin, .idx, .json)."""
    return _new_file(text, f": a dataset prefix names files without their extension, e.g. {Path(text) / 'train'}")


def dataset_prefix(text: str) -> str:
    """A dataset to read, named by its prefix: a slip (a missing path, a .bin suffix) is named."""
    from megatron_memorizing.data.errors import DataError
    from megatron_memorizing.data.manifest import check_prefix

    try:
        check_prefix(text)
    except DataError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def config_override(text: str) -> str:
    """`--set SECTION.FIELD=VALUE`: a known section and field, and a value of the field's type.

    Whether the values fit together is checked where the config is loaded; a mistyped name or a
    value of the wrong type is refused here, before any file is read.
    """
    from megatron_memorizing.config import ConfigError, checked_fields
    from megatron_memorizing.run.config import RunConfig, apply_override

    parsed: dict = {}
    try:
        apply_override(parsed, text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    ((section, values),) = parsed.items()
    ((name, _),) = values.items()
    sections = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}
    if section not in sections:
        raise argparse.ArgumentTypeError(
            f"unknown config section {section!r} ({text}){_did_you_mean(section, sections)} Sections are "
            f"{sorted(sections)}."
        )
    fields = sorted(f.name for f in dataclasses.fields(sections[section]))
    if name not in fields:
        raise argparse.ArgumentTypeError(
            f"unknown field(s) [{name!r}] in {section} ({text}){_did_you_mean(name, fields, f'{section}.')} "
            f"Valid fields are {fields}."
        )
    try:
        checked_fields(sections[section], values, section)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _did_you_mean(name: str, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f": did you mean {prefix}{close[0]}?" if close else "."
