"""A stand-in for the name ``torch`` inside chosen Megatron-Core modules: "cuda" means the CPU.

Megatron-Core asks torch for the CUDA device in some sixty places: ``torch.cuda.current_device()``
as a ``device=`` argument, ``device="cuda"`` literals in tensor factories, and
``torch.cuda.synchronize()``. On a torch without CUDA each of those raises.

Rather than change ``torch`` itself (which DeepSpeed, the plugin and user code share), each
patched Megatron module gets its own module-global ``torch`` bound to a ``CpuDeviceTorch``: it
forwards every attribute to the real torch, except that tensor factories send a CUDA ``device=``
to the CPU, and ``torch.cuda`` answers ``current_device()`` with the CPU device, makes
``synchronize()`` a no-op and hands out a CPU "stream" whose waits are no-ops. Code outside the
patched modules sees the real torch.
"""

import functools
import types

import torch

_CPU = torch.device("cpu")

# Factories that Megatron-Core calls with device="cuda" or device=torch.cuda.current_device().
_FACTORIES = (
    "arange",
    "empty",
    "empty_like",
    "full",
    "full_like",
    "ones",
    "ones_like",
    "rand",
    "randn",
    "tensor",
    "zeros",
    "zeros_like",
)


def _to_cpu_if_cuda(device):
    # An int device means a CUDA index to torch.
    if isinstance(device, int):
        return _CPU
    if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
        return _CPU
    return device


def _cpu_factory(factory):
    @functools.wraps(factory)
    def create(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_if_cuda(kwargs["device"])
        return factory(*args, **kwargs)

    return create


class CpuDeviceCuda(types.ModuleType):
    """``torch.cuda`` as seen from a patched module."""

    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return _CPU

    @staticmethod
    def synchronize(device=None):
        # CPU kernels run synchronously; there is nothing to wait for.
        return None

    @staticmethod
    def current_stream(device=None):
        return _CPU_STREAM


class _CpuStream:
    """The one CPU "stream": work on it is already done when the call returns, so waiting on an
    event or another stream is a no-op (megatron-core 0.19 orders gradient all-reduces this way)."""

    def wait_event(self, event):
        return None

    def wait_stream(self, stream):
        return None


_CPU_STREAM = _CpuStream()


class CpuDeviceTorch(types.ModuleType):
    """``torch`` as seen from a patched module."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = CpuDeviceCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


CPU_DEVICE_TORCH = CpuDeviceTorch()


def bind_cpu_device_torch(module: types.ModuleType) -> None:
    """Makes ``module``'s global ``torch`` the CPU stand-in (idempotent)."""
    if module.torch is not CPU_DEVICE_TORCH:
        if module.torch is not torch:
            raise RuntimeError(f"{module.__name__}.torch is neither torch nor the CPU stand-in")
        module.torch = CPU_DEVICE_TORCH
