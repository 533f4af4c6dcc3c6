"""Step time of stock Megatron GPT vs the memorizing model, side by side in one run.

For one small model, prints per memory size M: forward+backward step time (and its ratio to the
stock model's, measured in the same run, interleaved so machine noise hits both alike), the kNN
search time inside that step, and the memory bytes each rank holds. Memories are pre-filled to
M so every search scans a full memory.

    python benchmarks/bench_step.py                       # CPU defaults
    python benchmarks/bench_step.py --sizes 8192 65536 262144 --hidden 1024 --heads 8 --batch 8   # GPU
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from megatron_memorizing.config import MemorizingConfig
from megatron_memorizing.data import Batch
from megatron_memorizing.memories import ModelMemories
from megatron_memorizing.memory import memory_bytes
from megatron_memorizing.model import build_model
from megatron_memorizing.parallel import destroy_distributed, initialize_distributed
from megatron_memorizing.step import forward_backward


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(args, memory_size):
    config = MemorizingConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        vocab_size=args.vocab,
        segment_length=args.segment,
        memory_layers=None if memory_size else (),
        memory_size=memory_size or 1,
        knn_top_k=min(args.top_k, memory_size or 1),
        micro_batch_size=args.batch,
        memory_dtype=args.memory_dtype,
        bf16=args.bf16,
    )
    torch.manual_seed(0)
    chunks = build_model(config)
    if args.bf16:
        chunks = [c.bfloat16() for c in chunks]
    memories = ModelMemories(chunks, config.micro_batch_size)
    for layer in memories.knn_layers:  # a full memory of unit keys: every search scans M entries
        m = layer.memory
        shape = (m.num_slots, m.num_heads, memory_size, m.head_dim)
        m.stage(
            slice(None), F.normalize(torch.randn(shape, device=m.device), dim=-1), torch.randn(shape, device=m.device)
        )
        m.commit()
    return config, chunks, memories


def time_search(memories, args, repeats):
    layer = memories.knn_layers[0]
    m = layer.memory
    queries = F.normalize(torch.randn(m.num_slots, m.num_heads, args.segment, m.head_dim, device=m.device), dim=-1)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        m.search(queries, layer.top_k)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1536, 8192, 32768], help="memory sizes M")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--segment", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2, help="sequences (memory slots) per step")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--memory-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--bf16", action="store_true", help="bf16 model")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model (after one warm-up)")
    args = parser.parse_args()

    initialize_distributed()
    models = {0: build(args, 0), **{m: build(args, m) for m in args.sizes}}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.segment + 1), generator=g).to(device)
    batch = Batch(
        tokens=tokens[:, :-1],
        labels=tokens[:, 1:],
        loss_mask=torch.ones(args.batch, args.segment, device=device),
        new_document=torch.zeros(args.batch, dtype=torch.bool, device=device),
        document_ids=torch.arange(args.batch, device=device),
        offsets=torch.zeros(args.batch, dtype=torch.int64, device=device),
    )

    step_times = {m: [] for m in models}
    for round_ in range(args.repeats + 1):  # round 0 warms up; models interleave within a round
        for m, (_, chunks, memories) in models.items():
            sync()
            start = time.perf_counter()
            forward_backward(chunks, memories, batch)
            sync()
            if round_:
                step_times[m].append(time.perf_counter() - start)
            for c in chunks:
                c.zero_grad(set_to_none=True)

    stock = statistics.median(step_times[0])
    head_dim = args.hidden // args.heads
    print(
        f"device={device} layers={args.layers} hidden={args.hidden} heads={args.heads} segment={args.segment} "
        f"batch={args.batch} k={args.top_k} memory_dtype={args.memory_dtype} bf16={args.bf16} repeats={args.repeats}"
    )
    print("| memory M | step time (s) | ratio to stock | kNN search per step (s) | memory bytes per rank |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| stock GPT | {stock:.3f} | 1.00 | - | 0 |")
    for m in args.sizes:
        config, _, memories = models[m]
        step = statistics.median(step_times[m])
        search = time_search(memories, args, args.repeats)
        nbytes = memory_bytes(config.memory_slots, args.heads, m, head_dim, config.torch_memory_dtype)
        assert nbytes == memories.nbytes
        print(f"| {m:,} | {step:.3f} | {step / stock:.2f} | {search:.3f} | {nbytes / 2**20:,.1f} MiB |")
    destroy_distributed()


if __name__ == "__main__":
    main()
