"""Errors raised on bad data, each message naming the problem and how to fix it."""


class DataError(ValueError):
    """Base class: the data, tokenizer or stream state cannot be used as given."""


class CorruptDatasetError(DataError):
    """An indexed dataset (.bin/.idx) is missing, truncated or not in Megatron's format."""


class TokenizerError(DataError):
    """A tokenizer model is missing or unreadable."""


class IncompatibleError(DataError):
    """Dataset, tokenizer, model or saved stream state do not belong together."""
