"""The CPU patches for Megatron-Core and DeepSpeed, and the distributed bootstrap.

The multi-process checks run stock Megatron-Core and DeepSpeed under torchrun on gloo; each launch
costs seconds of imports per process, so each runs once per module and several tests read it.
"""

import math

import pytest
import torch

import patches
from megatron_memorizing.parallel import initialize_distributed
from tests.distributed import SCRIPTS, run_torchrun
from tests.scripts.patches_gpt import CASES, SGD_CLIP, SGD_LR, VOCAB_SIZE

# Every layout of the same model (layout-independent weights, no dropout) must agree with TP=1.
LAYOUTS = ["tp2", "pp2", "pp2_vpp2", "tp2_pp2", "sgd_clip"]


@pytest.fixture(scope="module")
def gpt_results():
    return run_torchrun(SCRIPTS / "patches_gpt.py", 4, ["--cases", *CASES], timeout=240)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpt_layout_matches_tp1(gpt_results, layout):
    reference = gpt_results["tp1"]
    assert gpt_results[layout]["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    if "grad_sq" in gpt_results[layout]:
        assert gpt_results[layout]["grad_sq"] == pytest.approx(reference["grad_sq"], rel=1e-4)


def test_gpt_trains_from_chance(gpt_results):
    losses = gpt_results["tp1"]["losses"]
    assert len(losses) == 4
    assert losses == pytest.approx([math.log(VOCAB_SIZE)] * 4, abs=0.1)
    assert gpt_results["tp1"]["grad_sq"] > 0


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_replays_dropout(gpt_results, recompute):
    plain, dropout = gpt_results["tp2"], gpt_results["tp2_dropout"]
    recomputed = gpt_results[f"tp2_dropout_{recompute}"]
    # Dropout is really drawing masks, so a recompute that drew fresh ones would change the grads.
    assert dropout["grad_sq"] != pytest.approx(plain["grad_sq"], rel=1e-3)
    assert recomputed["losses"] == pytest.approx(dropout["losses"], rel=1e-6)
    assert recomputed["grad_sq"] == pytest.approx(dropout["grad_sq"], rel=1e-6)


def test_megatron_optimizer_clips_gradients(gpt_results):
    result = gpt_results["sgd_clip"]
    assert result["grad_norm"] > SGD_CLIP
    # Plain SGD moves the weights by lr * (clipped gradient), whose norm is lr * clip_grad.
    assert result["step_norm"] == pytest.approx(SGD_LR * SGD_CLIP, rel=1e-3)


def test_deepspeed_zero1_trains_without_building_shm_op():
    result = run_torchrun(SCRIPTS / "patches_deepspeed.py", 2, [], timeout=150)
    assert result["switch_found"]
    assert not result["shm_comm_op_built"]
    assert result["losses"][-1] < 0.8 * result["losses"][0]


def test_version_guard_refuses_unknown_release(monkeypatch):
    from megatron.core import package_info

    monkeypatch.setattr(package_info, "__version__", "0.99.0")
    monkeypatch.delenv(patches.ALLOW_UNTESTED_ENV, raising=False)
    monkeypatch.setattr(patches, "_applied", False)
    with pytest.raises(RuntimeError) as refusal:
        patches.apply_cpu_patches()
    message = str(refusal.value)
    assert "0.99.0" in message
    assert "megatron-core==0.16.1" in message
    assert patches.ALLOW_UNTESTED_ENV in message

    monkeypatch.setenv(patches.ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(RuntimeWarning, match="0.99.0"):
        assert patches.check_megatron_core_version() == "0.99.0"


def test_patches_are_a_no_op_with_cuda(monkeypatch):
    from megatron.core import package_info

    # An unchecked release would be refused if the CPU path were taken at all.
    monkeypatch.setattr(package_info, "__version__", "0.99.0")
    monkeypatch.setattr(patches, "_applied", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert patches.apply_cpu_patches() is False


def test_cpu_patches_are_idempotent_and_leave_torch_alone():
    import megatron.core.utils as mcore_utils
    from megatron.core.tensor_parallel import random as mcore_random

    from patches.cpu_device import CPU_DEVICE_TORCH
    from patches.cpu_rng import CpuRNGStatesTracker

    assert patches.apply_cpu_patches() is True
    assert patches.apply_cpu_patches() is True
    assert mcore_utils.torch is CPU_DEVICE_TORCH
    assert mcore_random.CudaRNGStatesTracker is CpuRNGStatesTracker
    # The real torch.cuda still refuses: the CPU wheel as not compiled with CUDA, a CUDA wheel
    # (Python 3.12's) on a machine without a GPU as finding no driver.
    with pytest.raises((AssertionError, RuntimeError), match="not compiled with CUDA|no NVIDIA driver"):
        torch.cuda.current_device()


def test_initialize_distributed_names_the_layout_it_cannot_fit(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ValueError, match=r"world size 6 .* tensor \(2\) x pipeline \(2\)"):
        initialize_distributed(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
