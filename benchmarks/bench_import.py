"""Peak host memory and time of importing a Hugging Face Llama, against the size of its weights.

A random Llama of about `--params` parameters is written as a Hugging Face directory (config.json,
two safetensors shards with their index, a small tokenizer.json), in bfloat16 and in float32;
`megatron-memorizing-import` then runs on each in a fresh process, and its peak resident memory
(the child's ru_maxrss) is compared with the bytes of the weights it wrote.

    python benchmarks/bench_import.py --params 1e9 --out runs/bench_import

Prints a markdown table; the weights are random (the import does not care), the shapes Llama's.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_shape(params: float) -> dict:
    """A Llama-2-like shape (head dim 128, 4 query heads per KV head, SwiGLU of 8/3 x hidden) of
    about `params` parameters, vocabulary 32,000, untied."""
    vocab = 32000
    for hidden in range(1024, 16384, 512):  # heads (hidden / 128) a multiple of the 4 per KV head
        ffn = 256 * round(8 * hidden / 3 / 256)
        heads = hidden // 128
        per_layer = hidden * (hidden + 2 * hidden // 4) + hidden * hidden + 3 * hidden * ffn
        layers = round((params - 2 * vocab * hidden) / per_layer)
        if layers <= 2 * hidden // 128:
            break
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=max(layers, 1),
                num_attention_heads=heads, num_key_value_heads=heads // 4, max_position_embeddings=4096,
                rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
                model_type="llama", architectures=["LlamaForCausalLM"])


def tensor_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                   p + "mlp.down_proj.weight": (h, f)}
    return shapes


def write_model(directory: Path, shape: dict, dtype: torch.dtype) -> int:
    """The Hugging Face directory, in two shards written one at a time; returns the weights' bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**shape, "torch_dtype": str(dtype).removeprefix("torch.")}))
    names = list(tensor_shapes(shape).items())
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for number, half in enumerate(halves, 1):
        file = f"model-{number:05d}-of-00002.safetensors"
        tensors = {name: (torch.randn(size, generator=generator) * 0.02).to(dtype) for name, size in half}
        save_file(tensors, str(directory / file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map |= {name: file for name in tensors}
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    write_tokenizer(directory)
    return total


def write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([Path(__file__).read_text()], trainer)
    tokenizer.save(str(directory / "tokenizer.json"))


def timed_import(hf_dir: Path, output: Path) -> tuple[float, int]:
    """(seconds, peak resident bytes) of one import in a fresh process."""
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", "megatron_memorizing.hf.importer", "--hf-model", str(hf_dir),
               "--output", str(output), "--set", "model.segment_length=512", "--set", "model.memory_size=4096"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"error: the import failed: {result.stderr.strip().splitlines()[-1]}")
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1e9, help="parameters of the random Llama (default 1e9)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_import"),
                        help="scratch folder (removed at the end)")
    args = parser.parse_args()
    shape = llama_shape(args.params)
    rows = []
    try:
        for dtype in (torch.bfloat16, torch.float32):  # the larger last: ru_maxrss is the largest child so far
            name = str(dtype).removeprefix("torch.")
            weights = write_model(args.out / f"hf-{name}", shape, dtype)
            seconds, peak = timed_import(args.out / f"hf-{name}", args.out / f"ckpt-{name}")
            shutil.rmtree(args.out / f"ckpt-{name}")
            shutil.rmtree(args.out / f"hf-{name}")
            rows.append((name, weights, seconds, peak))
    finally:
        shutil.rmtree(args.out, ignore_errors=True)
    params = sum(torch.Size(s).numel() for s in tensor_shapes(shape).values())
    print(f"random Llama: {params / 1e9:.2f} B parameters ({shape['num_hidden_layers']} layers, hidden "
          f"{shape['hidden_size']}, {shape['num_attention_heads']} heads / {shape['num_key_value_heads']} KV, "
          f"MLP {shape['intermediate_size']}); memory at layer 3/4 depth\n")
    print("| weights | size on disk | import time | peak resident memory | peak / weights |")
    print("|---|---|---|---|---|")
    for name, weights, seconds, peak in rows:
        print(f"| {name} | {weights / 2**30:.2f} GiB | {seconds:.0f} s | {peak / 2**30:.2f} GiB "
              f"| {peak / weights:.2f}x |")


if __name__ == "__main__":
    main()
