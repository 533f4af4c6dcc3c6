"""kNN-augmented attention inside a real Megatron-Core GPTModel (one process, TP=PP=DP=1)."""

import math

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_memorizing.data import Batch
from megatron_memorizing.knn_attention import KNNAttention, without_sinks
from megatron_memorizing.memories import ModelMemories
from megatron_memorizing.memory import Retrieved
from megatron_memorizing.model import build_model
from megatron_memorizing.observations import watch_retrievals
from megatron_memorizing.positions import RotaryPositions
from megatron_memorizing.slot_selection import SlotSelection
from megatron_memorizing.step import forward_backward

from tiny import document_batches, tiny_config


def built(config, seed=7):
    torch.manual_seed(seed)
    chunks = build_model(config)
    return chunks, ModelMemories(chunks, config.micro_batch_size)


def run_steps(chunks, memories, batches, forward_only=True):
    losses = []
    for batch in batches:
        losses.append(forward_backward(chunks, memories, batch, forward_only=forward_only).mean)
        memories.commit()
    return losses


def test_spec_puts_memory_only_in_the_configured_layer(single_rank):
    config = tiny_config()
    (model,), memories = built(config)
    kinds = [type(layer.self_attention.core_attention) for layer in model.decoder.layers]
    assert kinds == [DotProductAttention, DotProductAttention, KNNAttention, DotProductAttention]
    assert [layer.layer_number for layer in memories.knn_layers] == [3]
    assert tiny_config(num_layers=12, memory_layers=None).memory_layers == (9,)  # the paper's layer 9 of 12


def test_every_stateful_layer_reads_the_one_slot_selection_the_handle_drives(single_rank):
    config = tiny_config(xl_cache=True, micro_batch_size=2, num_micro_batches=2)
    (model,), memories = built(config)
    selections = {id(layer.slot_selection) for layer in memories.layers}
    assert len(memories.layers) == 8 and selections == {id(memories.slot_selection)}  # 4 XL self-attentions, 4 core
    memories.use_micro_batch(1)
    assert all(layer.slot_selection.slots == slice(2, 4) for layer in memories.layers)
    with memories.disabled():
        assert not memories.slot_selection.memory_enabled
    assert memories.slot_selection.memory_enabled
    with pytest.raises(IndexError, match="outside the model's 4 slots"):
        memories.use_micro_batch(2)
    (other,) = build_model(config)
    with pytest.raises(ValueError, match="do not share one SlotSelection"):
        ModelMemories([model, other], config.micro_batch_size)


def test_closed_gate_equals_stock_megatron_and_open_gate_uses_memory(single_rank):
    config = tiny_config()
    batches = document_batches(steps=3, slots=config.memory_slots, length=16, vocab=128)
    stock = run_steps(*built(tiny_config(memory_layers=())), batches)
    closed_chunks, closed_memories = built(tiny_config(gate_init=-1e4))
    closed = run_steps(closed_chunks, closed_memories, batches)
    opened = run_steps(*built(tiny_config(gate_init=0.0)), batches)

    assert closed == stock  # bitwise: sigmoid(-1e4) == 0 and the local path is stock Megatron
    assert closed_memories.knn_layers[0].memory.fill.tolist() == [40] * 4  # memory was filled and read
    assert opened[0] == stock[0]  # empty memory on a document's first segment: local attention only
    assert opened[1] != stock[1] and opened[2] != stock[2]


def _layer(rotary, num_slots=2, heads=2, head_dim=16, memory_size=32, mixing="gate", sink_tokens=0):
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads, use_cpu_initialization=True
    )
    layer = KNNAttention(
        config=config,
        layer_number=1,
        attn_mask_type=AttnMaskType.causal,
        attention_type="self",
        local_attention=ModuleSpec(module=DotProductAttention),
        slot_selection=SlotSelection(num_slots),
        rotary=dict(rotary_base=10000, rotary_percent=1.0) if rotary else None,
        memory_size=memory_size,
        top_k=4,
        gate_init=1e4,  # g = 1: the output is the memory read alone
        mixing=mixing,
        sink_tokens=sink_tokens,
    )
    with torch.no_grad():
        layer.memory_log_scale.fill_(math.log(200.0))  # a sharp softmax: the best match wins
    return config, layer


@pytest.mark.parametrize("rotary", [False, True], ids=["no-rope", "rope"])
def test_answer_only_in_memory_is_retrieved_from_its_own_slot(single_rank, rotary):
    config, layer = _layer(rotary)
    positions = RotaryPositions(config, rotary_base=10000, rotary_percent=1.0)
    rotate = positions.rotate if rotary else (lambda x: x)
    g = torch.Generator().manual_seed(0)
    s, b, h, d = 8, 2, 2, 16
    past_keys, past_values = torch.randn(s, b, h, d, generator=g), torch.randn(s, b, h, d, generator=g)

    # Segment 1 writes its keys (rotated for their positions, as SelfAttention hands them over).
    layer(rotate(torch.randn(s, b, h, d, generator=g)), rotate(past_keys), past_values, None)
    layer.memory.commit()

    # Segment 2 asks for segment 1's keys in reversed order, at other positions of the segment:
    # only the memory holds the answers, and memory keys must carry no position.
    queries = rotate(past_keys.flip(0))
    fresh = torch.randn(s, b, h, d, generator=g)
    out = layer(queries, rotate(fresh), torch.randn(s, b, h, d, generator=g), None).view(s, b, h, d)
    torch.testing.assert_close(out, past_values.flip(0), atol=1e-3, rtol=1e-3)

    # Slot 1 asking for slot 0's keys gets no slot-0 values: each slot holds its own document.
    swapped = layer(queries.flip(1), rotate(fresh), torch.randn(s, b, h, d, generator=g), None).view(s, b, h, d)
    assert not torch.allclose(swapped[:, 1], past_values.flip(0)[:, 0], atol=0.1)

    layer.memory.reset(torch.tensor([True, False]))
    after_reset = layer(queries, rotate(fresh), torch.randn(s, b, h, d, generator=g), None).view(s, b, h, d)
    torch.testing.assert_close(after_reset[:, 1], past_values.flip(0)[:, 1], atol=1e-3, rtol=1e-3)
    assert not torch.allclose(after_reset[:, 0], past_values.flip(0)[:, 0], atol=0.1)


@pytest.mark.parametrize("sink_tokens", [0, 2])
def test_sink_tokens_are_never_read_and_leave_the_top_k_to_real_matches(single_rank, sink_tokens):
    """Every key alike (all cosines positive), the segment's first keys strongly so (sinks): kept
    out, every query still gets k valid pairs, none of them a sink; a query for a pair that is not
    a sink gets its value, one for a sink does not."""
    _, layer = _layer(rotary=False, sink_tokens=sink_tokens)
    g = torch.Generator().manual_seed(3)
    s, b, h, d = 8, 2, 2, 16
    shared = torch.randn(d, generator=g)
    past_keys = shared + 0.5 * torch.randn(s, b, h, d, generator=g)
    past_keys[:2] = shared + 0.1 * torch.randn(2, b, h, d, generator=g)
    past_values = torch.randn(s, b, h, d, generator=g)
    layer(torch.randn(s, b, h, d, generator=g), past_keys, past_values, None)
    layer.memory.commit()

    seen = []
    layer.retrieval_watchers.append(lambda number, retrieved: seen.append(retrieved))
    out = layer(past_keys.flip(0), torch.randn(s, b, h, d, generator=g), torch.randn(s, b, h, d, generator=g),
                None).view(s, b, h, d).flip(0)  # row i asked for pair i
    (retrieved,) = seen
    assert retrieved.valid.sum(dim=-1).eq(layer.top_k).all()
    assert bool((retrieved.positions[retrieved.valid] < 2).any()) == (sink_tokens == 0)
    torch.testing.assert_close(out[2:], past_values[2:], atol=1e-3, rtol=1e-3)
    if sink_tokens:  # a query for a sink gets other pairs' values
        assert not torch.allclose(out[:2], past_values[:2], atol=0.1)


def test_without_sinks_keeps_the_best_k_that_start_no_segment():
    positions = torch.tensor([[0, 5, 8, 3, 16, -1]])  # segments of 8: 0, 8 and 16 start one
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, float("-inf")]])
    values = positions.float().unsqueeze(-1).expand(-1, -1, 2)
    retrieved = Retrieved(keys=values + 1, values=values, valid=positions >= 0, positions=positions, scores=scores)
    kept = without_sinks(retrieved, segment_length=8, sink_tokens=1, k=3)
    assert kept.positions.tolist() == [[5, 3, -1]] and kept.valid.tolist() == [[True, True, False]]
    assert kept.scores[0, :2].tolist() == pytest.approx([0.8, 0.6]) and kept.scores[0, 2] == float("-inf")
    assert kept.values[0, :, 0].tolist() == [5.0, 3.0, 0.0] and kept.keys[0, 2].eq(0).all()
    assert without_sinks(retrieved, 8, 4, 3).positions.tolist() == [[5, -1, -1]]  # 3 is the 4th of its segment


def test_gradients_reach_queries_and_gate_but_never_memory(single_rank):
    _, layer = _layer(rotary=True)
    with torch.no_grad():
        layer.gate_bias.zero_()
        layer.memory_log_scale.fill_(1.0)
    g = torch.Generator().manual_seed(1)
    shape = (8, 2, 2, 16)
    layer(torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g), None)
    layer.memory.commit()
    q, k, v = (torch.randn(shape, generator=g, requires_grad=True) for _ in range(3))
    layer(q, k, v, None).sum().backward()
    assert q.grad.abs().sum() > 0 and layer.gate_bias.grad.abs().sum() > 0
    assert layer.memory_log_scale.grad.abs().sum() > 0
    assert not layer.memory.keys.requires_grad and not layer.memory.values.requires_grad


def test_softmax_mixing_is_one_softmax_over_retrieved_and_local_keys(single_rank):
    """memory_mixing='softmax' with b_g = 0: the layer's output is attention with one softmax over
    the retrieved pairs (logits: scale x cosine, no positions) and the local keys (stock logits,
    causal): the memory gets the weight its matches earn against the local keys."""
    _, layer = _layer(rotary=False, mixing="softmax")
    layer.eval()  # no attention dropout
    scale = 4.0
    with torch.no_grad():
        layer.gate_bias.zero_()
        layer.memory_log_scale.fill_(math.log(scale))
    g = torch.Generator().manual_seed(2)
    s, b, h, d = 8, 2, 2, 16
    layer(*(torch.randn(s, b, h, d, generator=g) for _ in range(3)), None)
    layer.memory.commit()
    layer.take_statistics()  # the first segment's
    q, k, v = (torch.randn(s, b, h, d, generator=g) for _ in range(3))
    retrievals = []
    with watch_retrievals([layer], lambda number, retrieved: retrievals.append(retrieved)):
        out = layer(q, k, v, None).view(s, b, h, d)

    (found,) = retrievals
    assert found.valid.all()
    memory_logits = torch.einsum(
        "bhqd,bhqkd->bhqk", torch.nn.functional.normalize(q.permute(1, 2, 0, 3), dim=-1), found.keys
    ) * scale
    local_logits = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(d)
    local_logits = local_logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.softmax(torch.cat([memory_logits, local_logits], dim=-1), dim=-1)
    values = torch.cat([found.values, v.permute(1, 2, 0, 3)[:, :, None].expand(b, h, s, s, d)], dim=3)
    expected = torch.einsum("bhqk,bhqkd->bhqd", probs, values).permute(2, 0, 1, 3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # Logged as the memory's share of the output: here its share of that one softmax.
    memory_share = probs[..., : found.keys.shape[3]].sum(-1).mean()
    assert layer.take_statistics()["memory_weight"] == pytest.approx(memory_share.item(), abs=1e-5)


@pytest.mark.parametrize("recompute", ["selective", "full"])
@pytest.mark.parametrize("xl", [{}, {"xl_cache": True}], ids=["memory", "memory+xl"])
def test_recompute_gives_identical_outputs_gradients_and_memory(single_rank, recompute, xl):
    batches = document_batches(steps=3, slots=4, length=16, vocab=128)
    results = []
    for mode in ("none", recompute):
        chunks, memories = built(tiny_config(recompute=mode, **xl))
        losses = run_steps(chunks, memories, batches[:2], forward_only=False)
        for p in chunks[0].parameters():
            p.grad = None  # keep only the last step's gradients
        losses += run_steps(chunks, memories, batches[2:], forward_only=False)
        grads = {n: p.grad.clone() for n, p in chunks[0].named_parameters()}
        results.append((losses, grads, memories.state_dict()))
    (losses_a, grads_a, memory_a), (losses_b, grads_b, memory_b) = results
    assert losses_a == losses_b
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=0, msg=name)
    for name in memory_a:
        for field in memory_a[name]:
            assert torch.equal(torch.as_tensor(memory_a[name][field]), torch.as_tensor(memory_b[name][field])), name


def test_xl_cache_sees_the_previous_segment(single_rank):
    """With the XL cache, a document's second segment is predicted differently than without it."""
    batches = document_batches(steps=2, slots=4, length=16, vocab=128)
    plain = run_steps(*built(tiny_config(memory_layers=())), batches)
    chunks, memories = built(tiny_config(memory_layers=(), xl_cache=True))
    xl = run_steps(chunks, memories, batches)
    assert xl[0] == pytest.approx(plain[0], abs=1e-6)  # empty cache: same as no cache
    assert xl[1] != pytest.approx(plain[1], abs=1e-6)
    assert [name.split(".")[1] for name, _ in memories.named_memories()] == ["xl_inputs"] * 4


def one_segment_and_its_halves(length: int) -> tuple[Batch, list[Batch]]:
    """A document's first 2 * `length` tokens in every slot, as one segment and as two."""
    two = document_batches(steps=1, slots=4, length=2 * length, vocab=128)[0]
    halves = [
        Batch(tokens=two.tokens[:, part], labels=two.labels[:, part], loss_mask=two.loss_mask[:, part],
              new_document=two.new_document & (part.start == 0), document_ids=two.document_ids,
              offsets=two.offsets + part.start)
        for part in (slice(0, length), slice(length, 2 * length))
    ]
    return two, halves


def test_an_xl_cache_of_inputs_trains_the_projection_on_the_cached_segment(single_rank):
    """The cached segment is projected afresh with the current weights, as if it were read again:
    the last layer's key/value projection gets the gradient that attention over both segments read
    as one gives it, and a changed projection changes what the cached segment contributes. (The
    cached inputs themselves carry no gradient, as in Transformer-XL: hence the last layer, whose
    inputs no layer below computes differently in the two runs' backward.)"""
    length = 16
    two, halves = one_segment_and_its_halves(length)
    second_half_only = Batch(**{**vars(two), "loss_mask": torch.cat([torch.zeros_like(halves[0].loss_mask),
                                                                      halves[1].loss_mask], dim=1)})
    xl_chunks, xl_memories = built(tiny_config(memory_layers=(), xl_cache=True, segment_length=length))
    long_chunks, long_memories = built(tiny_config(memory_layers=(), segment_length=2 * length))
    run_steps(xl_chunks, xl_memories, halves[:1])

    def last_projection(chunks):
        return chunks[0].decoder.layers[-1].self_attention.linear_qkv.weight

    xl_loss = forward_backward(xl_chunks, xl_memories, halves[1], forward_only=False).mean
    long_loss = forward_backward(long_chunks, long_memories, second_half_only, forward_only=False).mean
    assert xl_loss == pytest.approx(long_loss, abs=1e-5)
    torch.testing.assert_close(last_projection(xl_chunks).grad, last_projection(long_chunks).grad, rtol=1e-4, atol=1e-6)

    before = forward_backward(xl_chunks, xl_memories, halves[1], forward_only=True).token_losses
    with torch.no_grad():  # a different projection, as after an optimizer step
        last_projection(xl_chunks).mul_(1.5)
        last_projection(long_chunks).mul_(1.5)
    changed = forward_backward(xl_chunks, xl_memories, halves[1], forward_only=True).token_losses
    long_changed = forward_backward(long_chunks, long_memories, two, forward_only=True).token_losses
    assert not torch.allclose(changed, before)
    torch.testing.assert_close(changed, long_changed[:, length:], rtol=1e-5, atol=1e-5)


def test_growing_the_memory_keeps_its_contents_and_what_they_retrieve(single_rank):
    """A memory curriculum step (small, then large) changes nothing the model already remembers."""
    config = tiny_config(memory_size=24)
    batches = document_batches(steps=4, slots=config.memory_slots, length=16, vocab=128, boundaries=())
    chunks, memories = built(config)
    run_steps(chunks, memories, batches[:3])  # 48 pairs written into 24 places: the ring wrapped
    memory = memories.knn_layers[0].memory
    keys_before, values_before, _ = memory.contents()

    memories.resize(64)
    loss_after_growing = run_steps(chunks, memories, batches[3:])
    keys, values, valid = memory.contents()  # oldest first, right-aligned: the 24 old pairs, then 16 new
    assert memory.capacity == 64 and valid.sum(dim=1).tolist() == [40] * config.memory_slots
    assert torch.equal(keys[:, :, -40:-16], keys_before) and torch.equal(values[:, :, -40:-16], values_before)

    # The step after growing searched exactly the pairs it would have searched without growing.
    assert loss_after_growing == run_steps(*built(config), batches)[3:]


def test_xl_cache_equals_attention_over_both_segments(single_rank):
    """On a document's second segment, every layer attending to the cached previous segment is
    exactly causal attention over the two segments read as one (same weights, twice the length):
    the cached keys are that longer run's keys, at the same relative (rotary) positions."""
    length = 16
    two, halves = one_segment_and_its_halves(length)
    xl_chunks, xl_memories = built(tiny_config(memory_layers=(), xl_cache=True, segment_length=length))
    xl_losses = []
    for batch in halves:
        xl_losses.append(forward_backward(xl_chunks, xl_memories, batch, forward_only=True).token_losses)
        xl_memories.commit()
    long_chunks, long_memories = built(tiny_config(memory_layers=(), segment_length=2 * length))
    long_losses = forward_backward(long_chunks, long_memories, two, forward_only=True).token_losses

    torch.testing.assert_close(torch.cat(xl_losses, dim=1), long_losses, rtol=1e-5, atol=1e-5)
