"""TP, PP, DP and TP x PP give the losses of one process, with memory filled and reset across steps
and the XL cache on (every layer keeps, per rank and slot, the previous segment's inputs).

Each layout is a torchrun launch of tests/scripts/parity_train.py on CPU ranks (gloo). The
reference (one process) writes the initial weights as a dist_checkpointing checkpoint; every
other layout loads them resharded, so all start equal and must stay equal.
"""

import pytest

from distributed import SCRIPTS, run_torchrun

SCRIPT = SCRIPTS / "parity_train.py"
TOLERANCE = dict(rel=1e-5, abs=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    init = tmp_path_factory.mktemp("parity") / "init"
    result = run_torchrun(SCRIPT, 1, ["--init-checkpoint", str(init)])
    return init, result


@pytest.mark.parametrize(
    "nproc, layout",
    [
        (2, ["--tp", "2"]),
        # PP with full recompute and 2 micro-batches per stage: backward (and its recomputed
        # forward) of micro-batch j runs after the forward of j+1, on the right memory slots.
        (2, ["--pp", "2", "--recompute", "full"]),
        (2, []),  # DP=2: each rank streams (and remembers) its own half of the slots
    ],
    ids=["TP2", "PP2-recompute", "DP2"],
)
def test_layout_matches_single_process(reference, nproc, layout):
    init, expected = reference
    got = run_torchrun(SCRIPT, nproc, [*layout, "--init-checkpoint", str(init)])
    assert got["losses"] == pytest.approx(expected["losses"], **TOLERANCE)
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], **TOLERANCE)


def test_tp2_pp2_matches_and_its_checkpoint_loads_at_tp1(reference, tmp_path):
    init, expected = reference
    saved = tmp_path / "tp2pp2"
    got = run_torchrun(
        SCRIPT, 4, ["--tp", "2", "--pp", "2", "--init-checkpoint", str(init), "--save-checkpoint", str(saved)]
    )
    assert got["losses"] == pytest.approx(expected["losses"], **TOLERANCE)
    # The memory filled (wrapping its 40-entry ring) and slot 1 restarted at step 3 (2 segments of 16 since).
    assert got["memory_fill"] == [[40, 32, 40, 40]] == expected["memory_fill"]

    reloaded = run_torchrun(SCRIPT, 1, ["--init-checkpoint", str(saved), "--eval-only"])
    assert reloaded["eval_loss"] == pytest.approx(got["eval_loss"], **TOLERANCE)
    assert reloaded["eval_loss"] == pytest.approx(expected["eval_loss"], **TOLERANCE)
