"""What tools watch inside a running model: each memory layer's retrievals and each layer's local
attention probabilities, through one public seam.

As ModelMemories is the handle on the layers' per-slot state, this is the handle on what they
compute: evaluation tools open a context and receive, per forward pass and layer, what they
asked for; they never set layer attributes or hook inner modules themselves. Nothing is kept
here: a large model's attention maps would not fit.

    with watch_retrievals(model_chunks, lambda layer, retrieved: ...):
        forward passes
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch

from megatron_memorizing.knn_attention import KNNAttention
from megatron_memorizing.memory import Retrieved
from megatron_memorizing.segment_attention import SegmentAttention, local_attention_logits


def _modules(model_chunks: Iterable[torch.nn.Module], kind: type) -> list:
    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, kind)]


@contextlib.contextmanager
def watch_retrievals(model_chunks: Iterable[torch.nn.Module], consume: Callable[[int, Retrieved], None]):
    """While open, every memory layer's forward pass calls `consume(layer_number, retrieved)` with
    what its search found for the micro-batch ([b, h, q, k] keys, values, scores, positions, best
    first)."""
    layers = _modules(model_chunks, KNNAttention)
    for layer in layers:
        layer.retrieval_watchers.append(consume)
    try:
        yield
    finally:
        for layer in layers:
            layer.retrieval_watchers.remove(consume)


def stock_core_attentions(model_chunks: Iterable[torch.nn.Module]) -> dict[int, torch.nn.Module]:
    """Layer number -> the stock core attention that computes its local attention (inside the
    plugin's SegmentAttention / KNNAttention where the layer has one)."""
    found = {}
    for chunk in model_chunks:
        for layer in chunk.decoder.layers:
            core = layer.self_attention.core_attention
            found[layer.layer_number] = core.local_attention if isinstance(core, SegmentAttention) else core
    return found


def softmax_scale(core_attention: torch.nn.Module) -> float:
    """The scale stock core attention gives its logits (Megatron-Core's DotProductAttention keeps
    it as `softmax_scale`; a core attention without one is refused with its name)."""
    scale = getattr(core_attention, "softmax_scale", None)
    if scale is None:
        raise TypeError(f"{type(core_attention).__name__} keeps no softmax_scale: cannot read its attention")
    return float(scale)


@contextlib.contextmanager
def watch_local_attention(model_chunks: Iterable[torch.nn.Module], consume: Callable[[int, torch.Tensor], None]):
    """While open, every forward pass calls `consume(layer_number, probabilities)` for each layer,
    with its local attention probabilities [b, h, s, t] (t = s, or cache + s with an XL cache),
    micro-batch after micro-batch, computed from the query and keys the layer's stock core
    attention receives, as that attention computes them."""
    handles = []
    for number, core in stock_core_attentions(model_chunks).items():
        def hook(module, args, kwargs, number=number, scale=softmax_scale(core)):
            query, key = args[0], args[1]
            mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
            consume(number, torch.softmax(local_attention_logits(query, key, mask, scale), dim=-1))

        handles.append(core.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
