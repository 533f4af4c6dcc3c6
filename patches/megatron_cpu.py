"""Patches that let Megatron-Core run on a torch without CUDA, over gloo.

Each patch names the upstream call sites it covers; all were checked against the megatron-core
releases in ``patches.versions.SUPPORTED_MEGATRON_CORE_VERSIONS`` (see patches/README.md for the
table of failures and fixes). Nothing here touches ``torch`` itself.
"""

import functools
import importlib
from typing import List, Union

import torch

from patches.cpu_device import bind_cpu_device_torch

# Module -> the functions in it that ask for the CUDA device (checked on 0.16.1).
CUDA_DEVICE_CALL_SITES = {
    "megatron.core.utils": "GlobalMemoryBuffer.get_tensor (attention scores, TP all-gather "
    "buffers); local_multi_tensor_l2_norm (grad norm without Apex/TE)",
    "megatron.core.timers": "Timer.start/stop/elapsed (synchronize), "
    "Timers._get_elapsed_time_all_ranks",
    "megatron.core.rerun_state_machine": "RerunStateMachine.validate_result, _reduce_any",
    "megatron.core.tensor_parallel.layers": "ColumnParallelLinear/RowParallelLinear/"
    "VocabParallelEmbedding.__init__, LinearWithGradAccumulationAndAsyncCommunication.backward",
    "megatron.core.tensor_parallel.mappings": "_gather_along_first_dim, _gather_along_last_dim, "
    "_reduce_scatter_along_first_dim",
    "megatron.core.tensor_parallel.data": "broadcast_data, _build_key_size_numel_dictionaries",
    "megatron.core.tensor_parallel.utils": "split_tensor_into_1d_equal_chunks, "
    "gather_split_1d_tensor (recompute with distribute_saved_activations)",
    "megatron.core.transformer.module": "MegatronModule.get_layer_static_inputs",
    "megatron.core.transformer.transformer_layer": "TransformerLayer.get_layer_static_inputs, "
    "get_zero_attention_mask",
    "megatron.core.transformer.attention": "Attention._allocate_memory (inference KV cache)",
    "megatron.core.transformer.dot_product_attention": "DotProductAttention.__init__",
    "megatron.core.transformer.utils": "get_default_causal_mask, get_sliding_window_causal_mask",
    "megatron.core.models.gpt.gpt_model": "GPTModel._preprocess (RoPE positions)",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "RotaryEmbedding.__init__, "
    "RotaryEmbedding.get_emb",
    "megatron.core.pipeline_parallel.schedules": "forward_backward_no_pipelining, "
    "forward_backward_pipelining_with/without_interleaving (total_num_tokens)",
    "megatron.core.pipeline_parallel.p2p_communication": "_communicate, _communicate_shapes, "
    "create_tensor_recv_prev/next (receive buffers; synchronize after batched p2p)",
    "megatron.core.distributed.distributed_data_parallel": "DistributedDataParallel.__init__, "
    "_allocate_buffers_for_parameters",
    "megatron.core.distributed.param_and_grad_buffer": "_ParamAndGradBuffer.__init__; "
    "_ParamAndGradBucketGroup.start_grad_sync/finish_grad_sync (0.19: current_stream waits)",
    "megatron.core.optimizer.optimizer": "MixedPrecisionOptimizer/FP32Optimizer.__init__ "
    "(found_inf, _scale), get_loss_scale",
    "megatron.core.optimizer.clip_grads": "get_grad_norm_fp32, count_zeros_fp32",
    "megatron.core.optimizer.grad_scaler": "ConstantGradScaler/DynamicGradScaler.__init__",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "FileSystemWriterAsync."
    "preload_tensors (synchronize after the device-to-host copy of a checkpoint save)",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "save_state_dict_async_plan "
    "(verify_reuse all-reduce), save_state_dict_async_finalize (node failure all-reduce)",
    "megatron.core.dist_checkpointing.strategies.async_utils": "AsyncRequest/AsyncCallsQueue "
    "(is-alive and call-index all-reduces, synchronize)",
}


def patch_cuda_device_call_sites() -> None:
    """Gives each module in ``CUDA_DEVICE_CALL_SITES`` a ``torch`` whose "cuda" is the CPU.

    Failure without it: "Torch not compiled with CUDA enabled" from the first call site reached
    (``torch.cuda.current_device()``, ``device="cuda"``, ``torch.cuda.synchronize()``).
    """
    for module_name in CUDA_DEVICE_CALL_SITES:
        bind_cpu_device_torch(importlib.import_module(module_name))


def patch_rng_tracker() -> None:
    """Makes ``megatron.core.tensor_parallel.random`` keep CPU generator states.

    Call sites: ``model_parallel_cuda_manual_seed`` -> ``initialize_rng_tracker`` builds the
    module's ``CudaRNGStatesTracker``, whose ``add`` reads the CUDA generator; ``fork``
    (attention dropout, always) and ``_get_all_rng_states``/``_set_all_rng_states`` (activation
    recompute: ``CheckpointFunction``, ``CheckpointWithoutOutput``) call the module-level
    ``_get_cuda_rng_state``/``_set_cuda_rng_state``.

    On CPU, ``model_parallel_cuda_manual_seed`` still calls ``torch.cuda.manual_seed``, which a
    torch without CUDA only queues; the CPU default generator is seeded by the caller instead
    (``megatron_memorizing.parallel.initialize_distributed`` does).
    """
    from megatron.core.tensor_parallel import random as mcore_random

    from patches.cpu_rng import CpuRNGStatesTracker, get_cpu_rng_state, set_cpu_rng_state

    mcore_random._get_cuda_rng_state = get_cpu_rng_state
    mcore_random._set_cuda_rng_state = set_cpu_rng_state
    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    # A tracker built before the patch holds CUDA states; the next seeding must rebuild it.
    if mcore_random._CUDA_RNG_STATE_TRACKER is not None and not isinstance(
        mcore_random._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker
    ):
        mcore_random._CUDA_RNG_STATE_TRACKER = None
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


def clip_grad_by_total_norm(
    parameters: Union[List[torch.Tensor], torch.Tensor],
    max_norm: Union[int, float],
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """Scales gradients in place so that their total norm is at most ``max_norm``.

    Same contract as ``megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32``, without
    its assertion that every gradient is a ``torch.cuda.FloatTensor``.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grad_attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, grad_attr, None) for p in parameters]
    grads = [g.detach() for g in grads if g is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def patch_clip_grads() -> None:
    """Gives ``megatron.core.optimizer.optimizer`` a clip function without the CUDA assertion.

    Call site: ``MegatronOptimizer.clip_grad_norm`` (every ``get_megatron_optimizer`` optimizer
    with ``clip_grad > 0``). Failure: ``assert param.grad.type() == 'torch.cuda.FloatTensor'``.
    """
    from megatron.core.optimizer import optimizer as mcore_optimizer

    mcore_optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm


def patch_tied_embedding_sync() -> None:
    """Sums the tied word-embedding copies across pipeline stages without ``Tensor.cuda()``.

    Call site: ``LanguageModule.setup_embeddings_and_output_layer`` (``GPTModel.__init__``) with
    ``share_embeddings_and_output_weights=True`` and PP > 1, on the first and last stages. Failure:
    ``weight.data = weight.data.cuda()`` ("Torch not compiled with CUDA enabled") before the
    all-reduce that gives the last stage's copy the first stage's initial values.
    """
    from megatron.core.models.common.language_module.language_module import LanguageModule

    upstream = LanguageModule.setup_embeddings_and_output_layer
    if getattr(upstream, "cpu_patched", False):
        return

    @functools.wraps(upstream)
    def setup_embeddings_and_output_layer(self) -> None:
        if not (torch.distributed.is_initialized() and self._is_in_embd_group()):
            return upstream(self)
        # Upstream, told this rank is outside the embedding group, does all but the .cuda() and sum.
        self._is_in_embd_group = lambda: False
        try:
            upstream(self)
        finally:
            del self._is_in_embd_group
        # The sum, under upstream's condition for a copy to exist.
        tied = self.share_embeddings_and_output_weights or getattr(self.config, "mtp_num_layers", 0)
        if tied and self.config.pipeline_model_parallel_size > 1:
            weight = self.shared_embedding_or_output_weight()
            torch.distributed.all_reduce(weight.data, group=self.embd_group)

    setup_embeddings_and_output_layer.cpu_patched = True
    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


MEGATRON_CPU_PATCHES = (
    patch_cuda_device_call_sites,
    patch_rng_tracker,
    patch_clip_grads,
    patch_tied_embedding_sync,
)
