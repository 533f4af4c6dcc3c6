"""Local attention, Megatron's DotProductAttention against `model.core_attention=sdpa`, side by side.

For each segment length: forward and forward+backward time of one layer's core attention (the
same query, key and value, the two measured one right after the other), their ratio, and the
largest difference between the two outputs. DotProductAttention writes out heads x s x s scores
per sequence (the last column); scaled_dot_product_attention works in tiles.

    OMP_NUM_THREADS=1 python benchmarks/bench_core_attention.py        # SmolLM2-135M's heads, CPU
    python benchmarks/bench_core_attention.py --lengths 2048 8192 32768 --heads 32 --groups 8 --head-dim 128
"""

import argparse
import statistics
import time

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_memorizing.config import MemorizingConfig
from megatron_memorizing.parallel import destroy_distributed, initialize_distributed
from megatron_memorizing.sdpa_attention import SDPAttention


def timed(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192], help="segment lengths")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--groups", type=int, default=3, help="key/value heads (grouped-query attention)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    initialize_distributed()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = MemorizingConfig(num_layers=1, hidden_size=args.heads * args.head_dim, num_attention_heads=args.heads,
                              num_query_groups=args.groups, memory_layers=()).transformer_config()
    stock, fused = (kind(config, 1, AttnMaskType.causal, "self") for kind in (DotProductAttention, SDPAttention))
    print(f"device={device} heads={args.heads} key/value heads={args.groups} head_dim={args.head_dim} batch=1 "
          f"fp32 threads={torch.get_num_threads()} repeats={args.repeats}")
    print("| segment | stock forward (s) | sdpa forward (s) | ratio | stock fwd+bwd (s) | sdpa fwd+bwd (s) | ratio "
          "| max difference | stock scores |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for length in args.lengths:
        q = torch.randn(length, 1, args.heads, args.head_dim, generator=g).to(device).requires_grad_()
        k, v = (torch.randn(length, 1, args.groups, args.head_dim, generator=g).to(device).requires_grad_()
                for _ in range(2))
        with torch.no_grad():
            difference = (stock(q, k, v, None) - fused(q, k, v, None)).abs().max().item()
        row = [f"{length:,}"]
        forward, both = {}, {}
        for name, module in (("stock", stock), ("sdpa", fused)):
            with torch.no_grad():
                forward[name] = timed(lambda: module(q, k, v, None), args.repeats)
            both[name] = timed(lambda: module(q, k, v, None).sum().backward(), args.repeats)
        row += [f"{forward['stock']:.3f}", f"{forward['sdpa']:.3f}", f"{forward['stock'] / forward['sdpa']:.1f}x",
                f"{both['stock']:.3f}", f"{both['sdpa']:.3f}", f"{both['stock'] / both['sdpa']:.1f}x",
                f"{difference:.1e}", f"{args.heads * length * length * 4 / 2**20:,.0f} MiB"]
        print("| " + " | ".join(row) + " |")
    destroy_distributed()


if __name__ == "__main__":
    main()
