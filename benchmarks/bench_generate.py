"""Generation with memory over a long document, against the plain model reading what its own window holds.

The memorizing export reads the whole document (segment by segment, filling its kNN memory), then
generates; the plain Hugging Face model reads the document's last tokens up to its context length
(max_position_embeddings, less the tokens to generate) and generates with transformers' KV cache.
Both greedy, with plain transformers (the memorizing model through trust_remote_code).

    python benchmarks/bench_generate.py --memorizing exports/smollm2-memory \
        --plain models/smollm2-135m-instruct --documents data/stdlib-dirs-smollm2/corpus/validation-long.jsonl

Prefill is one forward over the prompt (generate with one new token); decode is the rest of
generate, per generated token. Prints a markdown table.
"""

import argparse
import json
import time
from pathlib import Path

import torch
import transformers


def long_document(path: Path, tokenizer, tokens: int) -> torch.Tensor:
    """The first `tokens` tokens of the first document in JSONL `path` that has that many."""
    with path.open() as lines:
        for line in lines:
            ids = tokenizer(json.loads(line)["text"], add_special_tokens=False).input_ids
            if len(ids) >= tokens:
                return torch.tensor([ids[:tokens]])
    raise SystemExit(f"error: no document in {path} has {tokens:,} tokens: pass a smaller --document-tokens")


@torch.no_grad()
def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token) of greedy generation after `ids`."""
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return prefill, (time.perf_counter() - start - prefill) / (new_tokens - 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memorizing", type=Path, required=True, help="an export with memory (remote code)")
    parser.add_argument("--plain", type=Path, required=True, help="the plain Hugging Face model it was imported from")
    parser.add_argument("--documents", type=Path, required=True, help="JSONL documents (text field)")
    parser.add_argument("--document-tokens", type=int, default=20_000)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both models' weights")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.plain)
    ids = long_document(args.documents, tokenizer, args.document_tokens)
    dtype = getattr(torch, args.dtype)
    memorizing = transformers.AutoModelForCausalLM.from_pretrained(args.memorizing, trust_remote_code=True, dtype=dtype)
    plain = transformers.AutoModelForCausalLM.from_pretrained(args.plain, dtype=dtype)
    memorizing.eval(), plain.eval()
    window = plain.config.max_position_embeddings - args.new_tokens

    rows = []
    for name, model, prompt in (
        (f"memorizing (memory {memorizing.config.memory_size:,}, segment {memorizing.config.segment_length})",
         memorizing, ids),
        (f"plain, its own window ({window:,} tokens, KV cache)", plain, ids[:, -window:]),
    ):
        prefill, per_token = timed_generate(model, prompt, args.new_tokens)
        rows.append(f"| {name} | {prompt.shape[1]:,} | {prefill:.1f} | {prompt.shape[1] / prefill:,.0f} | "
                    f"{1 / per_token:.1f} |")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, {args.dtype}, "
          f"document of {ids.shape[1]:,} tokens, {args.new_tokens} new tokens, greedy\n")
    print("| model | prompt tokens read | prefill s | prefill tokens/s | decode tokens/s |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
