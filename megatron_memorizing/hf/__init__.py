"""Hugging Face export: the converter (`convert.py`) and the self-contained transformers model,
config and tokenizer that every export carries (`trust_remote_code=True`)."""
