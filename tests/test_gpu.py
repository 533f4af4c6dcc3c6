"""The GPU path: CUDA tensors, NCCL, bf16, CUDA search, checkpoints and the HF export on CUDA.

Skipped (with the reason) where torch sees no CUDA device; `benchmarks/gpu_check.sh` runs them on a
GPU machine (`pytest -m gpu`). Every test runs code the CPU suite also runs, on the GPU, and holds
it to what the CPU run gives: the CPU numbers are the reference.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from distributed import SCRIPTS, environment_without_launcher, run_torchrun
from fixtures.data_corpus import build_small_data

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA: GPU tests run on a GPU machine "
                       "(benchmarks/gpu_check.sh)"),
]
REPO = SCRIPTS.parents[1]
# fp32 on the GPU against fp32 on the CPU, TF32 off: kernels differ in summation order only.
FP32_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_small_data(tmp_path_factory.mktemp("gpu_data"))


def train(data, run, *extra, timeout=600):
    """The training CLI on one GPU (rank 0 of an NCCL group of one), the tiny test model."""
    fields = [
        f"data.train={data.prefix('train')}", f"data.validation={data.prefix('validation')}",
        "model.vocab_size=1000", "model.num_layers=2", "model.memory_layers=[2]", "model.hidden_size=64",
        "model.segment_length=64", "model.memory_size=256", "training.eval_segments=2",
        f"checkpoint.dir={run / 'checkpoints'}", "checkpoint.interval=2", f"logging.dir={run}", "logging.interval=1",
        *extra,
    ]
    command = [sys.executable, "-m", "megatron_memorizing.train", "--config", "configs/tiny-cpu.yaml"]
    command += [arg for field in fields for arg in ("--set", field)]
    return subprocess.run(command, cwd=REPO, env=environment_without_launcher(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("backend", ["deepspeed", "megatron"])
def test_training_steps_on_cuda_with_nccl(data, tmp_path, backend):
    done = train(data, tmp_path, "training.steps=3", f"optimizer.backend={backend}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained 3 steps" in done.stdout
    assert "validation perplexity with memory" in done.stdout


def test_bf16_training_on_cuda(data, tmp_path):
    done = train(data, tmp_path, "training.steps=3", "model.bf16=true", "optimizer.backend=megatron")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained 3 steps" in done.stdout


def test_checkpoint_and_exact_resume_on_cuda(data, tmp_path):
    """Killed between saves, resumed: the replayed steps give the uninterrupted run's losses."""
    from test_checkpoint import read_log

    from distributed import TorchrunError

    root = tmp_path / "checkpoints"
    args = ["--dir", str(root), "--data", str(data.prefix("train")), "--backend", "deepspeed", "--steps", "6",
            "--interval", "2"]
    with pytest.raises(TorchrunError, match="SIGKILL"):
        run_torchrun(
            SCRIPTS / "ckpt_train.py", 1, [*args, "--kill-at-step", "3", "--losses", str(tmp_path / "a.jsonl")]
        )
    run_torchrun(SCRIPTS / "ckpt_train.py", 1, [*args, "--losses", str(tmp_path / "b.jsonl")])
    killed, resumed = read_log(tmp_path / "a.jsonl"), read_log(tmp_path / "b.jsonl")
    assert sorted(resumed) == [3, 4, 5, 6]
    assert resumed[3]["loss"] == pytest.approx(killed[3]["loss"], rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_top_k_on_cuda_equals_float64_reference(dtype):
    """Recall 1.0 against a float64 search on the CPU; bf16 storage through its fp32 re-rank."""
    from test_memory import H, Reference, unit

    from megatron_memorizing.memory import KNNMemory

    size, k = 8192, 32
    memory = KNNMemory(1, H, size, 16, dtype=dtype, device="cuda", search_chunk_size=1000)
    reference = Reference(size, dtype)
    keys = unit(1, H, size, 16, seed=40)
    memory.stage([0], keys.cuda(), keys.cuda())
    memory.commit()
    reference.write(0, keys[0], keys[0])
    queries = unit(1, H, 128, 16, seed=41)
    found = memory.search(queries.cuda(), k).positions[0].cpu()
    _, want = reference.search(0, queries[0], k)
    recall = (found.unsqueeze(-1) == want.unsqueeze(-2)).any(-1).float().mean().item()
    assert recall == 1.0


def test_cuda_forward_equals_the_cpu_reference(single_rank, tmp_path):
    """Megatron's forward on CUDA, with memory and the XL cache over several segments, against the
    HF export of the same weights run on the CPU (which equals Megatron's CPU forward, test_hf_export)."""
    from test_hf_export import ROWS, SEGMENT, VARIANTS, document

    from megatron_memorizing.hf.modeling_memorizing_gpt import MemorizingGPTForCausalLM
    from megatron_memorizing.memories import ModelMemories

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model, export_dir = _exported(tmp_path, **VARIANTS["xl-gqa-glu-rmsnorm-tied"])
    hf = MemorizingGPTForCausalLM.from_pretrained(export_dir).eval()

    tokens = document()
    memories = ModelMemories([model], ROWS)
    memories.reset(torch.ones(ROWS, dtype=torch.bool))
    positions = torch.arange(SEGMENT, device="cuda").expand(ROWS, -1)
    with torch.no_grad():
        on_cuda = []
        for segment in tokens.split(SEGMENT, dim=1):
            memories.use_micro_batch(0)
            on_cuda.append(model(segment.cuda(), positions, None).float().cpu())
            memories.commit()
        on_cpu = hf(tokens).logits
    assert (torch.cat(on_cuda, dim=1) - on_cpu).abs().max().item() < FP32_TOLERANCE


def test_hf_export_generates_on_cuda_with_memory(single_rank, tmp_path):
    """Greedy and beam search on CUDA equal re-reading the whole text, as on the CPU."""
    from test_hf_export import document

    _, export_dir = _exported(tmp_path)
    result = tmp_path / "result.json"
    subprocess.run(
        [sys.executable, str(SCRIPTS / "hf_generate.py"), str(export_dir), json.dumps(document().tolist()),
         "def f(x):\n    return x\n", str(result), "cuda"],
        cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, check=True, timeout=600,
    )
    got = json.loads(result.read_text())
    assert got["device"].startswith("cuda")
    assert got["first"] == got["second"] == got["manual"]
    assert got["continued"] == got["first"]
    assert all(ids == got["first"] for ids in got["passed_memory"].values())
    assert got["beam_score"] == pytest.approx(got["beam_reread"], abs=1e-3)


def _exported(tmp_path, **variant):
    """A tiny memorizing model (weights moved off their initial values) on CUDA, saved as a
    training checkpoint and exported: (Megatron model, export directory)."""
    import sentencepiece as spm
    from test_hf_export import STDLIB, model_config, save_checkpoint, trained_like

    from data_tools.train_tokenizer import EXACT_SETTINGS
    from megatron_memorizing.hf.convert import export

    spm.SentencePieceTrainer.train(input=str(STDLIB / "textwrap.py"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=400, minloglevel=2, model_type="bpe", **EXACT_SETTINGS)
    config = model_config(**variant)
    model = trained_like(config).cuda()
    save_checkpoint(tmp_path / "run", model, config, tmp_path / "sp.model")
    return model, export(tmp_path / "run", tmp_path / "hf")
