import pytest


@pytest.fixture(scope="session")
def single_rank():
    """Megatron-Core parallel state for one process (TP=PP=DP=1), shared by the in-process tests."""
    from megatron_memorizing.parallel import destroy_distributed, initialize_distributed

    initialize_distributed(seed=1234)
    yield
    destroy_distributed()
