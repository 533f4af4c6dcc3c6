"""The optimizer backends: DeepSpeed ZeRO-1/2 and Megatron's optimizer train alike on every layout.

Each launch of tests/scripts/optim_train.py trains the tiny memorizing model (tied embeddings,
memory filling and wrapping, a document boundary at step 3) with AdamW and gradient clipping
active (the first norms exceed clip_grad=1). The one-process launch writes the initial weights
that every other launch loads, resharded, so all layouts must give the same losses.
"""

import pytest
import torch

from megatron_memorizing.config import ConfigError
from megatron_memorizing.run.config import OptimizerConfig, RunConfig

from distributed import SCRIPTS, run_torchrun
from tiny import tiny_config

SCRIPT = SCRIPTS / "optim_train.py"
# Across layouts only the order of floating-point sums differs.
LAYOUT_TOLERANCE = dict(rel=2e-6, abs=2e-6)
# DeepSpeed vs Megatron: the same torch AdamW; ZeRO's flat partitions and Megatron's per-parameter
# update agree elementwise, and the clipping factors are computed alike (up to rounding).
BACKEND_TOLERANCE = dict(rel=1e-5, abs=1e-5)


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory):
    init = tmp_path_factory.mktemp("optim") / "init"
    cases = ["deepspeed:1", "megatron", "deepspeed:1/10", "megatron/10"]
    result = run_torchrun(
        SCRIPT, 1, [arg for case in cases for arg in ("--case", case)] + ["--init-checkpoint", str(init)]
    )
    return init, result


def test_single_rank_backends_agree_and_clip(single_rank):
    _, result = single_rank
    deepspeed, megatron = result["deepspeed:1"], result["megatron"]
    assert deepspeed["grad_norms"][0] > 1.0  # clipping was active
    assert deepspeed["grad_norms"] == pytest.approx(megatron["grad_norms"], **BACKEND_TOLERANCE)
    assert deepspeed["losses"] == pytest.approx(megatron["losses"], **BACKEND_TOLERANCE)
    assert deepspeed["losses"][0] != deepspeed["losses"][1]  # the weights moved


@pytest.mark.parametrize("backend", ["deepspeed:1", "megatron"])
def test_memory_scalars_lr_mult_speeds_only_the_memory_scalars(single_rank, backend):
    _, result = single_rank
    plain, faster = result[backend], result[f"{backend}/10"]
    assert plain["memory_scalars_travel"] > 0
    # Adam moves a parameter by about lr per step: ten times the rate, about ten times the distance.
    assert 9 < faster["memory_scalars_travel"] / plain["memory_scalars_travel"] < 11
    assert faster["other_travel"] == pytest.approx(plain["other_travel"], rel=0.01)
    assert faster["losses"][0] == plain["losses"][0] and faster["losses"][-1] != plain["losses"][-1]


def test_data_parallel_matches_single_rank_and_resumes_exactly(single_rank, tmp_path):
    init, expected = single_rank
    got = run_torchrun(
        SCRIPT,
        2,
        [
            *("--case", "deepspeed:1", "--case", "deepspeed:2", "--case", "megatron"),
            *("--resume-at", "3", "--work-dir", str(tmp_path), "--init-checkpoint", str(init)),
        ],
    )
    reference = {"deepspeed:1": "deepspeed:1", "deepspeed:2": "deepspeed:1", "megatron": "megatron"}
    for case, run in got.items():
        want = expected[reference[case]]
        assert run["losses"] == pytest.approx(want["losses"], **LAYOUT_TOLERANCE), case
        assert run["grad_norms"] == pytest.approx(want["grad_norms"][:3], **LAYOUT_TOLERANCE), case
        # Saved after step 3, reloaded into a fresh model and backend: the same bits as going on.
        assert run["resumed_losses"] == run["losses"][3:], case
        if case.startswith("deepspeed"):
            assert "other module weights" in run["mismatch_refused"], case


def test_tp2_pp2_matches_single_rank(single_rank):
    init, expected = single_rank
    got = run_torchrun(
        SCRIPT, 4,
        ["--tp", "2", "--pp", "2", "--case", "deepspeed:1", "--case", "megatron", "--init-checkpoint", str(init)]
    )
    for case in ("deepspeed:1", "megatron"):
        assert got[case]["losses"] == pytest.approx(expected[case]["losses"], **LAYOUT_TOLERANCE), case
        # The tied embedding's copy on the last stage is counted once, as on one rank.
        assert got[case]["grad_norms"] == pytest.approx(expected[case]["grad_norms"], **LAYOUT_TOLERANCE), case


@pytest.mark.parametrize(
    "backend, zero_stage, model, message",
    [
        ("deepspeed", 1, dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
         "virtual_pipeline"),
        ("deepspeed", 0, {}, "zero_stage=0"),
        ("deepspeed", 3, {}, "zero_stage=3"),
        pytest.param(
            "megatron", 1, dict(bf16=True), "needs CUDA",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="Megatron's bf16 optimizer runs on CUDA"),
        ),
    ],
    ids=["deepspeed-VPP", "deepspeed-ZeRO-0", "deepspeed-ZeRO-3", "megatron-bf16-on-CPU"],
)
def test_unsupported_combinations_are_refused(backend, zero_stage, model, message):
    optimizer = OptimizerConfig(backend=backend, zero_stage=zero_stage)
    # Refused by the configuration itself, before any process group or engine exists.
    with pytest.raises(ConfigError, match=message) as refused:
        RunConfig(model=tiny_config(**model), optimizer=optimizer)
    assert "Use " in str(refused.value) or "use " in str(refused.value)  # and says what to do instead
