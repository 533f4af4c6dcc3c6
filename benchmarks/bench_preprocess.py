"""Preprocessing throughput on the CPython standard-library corpus, 1 and 2 worker processes.

    python benchmarks/bench_preprocess.py [--repeats 5] [--output benchmarks/results/preprocess_cpu.md]

Builds the stdlib corpus and an 8000-piece tokenizer in a temporary directory, then times
`preprocess` (read JSONL, tokenize, write .bin/.idx) on the train split. Throughput counts the
documents' UTF-8 text bytes and the tokens written. The machine's load average is recorded with
the numbers, since other processes on a 2-core machine change them a lot.
"""

import argparse
import os
import platform
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import sentencepiece

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

import megatron.core.datasets.indexed_dataset  # noqa: E402,F401  (imported here, not inside the first timed run)

from data_tools.corpus import build_corpus  # noqa: E402
from data_tools.preprocess import preprocess  # noqa: E402
from data_tools.sources import resolve_source  # noqa: E402
from data_tools.train_tokenizer import train_tokenizer  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the preprocess workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_preprocess(jsonl, tokenizer, out, workers) -> dict:
    before = cpu_seconds()
    throughput = preprocess(jsonl, tokenizer, out, workers=workers).throughput
    return dict(throughput, cpu_seconds=cpu_seconds() - before)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per worker count (default 5)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "preprocess_cpu.md",
                        help="markdown file to write the results to")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        stats = build_corpus(resolve_source("stdlib"), tmp / "corpus")
        corpus_s = time.perf_counter() - start
        start = time.perf_counter()
        tokenizer = train_tokenizer([tmp / "corpus" / "train.jsonl"], tmp / "tokenizer.model", 8000)
        tokenizer_s = time.perf_counter() - start
        runs = {workers: [] for workers in args.workers}
        for r in range(args.repeats):  # interleaved, so a burst of other load hits every setting alike
            for workers in args.workers:
                out = tmp / f"w{workers}r{r}"
                runs[workers].append(timed_preprocess(tmp / "corpus" / "train.jsonl", tokenizer.path, out, workers))
    load_after = os.getloadavg()
    shared = max(load_before[0], load_after[0]) > 0.5

    train = stats["splits"]["train"]["chars"]
    lines = [
        "# Preprocessing throughput: CPython stdlib corpus",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}, sentencepiece {sentencepiece.__version__}. Load average (1 min) "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after"
        + (": other processes shared the cores, so the best run is the fairer figure." if shared else "."),
        "",
        f"Corpus: train split, {train['count']} documents, {train['total'] / 1e6:.1f} M characters; "
        f"tokenizer: SentencePiece BPE, vocab 8000. Built in {corpus_s:.1f} s (corpus) + {tokenizer_s:.1f} s "
        "(tokenizer training).",
        "",
        f"`preprocess` (JSONL -> tokens -> .bin/.idx), {args.repeats} runs each, interleaved; median (best). "
        "CPU seconds (this process and its workers) hardly depend on other load; wall seconds do.",
        "",
        "| workers | wall seconds | MB/s | tokens/s | CPU seconds |",
        "|---|---|---|---|---|",
    ]
    for workers, results in runs.items():
        seconds = [r["seconds"] for r in results]
        mbs = [r["mb_per_s"] for r in results]
        tps = [r["tokens_per_s"] for r in results]
        cpu = [r["cpu_seconds"] for r in results]
        lines.append(
            f"| {workers} | {statistics.median(seconds):.2f} ({min(seconds):.2f}) | "
            f"{statistics.median(mbs):.2f} ({max(mbs):.2f}) | {statistics.median(tps):,.0f} ({max(tps):,.0f}) | "
            f"{statistics.median(cpu):.2f} ({min(cpu):.2f}) |"
        )
    lines += ["", "Reproduce: `python benchmarks/bench_preprocess.py`", ""]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
