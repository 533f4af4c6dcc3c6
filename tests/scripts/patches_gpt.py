"""Stock Megatron-Core GPTModel on CPU over gloo, through Megatron's pipeline schedules.

Launched by tests/test_patches.py. For each requested case (a parallel layout plus options) it
re-initializes the parallel state with the same seed, builds a tiny GPTModel from the local layer
spec with layout-independent weights, runs one forward+backward over a fixed set of micro-batches
and records the micro-batch losses and the squared gradient norm of the whole model (so every
layout of the same model must report the same numbers). The "sgd_clip" case instead takes one
``get_megatron_optimizer`` SGD step with gradient clipping and records how far the weights moved.
"""

import argparse
import math
import re
import zlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer import TransformerConfig

from megatron_memorizing.parallel import destroy_distributed, initialize_distributed
from tests.distributed import write_result

VOCAB_SIZE = 128
SEQ_LENGTH = 32
MICRO_BATCH_SIZE = 2
NUM_MICRO_BATCHES = 4
SGD_LR = 0.5
SGD_CLIP = 0.05

# name -> layout and options. Dropout is on where a case checks that recompute replays the RNG.
CASES = {
    "tp1": dict(tp=1, pp=1),
    "tp2": dict(tp=2, pp=1),
    "tp2_dropout": dict(tp=2, pp=1, dropout=0.1),
    "tp2_dropout_selective": dict(tp=2, pp=1, dropout=0.1, recompute="selective"),
    "tp2_dropout_full": dict(tp=2, pp=1, dropout=0.1, recompute="full"),
    "pp2": dict(tp=1, pp=2),
    # Batched p2p matches each rank's two sends and two receives by order; on a ring of two stages
    # both neighbours are one peer and the interleaved schedule's tensors land in swapped buffers
    # (see patches/README.md). Unbatched p2p keeps the directions apart.
    "pp2_vpp2": dict(tp=1, pp=2, vpp=2, batch_p2p_comm=False),
    "tp2_pp2": dict(tp=2, pp=2),
    "sgd_clip": dict(tp=2, pp=1, optimizer=True),
}


def build_model_chunks(tp, pp, vpp, dropout, recompute, **config_overrides):
    config = TransformerConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        pipeline_dtype=torch.float32,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        **config_overrides,
    )
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = dict(ignore_virtual=False, vp_stage=vp_stage if vpp else None)
        chunks.append(
            GPTModel(
                config,
                get_gpt_layer_local_spec(),
                vocab_size=VOCAB_SIZE,
                max_sequence_length=SEQ_LENGTH,
                pre_process=parallel_state.is_pipeline_first_stage(**stage),
                post_process=parallel_state.is_pipeline_last_stage(**stage),
                position_embedding_type="rope",
                vp_stage=vp_stage if vpp else None,
            )
        )
    return config, chunks


def set_layout_independent_weights(chunks):
    """Redraws each weight matrix from a seed named after it, then keeps this rank's shard.

    Megatron draws initial weights from one generator stream per rank, so a pipeline stage's
    weights depend on which layers it builds. Naming each parameter by its global layer number
    and drawing the full (unsharded) tensor makes the model the same under every TP/PP/VPP
    layout. Vectors (norm weights, biases) are constant-initialized already.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        layer_numbers = [layer.layer_number for layer in chunk.decoder.layers]
        for name, param in chunk.named_parameters():
            if param.dim() < 2:
                continue
            name = re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{layer_numbers[int(m[1])]}.", name)
            full_shape = list(param.shape)
            if getattr(param, "tensor_model_parallel", False):
                full_shape[param.partition_dim] *= tp_size
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            full = torch.randn(full_shape, generator=generator) * 0.02
            if getattr(param, "tensor_model_parallel", False):
                full = full.chunk(tp_size, dim=param.partition_dim)[tp_rank]
            with torch.no_grad():
                param.copy_(full)


def micro_batches(count):
    # The same tokens on every rank, so that data-parallel replicas all see one batch.
    generator = torch.Generator().manual_seed(0)
    positions = torch.arange(SEQ_LENGTH).expand(MICRO_BATCH_SIZE, SEQ_LENGTH)
    batches = []
    for _ in range(count):
        tokens = torch.randint(VOCAB_SIZE, (MICRO_BATCH_SIZE, SEQ_LENGTH + 1), generator=generator)
        batches.append(dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], position_ids=positions))
    return batches


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        # The schedule scales the returned loss in place; report the unscaled value.
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def forward_backward(chunks, num_micro_batches):
    batches = micro_batches(num_micro_batches)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches),
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_micro_batches,
        seq_length=SEQ_LENGTH,
        micro_batch_size=MICRO_BATCH_SIZE,
    )
    return [float(step["lm loss"]) for step in losses]


def squared_norm_over_model_parallel(tensors):
    """Sum of squares of model-parallel sharded tensors, counting TP-replicated ones once."""
    total = torch.zeros(1)
    for param, tensor in tensors:
        if param_is_not_tensor_parallel_duplicate(param):
            total += tensor.double().pow(2).sum()
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return float(total)


def run_case(tp, pp, vpp=None, dropout=0.0, recompute=None, optimizer=False, **config_overrides):
    parallel_state.destroy_model_parallel()
    initialize_distributed(tp, pp, vpp, seed=1234)
    config, chunks = build_model_chunks(tp, pp, vpp, dropout, recompute, **config_overrides)
    set_layout_independent_weights(chunks)
    if not optimizer:
        losses = forward_backward(chunks, NUM_MICRO_BATCHES)
        grads = [(p, p.grad) for chunk in chunks for p in chunk.parameters() if p.grad is not None]
        return dict(losses=losses, grad_sq=squared_norm_over_model_parallel(grads))

    config.finalize_model_grads_func = finalize_model_grads
    chunks = [DistributedDataParallel(config, DistributedDataParallelConfig(), c) for c in chunks]
    sgd = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="sgd", lr=SGD_LR, weight_decay=0.0, sgd_momentum=0.0, clip_grad=SGD_CLIP
        ),
        chunks,
    )
    params = [p for chunk in chunks for p in chunk.parameters()]
    before = [p.detach().clone() for p in params]
    losses = forward_backward(chunks, NUM_MICRO_BATCHES)
    _, grad_norm, _ = sgd.step()
    step_sq = squared_norm_over_model_parallel([(p, p - b) for p, b in zip(params, before)])
    return dict(losses=losses, grad_norm=grad_norm, step_norm=math.sqrt(step_sq))


def gather(value):
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    results = {}
    for name in args.cases:
        per_rank = gather(run_case(**CASES[name]))
        # Losses exist only on the last pipeline stage; every other field is model-parallel reduced.
        results[name] = next(r for r in reversed(per_rank) if r["losses"])
    write_result(args.result, results)
    destroy_distributed()


if __name__ == "__main__":
    main()
