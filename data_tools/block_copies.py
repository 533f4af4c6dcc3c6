"""A copy warm-up corpus: the same documents with every block of lines written twice in a row.

The second copy of a block is predictable only by looking back at the first, a few to a few
hundred tokens earlier, so a model trained on it learns the in-context lookup (an induction
head) that a memory layer extends beyond the local window. On real code small models learn that
lookup only after far more tokens than a CPU can train (docs/results.md, "The recipe that works"); a short
warm-up on these documents forms it, and training on the ordinary corpus continues from there.

Blocks are 1 to `max_lines` lines long, drawn per document from (seed, document id), so a
document's blocks do not depend on which other documents are in the file.
"""

import hashlib
import json
import random
from pathlib import Path

from tqdm import tqdm

from megatron_memorizing.data.atomic import atomic_path
from megatron_memorizing.data.errors import DataError


def line_blocks(text: str, rng: random.Random, max_lines: int) -> list[str]:
    """`text` cut into consecutive blocks of 1..max_lines lines, each ending in a newline."""
    lines = text.splitlines(keepends=True)
    blocks = []
    while lines:
        n = rng.randint(1, max_lines)
        block, lines = "".join(lines[:n]), lines[n:]
        blocks.append(block if block.endswith("\n") else block + "\n")
    return blocks


def with_blocks_doubled(text: str, doc_id: str, max_lines: int, seed: int) -> str:
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return "".join(block + block for block in line_blocks(text, rng, max_lines))


def write_block_copies(input_path, output_path, max_lines: int = 16, seed: int = 0, force: bool = False) -> int:
    """Write `output_path` (JSONL) with every document of `input_path` block-doubled; return the count."""
    input_path, output_path = Path(input_path), Path(output_path)
    if max_lines < 1:
        raise DataError(f"--max-lines must be at least 1, not {max_lines}")
    if not input_path.is_file():
        raise DataError(f"{input_path} does not exist: pass a JSONL corpus split, e.g. data/stdlib/corpus/train.jsonl")
    if output_path.resolve() == input_path.resolve():
        raise DataError(f"--output is the input {input_path}: write the copies to a file of their own")
    if output_path.exists() and not force:
        raise DataError(f"{output_path} exists; pass --force to overwrite it")
    count = 0
    with (
        atomic_path(output_path) as tmp,
        open(tmp, "w", encoding="utf-8") as out,
        open(input_path, encoding="utf-8") as source,
    ):
        for number, line in enumerate(tqdm(source, desc="double blocks", unit="doc"), 1):
            try:
                document = json.loads(line)
                text, doc_id = document["text"], str(document.get("id", number))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{input_path}:{number} is not a JSON object with a \"text\" field") from None
            document["text"] = with_blocks_doubled(text, doc_id, max_lines, seed)
            out.write(json.dumps(document) + "\n")
            count += 1
    return count
