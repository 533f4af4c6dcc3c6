"""Exact top-k inner-product search over ring-buffer memories, batched over (slot, head).

Both backends return (scores [s, h, q, k] float32, indices [s, h, q, k] int64) where an index is
a ring-buffer position, or is >= fill / -1 where the slot holds fewer than k entries. Valid
entries always occupy the prefix [0, fill) of a slot's ring (see KNNMemory), which is what makes
masking a single comparison against fill.
"""

import torch

NEG_INF = float("-inf")


def torch_topk(queries, buffer, slots, fill, k, chunk_size, score_dtype):
    """Top-k of queries [s, h, q, d] against buffer[slots] [s, h, capacity, d], chunked over capacity.

    Scores are computed in score_dtype. Only `chunk_size` memory entries are scored at a
    time, so the score matrix never exceeds s*h*q*chunk_size elements; per-chunk winners are
    merged into a running top-k, which gives the same result as one big top-k.
    """
    queries = queries.to(score_dtype)
    least, most = torch.stack(fill.aminmax()).tolist()  # one device sync
    # Chunks past the fullest slot hold nothing; but scan at least k entries so the result has
    # k columns even when every slot is nearly empty (those extra columns come out masked).
    limit = max(most, k)
    best_scores = best_idx = None
    for start in range(0, limit, chunk_size):
        end = min(start + chunk_size, limit)
        keys = buffer[:, :, start:end][slots].to(score_dtype)
        scores = torch.matmul(queries, keys.transpose(-1, -2))
        if end > least:  # some slot has empty entries in this chunk
            empty = torch.arange(start, end, device=buffer.device)[None, :] >= fill[:, None]
            scores.masked_fill_(empty[:, None, None, :], NEG_INF)
        scores, idx = scores.topk(min(k, scores.shape[-1]), dim=-1)
        idx += start
        if best_scores is not None:
            scores = torch.cat([best_scores, scores], dim=-1)
            idx = torch.cat([best_idx, idx], dim=-1)
            scores, pick = scores.topk(min(k, scores.shape[-1]), dim=-1)
            idx = idx.gather(-1, pick)
        best_scores, best_idx = scores, idx
    return best_scores.float(), best_idx


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "the faiss search backend needs faiss: `pip install faiss-cpu` (or faiss-gpu-cu12 for CUDA)"
        ) from e
    return faiss


_gpu_resources = None


def faiss_topk(queries, buffer, slots, fill, k):
    """Exact brute-force top-k with faiss, one call per (slot, head) over that slot's filled prefix.

    faiss takes float32, so bf16 buffers are upcast one (slot, head) at a time.
    """
    faiss = _faiss()
    s, h, q, _ = queries.shape
    scores = torch.full((s, h, q, k), NEG_INF, dtype=torch.float32, device=queries.device)
    idx = torch.full((s, h, q, k), -1, dtype=torch.int64, device=queries.device)
    slot_ids = torch.arange(buffer.shape[0], device=buffer.device)[slots].tolist()
    queries = queries.float()
    on_gpu = queries.is_cuda
    if on_gpu:
        global _gpu_resources
        import faiss.contrib.torch_utils  # noqa: F401  (lets knn_gpu take torch CUDA tensors)
        if _gpu_resources is None:
            _gpu_resources = faiss.StandardGpuResources()
    for i, (sid, f) in enumerate(zip(slot_ids, fill.tolist())):
        kf = min(k, f)
        if kf == 0:
            continue
        for j in range(h):
            keys = buffer[sid, j, :f].float().contiguous()
            if on_gpu:
                d, n = faiss.knn_gpu(_gpu_resources, queries[i, j].contiguous(), keys,
                                     kf, metric=faiss.METRIC_INNER_PRODUCT, device=queries.device.index or 0)
            else:
                d, n = faiss.knn(queries[i, j].contiguous().numpy(), keys.numpy(),
                                 kf, metric=faiss.METRIC_INNER_PRODUCT)
                d, n = torch.from_numpy(d), torch.from_numpy(n)
            scores[i, j, :, :kf] = d
            idx[i, j, :, :kf] = n
    return scores, idx
