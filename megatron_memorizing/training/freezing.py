"""Training only the top of a model: the layers from `training.train_from_layer` up.

Adding memory to a pretrained model changes one layer; the layers below it can stay as they were
pretrained. Frozen, they run forward only: no gradients, no optimizer state, and backward stops
at the first trained layer, so a step costs a forward pass of the frozen part and a training
step of the rest. The embedding is frozen with them (it sits below layer 1), and so is the
output layer when it shares the embedding's weights.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel


def freeze_below(model_chunks: list[GPTModel], first_trained_layer: int) -> tuple[int, int]:
    """Freeze the embedding and every layer numbered below `first_trained_layer` (1-based, global)
    in this rank's chunks; returns (trained, total) parameter counts of these chunks."""
    for chunk in model_chunks:
        frozen: list[torch.nn.Module] = [
            layer for layer in chunk.decoder.layers if layer.layer_number < first_trained_layer
        ]
        if first_trained_layer > 1:
            if chunk.pre_process:
                frozen.append(chunk.embedding)
            if (chunk.post_process and chunk.share_embeddings_and_output_weights
                    and chunk.output_layer.weight is not None):
                frozen.append(chunk.output_layer)  # the last stage's copy of the tied embedding
        for module in frozen:
            module.requires_grad_(False)
    params = [p for chunk in model_chunks for p in chunk.parameters()]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
