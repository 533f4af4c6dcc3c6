"""Memorizing Transformers (Wu et al., ICLR 2022) as a Megatron-Core plugin."""

import warnings

# Megatron-Core warns at import about every fused kernel it cannot find (Apex, Transformer Engine);
# on a CPU machine that is all of them, for every command, and the torch fallbacks are what runs.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
