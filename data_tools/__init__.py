"""Command-line tools that turn real long-document corpora into Megatron indexed datasets."""
