"""A GGUF file (llama.cpp's format) as a standard Hugging Face directory: config.json,
model.safetensors (dequantized) and the tokenizer, which the importer, transformers and the data
tools read like any `save_pretrained` output.

transformers reads GGUF (with the packages `gguf` and `accelerate` installed) but refuses to save
a model loaded from it; this writes the same weights and config as an ordinary checkpoint. The
tokenizer keeps the file's own special tokens (bos, eos, unk, pad from its metadata) and only the
tokens the model has embeddings for.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
from pathlib import Path

import torch

from megatron_memorizing import owned
from megatron_memorizing.hf.llama_family import FAMILY

GGUF_MAGIC = b"GGUF"
# Written last: a directory holding it is a complete conversion of the file it names.
RECORD = "gguf_source.json"


class GGUFError(RuntimeError):
    """A GGUF file that cannot be converted; the message names the problem and the fix."""


def quantization(path: Path) -> dict[str, int]:
    """Tensor count per storage type (e.g. {'Q4_1': 210, 'F32': 61}): what the weights were stored as."""
    from gguf import GGUFReader

    return _storage_types(GGUFReader(str(path)))


def _storage_types(reader) -> dict[str, int]:
    return dict(collections.Counter(t.tensor_type.name for t in reader.tensors))


def gguf_to_hf(gguf_file: str | Path, output: str | Path) -> Path:
    """Write the Hugging Face directory `output` from `gguf_file` (float32 weights); returns `output`.
    A directory already converted from the same file is kept as it is."""
    gguf_file, output = Path(gguf_file), Path(output)
    _check_file(gguf_file)
    source = {"file": gguf_file.name, "bytes": gguf_file.stat().st_size}
    if (output / RECORD).is_file() and json.loads((output / RECORD).read_text())["source"] == source:
        return output
    if output.exists():
        raise GGUFError(f"{output} exists and is not a conversion of {gguf_file}: choose another output directory.")
    _check_packages()
    import transformers
    from gguf import GGUFReader

    transformers.utils.logging.disable_progress_bar()
    where = dict(pretrained_model_name_or_path=str(gguf_file.parent), gguf_file=gguf_file.name)
    try:
        config = transformers.AutoConfig.from_pretrained(**where)
    except (ValueError, KeyError, RuntimeError) as error:
        raise GGUFError(f"{gguf_file}: transformers cannot read its architecture: {error}") from None
    if config.model_type not in FAMILY:
        raise GGUFError(
            f"{gguf_file} holds a {config.model_type!r} model; this project imports the Llama family "
            f"({', '.join(FAMILY.values())})."
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    reader = GGUFReader(str(gguf_file))
    tokenizer = _tokenizer(transformers.AutoTokenizer.from_pretrained(**where), reader.fields, config.vocab_size)

    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:  # marked: one left by a killed conversion of the same process id is removed, anything else refused
        owned.remove_marked(tmp, missing_ok=True)
    except owned.NotOursError as error:
        raise GGUFError(str(error)) from None
    owned.make_marked_dir(tmp)
    try:
        _write_weights(model, tmp)
        tokenizer.save_pretrained(str(tmp))
        record = {"source": source, "quantization": _storage_types(reader),
                  "transformers": transformers.__version__}
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, output)
    finally:
        owned.discard(tmp)
    (output / owned.PARTIAL).unlink()  # complete; a conversion killed just before this leaves a harmless marker
    return output


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise GGUFError(f"{path} does not exist: pass the path of a .gguf file.")
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF').")


def _check_packages() -> None:
    missing = [name for name in ("gguf", "accelerate", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise GGUFError(
            f"reading a GGUF file needs the package(s) {', '.join(missing)}: "
            f"pip install 'megatron-memorizing[gguf]' (in this repository: make smollm2)."
        )


def _write_weights(model, directory: Path) -> None:
    """config.json (without the GGUF quantization record, as the weights are now plain floats)
    and model.safetensors; a tied output layer is stored once, as save_pretrained does."""
    from safetensors.torch import save_file

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [FAMILY[model.config.model_type]]
    config["dtype"] = "float32"
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file({name: t.contiguous() for name, t in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})


def _tokenizer(loaded, fields: dict, vocab_size: int):
    """The tokenizer transformers read from the file, with the file's special tokens (`fields`: its
    metadata), and without tokens beyond the model's vocabulary (transformers may add some, e.g.
    fill-in-the-middle markers)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    def token(role: str):
        field = fields.get(f"tokenizer.ggml.{role}_token_id")
        return loaded.convert_ids_to_tokens(int(field.contents())) if field is not None else None

    spec = json.loads(loaded.backend_tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["id"] < vocab_size]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=token("bos"), eos_token=token("eos"), unk_token=token("unknown"), pad_token=token("padding"),
        chat_template=getattr(loaded, "chat_template", None),
    )
