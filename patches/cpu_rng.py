"""Megatron-Core's model-parallel RNG tracker, with CPU generator states.

Upstream (``megatron.core.tensor_parallel.random``, checked on 0.16.1) keeps named CUDA generator
states: "model-parallel-rng" (differs across TP ranks; attention dropout always forks into it),
"data-parallel-rng" and "expert-parallel-rng". Activation recompute saves and restores the CUDA
state around the re-run forward. On a torch without CUDA the device whose generator matters is the
CPU, so the same names hold CPU generator states and the get/set helpers read the CPU generator.
"""

import contextlib

import torch
from megatron.core.tensor_parallel import random as mcore_random


def get_cpu_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Replaces ``random._get_cuda_rng_state`` (tracker fork, checkpoint/recompute RNG save)."""
    return torch.get_rng_state()


def set_cpu_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    """Replaces ``random._set_cuda_rng_state`` (tracker fork, checkpoint/recompute RNG restore)."""
    torch.set_rng_state(new_state)


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """Upstream tracker whose named states are CPU generator states.

    ``add`` seeds a private generator instead of the CUDA one. ``fork`` is rewritten because the
    upstream one warns whenever the CPU generator moved inside the fork, which on CPU is every
    fork that draws a random number.
    """

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        generator = torch.Generator()
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)
