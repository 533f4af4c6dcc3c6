"""DeepSpeed on CPU: skip the shared-memory collective op that each process JIT-compiles.

On the CPU accelerator, ``deepspeed.comm.torch.TorchBackend.__init__`` calls ``build_shm_op()``,
which compiles the ``deepspeed_shm_comm`` C++ op (30-90 s per process on 2 cores) when
``deepspeed.ops.__compatible_ops__`` marks it compatible. gloo collectives work without it; the
op only speeds up intra-node all-reduce. Checked on deepspeed 0.19.8.
"""

import warnings

SHM_COMM_OP_NAME = "deepspeed_shm_comm"


def skip_deepspeed_shm_comm_build() -> bool:
    """Marks DeepSpeed's shared-memory comm op incompatible so that it is never built.

    Call before ``deepspeed.initialize``/``deepspeed.init_distributed``. Returns whether the switch
    was found and set; on a DeepSpeed whose internals moved it warns and changes nothing.
    """
    import deepspeed.ops

    try:
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
    except ImportError:
        ShareMemCommBuilder = None
    compatible_ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if (
        getattr(ShareMemCommBuilder, "NAME", None) != SHM_COMM_OP_NAME
        or not isinstance(compatible_ops, dict)
        or SHM_COMM_OP_NAME not in compatible_ops
    ):
        warnings.warn(
            "DeepSpeed's shared-memory comm op switch was not found; it may be compiled on first "
            "use (tens of seconds per process on CPU).",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    compatible_ops[SHM_COMM_OP_NAME] = False
    return True
