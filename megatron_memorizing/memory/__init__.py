"""kNN memory for Memorizing Transformers: per-slot ring buffers with exact top-k search."""

from megatron_memorizing.memory.knn_memory import KNNMemory, Retrieved, memory_bytes

__all__ = ["KNNMemory", "Retrieved", "memory_bytes"]
