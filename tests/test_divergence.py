"""What counts as a diverged loss, the test every checkpoint passes before it is called good."""

import math

from megatron_memorizing.training.divergence import DivergenceGuard

VOCAB = 8000  # ln V = 8.99


def guard_after(*losses: float, factor: float = 4.0) -> DivergenceGuard:
    guard = DivergenceGuard(VOCAB, factor)
    for loss in losses:
        assert guard.problem(loss) is None
    return guard


def test_a_non_finite_loss_is_divergence_whatever_the_factor():
    for factor in (4.0, 0.0):
        for loss in (math.nan, math.inf):
            assert guard_after(factor=factor).problem(loss) == f"the loss is {loss}"


def test_a_finite_loss_far_above_the_recent_average_and_a_uniform_guess_is_divergence():
    guard = guard_after(9.1, 8.7, 8.5)
    problem = guard.problem(9.6e10)
    assert problem and "9.6e+10" in problem and "training.divergence_factor=4" in problem
    assert guard.problem(30.0) is None  # below 4x the average (~35): a spike the run may ride out


def test_a_loss_below_a_uniform_guess_is_never_divergence():
    """A model that predicts better than uniform has not lost everything: a hard batch after easy
    ones (0.5 -> 6) is not a divergence, however large the ratio."""
    assert guard_after(0.5, 0.4, 0.5).problem(6.0) is None


def test_a_diverged_loss_does_not_join_the_average():
    guard = guard_after(2.0)
    assert guard.problem(1e6) is not None
    assert guard.average == 2.0


def test_factor_zero_stops_only_on_a_non_finite_loss():
    assert guard_after(2.0, factor=0.0).problem(1e11) is None


def test_the_average_resumes_with_the_run():
    resumed = DivergenceGuard(VOCAB, 4.0)
    resumed.load_state_dict(guard_after(2.0, 2.2).state_dict())
    assert resumed.problem(50.0) is not None
    assert DivergenceGuard(VOCAB, 4.0).problem(50.0) is None  # an old checkpoint without one: no average yet
