import sysconfig
from pathlib import Path

import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session")
def single_rank():
    """Megatron-Core parallel state for one process (TP=PP=DP=1), shared by the in-process tests."""
    from megatron_memorizing.parallel import destroy_distributed, initialize_distributed

    initialize_distributed(seed=1234)
    yield
    destroy_distributed()


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory):
    """A 400-piece SentencePiece model of Python code, trained with the project's exact settings."""
    import sentencepiece as spm

    from data_tools.train_tokenizer import EXACT_SETTINGS

    out = tmp_path_factory.mktemp("tokenizer")
    spm.SentencePieceTrainer.train(
        input=str(STDLIB / "textwrap.py"), model_prefix=str(out / "sp"), vocab_size=400, minloglevel=2,
        model_type="bpe", **EXACT_SETTINGS,
    )
    return out / "sp.model"
