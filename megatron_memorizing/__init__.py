"""Memorizing Transformers (Wu et al., ICLR 2022) as a Megatron-Core plugin."""

import logging
import warnings

# Megatron-Core warns at import about every fused kernel it cannot find (Apex, Transformer Engine);
# on a CPU machine that is all of them, for every command, and the torch fallbacks are what runs.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
# torch's CUDA build logs at import, on a machine without a GPU, that it found no CUDA runtime (the
# CPU path is what runs): a command's one line of error would come second to it.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
