"""Memorizing Transformers (Wu et al., ICLR 2022) as a Megatron-Core plugin."""
