"""A tokenizer as the project uses it: text <-> ids, end-of-document id, bytes per id, and a hash
that ties a tokenized dataset to the exact file that produced it.

Two kinds of file, one interface:
- a SentencePiece model (`*.model`): what `megatron-memorizing-data tokenizer` trains;
- a Hugging Face tokenizer (`tokenizer.json`, read with the `tokenizers` library): what a
  Llama-3, Qwen2 or Mistral checkpoint comes with. Its end-of-document id is the EOS token that
  `tokenizer_config.json` beside it names (none without one).
`load_tokenizer` takes either file, or a directory holding one (tokenizer.json first).
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property, lru_cache
from pathlib import Path

import sentencepiece as spm

from .errors import TokenizerError

SENTENCEPIECE_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(path) -> "SentencePieceTokenizer | HFTokenizer":
    """The tokenizer in file `path` (SentencePiece .model or tokenizer.json), or in directory `path`."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in (HF_FILE, SENTENCEPIECE_FILE) if (path / name).is_file()]
        if not found:
            raise TokenizerError(f"{path} holds no {HF_FILE} or {SENTENCEPIECE_FILE}: pass the tokenizer file itself")
        path = found[0]
    return HFTokenizer(path) if path.suffix == ".json" else SentencePieceTokenizer(path)


class _TokenizerFile:
    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(
                f"tokenizer {self.path} not found: train one with "
                "`megatron-memorizing-data tokenizer --input TRAIN.jsonl --output MODEL.model`, "
                "or pass the path of an existing SentencePiece .model or Hugging Face tokenizer.json"
            )

    @cached_property
    def sha256(self) -> str:
        return file_sha256(self.path)


class SentencePieceTokenizer(_TokenizerFile):
    def __init__(self, model_path):
        super().__init__(model_path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as error:
            raise TokenizerError(f"{self.path} is not a readable SentencePiece model ({error})") from None

    def files(self) -> dict[str, Path]:
        """What a copy of this tokenizer consists of: name in the copy -> file here."""
        return {SENTENCEPIECE_FILE: self.path}

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def eod_id(self) -> int | None:
        """Appended after every document; None when the model has no end-of-sentence piece."""
        eos = self._sp.eos_id()
        return eos if eos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def decode(self, ids) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    def bytes_per_id(self) -> list[int]:
        """How many UTF-8 bytes of text each id stands for: what bits per byte divides by. Control
        and unknown pieces (the end-of-document id among them) stand for none, a byte-fallback
        piece for one, a piece for its text ("▁" being a space)."""
        sp = self._sp
        return [
            0 if sp.IsControl(i) or sp.IsUnknown(i)
            else 1 if sp.IsByte(i)
            else len(sp.IdToPiece(i).replace("▁", " ").encode())
            for i in range(sp.GetPieceSize())
        ]


class HFTokenizer(_TokenizerFile):
    def __init__(self, path):
        super().__init__(path)
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self._tk = RustTokenizer.from_file(str(self.path))
            self._spec = json.loads(self.path.read_text(encoding="utf-8"))
        except Exception as error:  # the library raises plain Exceptions for malformed files
            raise TokenizerError(f"{self.path} is not a readable Hugging Face tokenizer.json ({error})") from None
        self._config_path = self.path.with_name(HF_CONFIG_FILE)
        self._special = {token["id"] for token in self._spec.get("added_tokens", []) if token.get("special")}

    def files(self) -> dict[str, Path]:
        companion = {HF_CONFIG_FILE: self._config_path} if self._config_path.is_file() else {}
        return {HF_FILE: self.path, **companion}

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @cached_property
    def eod_id(self) -> int | None:
        """The EOS token tokenizer_config.json names; None without one."""
        if not self._config_path.is_file():
            return None
        eos = json.loads(self._config_path.read_text(encoding="utf-8")).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        return self._tk.token_to_id(eos) if eos else None

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def piece(self, token_id: int) -> str:
        return self._tk.id_to_token(int(token_id))

    def bytes_per_id(self) -> list[int]:
        """As SentencePieceTokenizer's: special tokens stand for none; a byte-level token (GPT-2,
        Llama-3, Qwen2) for the bytes its characters map back to; a SentencePiece-style token for
        its text, "<0xNN>" for one byte."""
        byte_level = '"ByteLevel"' in json.dumps(self._spec.get("decoder"))
        unicode_to_byte = {char: byte for byte, char in _bytes_to_unicode().items()}
        sizes = []
        for i in range(self.vocab_size):
            token = self._tk.id_to_token(i)
            if token is None or i in self._special:
                sizes.append(0)
            elif byte_level:
                sizes.append(sum(1 for char in token if char in unicode_to_byte))
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                sizes.append(1)
            else:
                sizes.append(len(token.replace("▁", " ").encode()))
        return sizes


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character (used by tokenizers' ByteLevel)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


# What annotations call a tokenizer of either kind.
Tokenizer = SentencePieceTokenizer | HFTokenizer
