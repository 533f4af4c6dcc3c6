"""Compatibility patches for Megatron-Core and DeepSpeed on a torch without CUDA.

``apply_cpu_patches()`` is the one entry point for Megatron-Core; it is a no-op when CUDA is
available, so GPU runs use Megatron-Core unmodified. patches/README.md lists every patch.
"""

import torch

from patches.deepspeed_cpu import skip_deepspeed_shm_comm_build
from patches.versions import ALLOW_UNTESTED_ENV, SUPPORTED_MEGATRON_CORE_VERSIONS, check_megatron_core_version

__all__ = [
    "ALLOW_UNTESTED_ENV",
    "SUPPORTED_MEGATRON_CORE_VERSIONS",
    "apply_cpu_patches",
    "check_megatron_core_version",
    "skip_deepspeed_shm_comm_build",
]

_applied = False


def apply_cpu_patches() -> bool:
    """Patches Megatron-Core to run on the CPU over gloo; returns whether patches are in effect.

    Idempotent. With CUDA available it changes nothing and returns False. Raises RuntimeError on
    a megatron-core release the patches were not checked against (``check_megatron_core_version``).
    Call it before building models or seeding Megatron's RNG tracker.
    """
    global _applied
    if torch.cuda.is_available():
        return False
    if not _applied:
        check_megatron_core_version()
        from patches.megatron_cpu import MEGATRON_CPU_PATCHES

        for patch in MEGATRON_CPU_PATCHES:
            patch()
        _applied = True
    return True
