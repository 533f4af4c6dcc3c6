"""A SentencePiece model as the project uses it: text <-> ids, end-of-document id, and a hash
that ties a tokenized dataset to the exact model file that produced it."""

import hashlib
from functools import cached_property
from pathlib import Path

import sentencepiece as spm

from .errors import TokenizerError


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    def __init__(self, model_path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise TokenizerError(
                f"tokenizer model {self.path} not found: train one with "
                "`megatron-memorizing-data tokenizer --input TRAIN.jsonl --output MODEL.model`, "
                "or pass the path of an existing SentencePiece .model file"
            )
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as error:
            raise TokenizerError(f"{self.path} is not a readable SentencePiece model ({error})") from None

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def eod_id(self) -> int | None:
        """Appended after every document; None when the model has no end-of-sentence piece."""
        eos = self._sp.eos_id()
        return eos if eos >= 0 else None

    @cached_property
    def sha256(self) -> str:
        return file_sha256(self.path)

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
            0 if sp.IsControl(i) or sp.IsUnknown(i) else 1 if sp.IsByte(i) else len(sp.IdToPiece(i).replace("▁", " ").encode())
            for i in range(sp.GetPieceSize())
        ]
