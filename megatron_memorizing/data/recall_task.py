"""The recall task's words and the spec of its documents, shared by the generator
(data_tools/recall_task.py, which explains the task) and the evaluation that scores recalls
(megatron_memorizing/eval/recall.py).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFINE, QUERY, PASS = "\nput", "\nget", "\npass"
FORMATS = ("statements", "echo", "facts")


@dataclass(frozen=True)
class RecallSpec:
    num_keys: int = 512  # key vocabulary; a document defines each key at most once
    num_values: int = 32  # value vocabulary: chance accuracy is 1/num_values
    # Statements per document, on average: each document draws its count uniformly from
    # [statements/2, 3*statements/2], so that slots streaming side by side drift out of phase
    # (with equal lengths every slot of a batch would be defining, or querying, at once).
    statements: int = 340
    # Queries reach at most this many statements back (0: to the document's start). A small
    # value makes a warm-up task that local attention alone can solve.
    max_back: int = 0
    # Queries reach at least this many statements back (0: any distance). With a few keys and
    # long documents, an evaluation set of far queries only (longer than any seen in training).
    min_back: int = 0
    # How a definition is written: "statements": `put v05 k317`; "echo": `put v05 k317 v05`, whose
    # last token, predictable from the one before the key, rewards a previous-token feature early
    # in training; "facts": one token `k317=v05` (num_keys * num_values more words).
    format: str = "statements"
    # Each document opens with 0..lead_filler `pass` statements (drawn uniformly), so that its
    # definitions fall at every offset within a segment. Without them a document that starts with
    # a run of 4-token definitions (all of them, with min_back) has them aligned to any segment
    # length that is a multiple of 4: none is split between two segments.
    lead_filler: int = 0

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}: use one of {FORMATS}")
        if self.lead_filler < 0:
            raise ValueError(f"lead_filler={self.lead_filler}: use 0 or more")

    @property
    def keys(self) -> list[str]:
        return [f" k{i:03d}" for i in range(self.num_keys)]

    @property
    def values(self) -> list[str]:
        return [f" v{i:02d}" for i in range(self.num_values)]

    @property
    def words(self) -> list[str]:
        facts = [fact_word(k, v) for k in self.keys for v in self.values] if self.format == "facts" else []
        return [DEFINE, QUERY, PASS, *self.keys, *self.values, *facts]

    def statement_words(self, op: str, key: str, value: str) -> list[str]:
        """The tokens of one statement as written in a document."""
        if op == QUERY:
            return [QUERY, key, value]
        if op == PASS:
            return [PASS]
        if self.format == "facts":
            return [fact_word(key, value)]
        return [DEFINE, value, key, value] if self.format == "echo" else [DEFINE, value, key]


def fact_word(key: str, value: str) -> str:
    return f"\n{key.strip()}={value.strip()}"
