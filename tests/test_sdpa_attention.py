"""model.core_attention=sdpa: PyTorch's fused attention in place of Megatron's DotProductAttention,
the same model (same parameters, losses, gradients and memory) computed another way."""

import pytest
import torch

from megatron_memorizing.knn_attention import KNNAttention
from megatron_memorizing.memories import ModelMemories
from megatron_memorizing.model import build_model
from megatron_memorizing.sdpa_attention import SDPAttention
from megatron_memorizing.step import forward_backward

from tiny import document_batches, tiny_config


def test_every_layer_computes_its_local_attention_with_sdpa(single_rank):
    (model,) = build_model(tiny_config(core_attention="sdpa"))
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    assert [type(core) for core in cores] == [SDPAttention, SDPAttention, KNNAttention, SDPAttention]
    assert type(cores[2].local_attention) is SDPAttention  # the memory layer's local attention too


@pytest.mark.parametrize("variant", [{}, {"xl_cache": True}, {"num_query_groups": 2, "memory_mixing": "softmax"}],
                         ids=["memory", "memory+xl", "gqa+softmax-mixing"])
def test_sdpa_trains_the_same_model_as_the_stock_attention(single_rank, variant):
    """Three training steps over documents that continue across steps (the memory and the XL cache
    carry over): the same losses, gradients and memory contents within float rounding."""
    batches = document_batches(steps=3, slots=4, length=16, vocab=128)
    results = []
    for core_attention in ("stock", "sdpa"):
        config = tiny_config(core_attention=core_attention, **variant)
        torch.manual_seed(7)
        chunks = build_model(config)
        memories = ModelMemories(chunks, config.micro_batch_size)
        weights = {name: p.detach().clone() for name, p in chunks[0].named_parameters()}
        losses = []
        for batch in batches:
            for p in chunks[0].parameters():
                p.grad = None
            losses.append(forward_backward(chunks, memories, batch).mean)
            memories.commit()
        grads = {name: p.grad.clone() for name, p in chunks[0].named_parameters()}
        results.append((weights, losses, grads, memories.state_dict()))
    (weights_a, losses_a, grads_a, memory_a), (weights_b, losses_b, grads_b, memory_b) = results
    assert weights_a.keys() == weights_b.keys()  # one checkpoint layout for both
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)
    assert losses_b == pytest.approx(losses_a, rel=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5, msg=name)
    for name in memory_a:
        for field in memory_a[name]:
            a, b = torch.as_tensor(memory_a[name][field]), torch.as_tensor(memory_b[name][field])
            torch.testing.assert_close(b.float(), a.float(), rtol=1e-4, atol=1e-5, msg=f"{name}.{field}")
