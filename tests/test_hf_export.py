"""Hugging Face export: training checkpoint -> transformers directory -> the same model.

A tiny memorizing GPT (real Megatron-Core) is saved in the Megatron-LM checkpoint layout with a
SentencePiece tokenizer, exported, and read back with transformers. Over documents of several
segments, with the kNN memory (and the XL cache) in use, its logits must match Megatron's.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import yaml
from megatron.core import dist_checkpointing
from packaging.version import Version
from safetensors.torch import load_file

from data_tools.train_tokenizer import EXACT_SETTINGS
from megatron_memorizing.hf.configuration_memorizing_gpt import MemorizingGPTConfig
from megatron_memorizing.hf.convert import EXPORT_MARKER, ExportError, export
from megatron_memorizing.hf.convert import main as convert_main
from megatron_memorizing.hf.modeling_memorizing_gpt import MemorizingGPTForCausalLM
from megatron_memorizing.model import build_model
from megatron_memorizing.run.folder import TRACKER

from distributed import SCRIPTS, environment_without_launcher, run_torchrun
from tiny import stream_logits, tiny_config

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEGMENT = 16  # tiny_config's segment_length
SEGMENTS = 6
ROWS = 2
TOLERANCE = 1e-4
VARIANTS = {
    "rope": dict(),
    "xl-gqa-glu-rmsnorm-tied": dict(
        xl_cache=True,
        num_query_groups=2,
        normalization="RMSNorm",
        share_embeddings_and_output_weights=True,
        gated_linear_unit=True,
        add_bias_linear=False,
    ),
    "learned-absolute-two-memory-layers": dict(position_embedding_type="learned_absolute", memory_layers=(2, 4)),
    "softmax-mixing-xl-gqa": dict(memory_mixing="softmax", xl_cache=True, num_query_groups=2),
    # The first 3 tokens of every segment kept out of what the memory returns (a ring of 40 over
    # segments of 16: the oldest segment in memory has lost its start, or not).
    "memory-sink-tokens-xl-gqa": dict(memory_sink_tokens=3, xl_cache=True, num_query_groups=2),
    # Llama 3.1's scaled RoPE, and linear scaling, through the XL cache's rotations and the memory's un-rotation.
    "llama3-rope-xl": dict(rope_scaling=True, rope_scaling_factor=8.0, xl_cache=True),
    "linear-rope-xl": dict(rotary_seq_len_interpolation_factor=4.0, xl_cache=True),
    # YaRN over an original context of half a segment: its frequencies in the XL cache's rotations and the
    # memory's un-rotation, its attention factor (squared) in local attention and, mixed by one softmax,
    # in the local logsumexp.
    "yarn-rope-xl": dict(yarn_rotary_scaling_factor=4.0, yarn_original_max_position_embeddings=8, xl_cache=True),
    "yarn-attention-factor-softmax-mixing-xl-gqa": dict(
        yarn_rotary_scaling_factor=4.0, yarn_original_max_position_embeddings=8, yarn_attention_factor=1.5,
        yarn_beta_fast=16.0, yarn_correction_range_round_to_int=False, memory_mixing="softmax", xl_cache=True,
        num_query_groups=2,
    ),
}


def model_config(**overrides):
    # vocab 448 > 400 tokenizer pieces: Megatron pads the vocabulary, the export keeps the padding.
    fields = dict(vocab_size=448, micro_batch_size=ROWS, num_micro_batches=1, gate_init=0.5)
    return tiny_config(**{**fields, **overrides})


def trained_like(config, seed=0):
    """A model whose biases, norms, gates and memory scales are not at their initial values
    (zeros and ones would hide a misplaced tensor) and differ per head, with weights large
    enough that what a layer attends to visibly changes the logits."""
    torch.manual_seed(seed)
    (model,) = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.mul_(5.0)
    return model.eval()


def save_checkpoint(run_dir: Path, model, config, tokenizer: Path, iteration=100) -> Path:
    """The Megatron-LM layout the trainer writes."""
    directory = run_dir / f"iter_{iteration:07d}"
    (directory / "model").mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(directory / "model"))
    (directory / "config.yaml").write_text(yaml.safe_dump({"model": config.to_dict()}))
    shutil.copy(tokenizer, directory / "tokenizer.model")
    (run_dir / TRACKER).write_text(str(iteration))
    return directory


def document(seed=0):
    """Two segments of random tokens, repeated: later segments find their continuation in memory."""
    base = torch.randint(3, 400, (ROWS, 2 * SEGMENT), generator=torch.Generator().manual_seed(seed))
    return base.repeat(1, SEGMENTS // 2)


def megatron_logits(model, tokens):
    return stream_logits(model, tokens, SEGMENT)


def segment_errors(a, b):
    return [(x - y).abs().max().item() for x, y in zip(a.split(SEGMENT, 1), b.split(SEGMENT, 1))]


@pytest.fixture(scope="module")
def checkpoint(single_rank, tmp_path_factory, tokenizer_model):
    """The default variant, saved: (run dir, Megatron model)."""
    config = model_config()
    model = trained_like(config)
    run = tmp_path_factory.mktemp("checkpoint") / "run"
    save_checkpoint(run, model, config, tokenizer_model)
    return run, model


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_reproduces_megatron_logits_with_memory(single_rank, tmp_path, tokenizer_model, variant):
    config = model_config(**VARIANTS[variant])
    model = trained_like(config)
    save_checkpoint(tmp_path / "run", model, config, tokenizer_model)
    hf = MemorizingGPTForCausalLM.from_pretrained(export(tmp_path / "run", tmp_path / "hf")).eval()

    tokens = document()
    expected = megatron_logits(model, tokens)
    with torch.no_grad():
        whole = hf(tokens).logits
        # Odd-sized calls continuing one memory: pieces end mid-segment and cross segment ends.
        memory = hf.new_memory()
        pieces = torch.cat([hf(piece, past_key_values=memory).logits for piece in tokens.split(7, dim=1)], dim=1)
        # Each segment as a new document: what the model predicts without memory.
        alone = torch.cat([hf(segment).logits for segment in tokens.split(SEGMENT, dim=1)], dim=1)

    assert max(segment_errors(whole, expected)) < TOLERANCE
    assert max(segment_errors(pieces, expected)) < TOLERANCE
    assert memory.tokens_read == tokens.shape[1] and memory.memory_fill == config.memory_size
    without_memory = segment_errors(alone, expected)
    assert without_memory[0] < TOLERANCE  # a document's first segment has an empty memory
    assert min(without_memory[1:]) > 1e-2  # later segments read the memory (and the XL cache)


def test_memory_can_be_larger_than_in_training(checkpoint, tmp_path):
    run, _ = checkpoint
    trained = MemorizingGPTForCausalLM.from_pretrained(export(run, tmp_path / "hf")).eval()
    larger = MemorizingGPTForCausalLM.from_pretrained(export(run, tmp_path / "hf96", memory_size=96)).eval()
    assert (trained.config.memory_size, larger.config.memory_size) == (40, 96)
    tokens = document()
    with torch.no_grad():
        logits = trained(tokens).logits
        larger_logits = larger(tokens).logits
        asked_for = trained(tokens, past_key_values=trained.new_memory(memory_size=96)).logits
    assert torch.equal(asked_for, larger_logits)
    differences = segment_errors(logits, larger_logits)
    # The trained memory holds 40 pairs: the first three segments see 0, 16 and 32 earlier tokens
    # either way; from the fourth on, the larger memory remembers more.
    assert max(differences[:3]) == 0.0
    assert min(differences[3:]) > 1e-3


def test_faiss_search_gives_the_same_logits(checkpoint, tmp_path):
    pytest.importorskip("faiss")
    path = export(checkpoint[0], tmp_path / "hf")
    tokens = document()
    with torch.no_grad():
        exact = MemorizingGPTForCausalLM.from_pretrained(path).eval()(tokens).logits
        with_faiss = MemorizingGPTForCausalLM.from_pretrained(path, memory_backend="faiss").eval()(tokens).logits
    assert max(segment_errors(with_faiss, exact)) < 1e-5


def test_loads_and_generates_in_a_fresh_process_from_the_export_alone(checkpoint, tmp_path, tokenizer_model):
    run, model = checkpoint
    out = tmp_path / "hf"
    # A process of its own: not a rank of the test process's (single-process) group.
    own_group = environment_without_launcher()
    cli = subprocess.run(
        [sys.executable, "-m", "megatron_memorizing.hf.convert", "--checkpoint", str(run), "--output", str(out),
         "--max-shard-size", "200KB"],
        capture_output=True, text=True, timeout=300, env=own_group,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == 70
    tokens = document()
    text = "def wrap(text, width=70, **kwargs):\n    return TextWrapper(width=width).wrap(text)  # é\n\n"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = tmp_path / "result.json"
    subprocess.run(
        [sys.executable, str(SCRIPTS / "hf_generate.py"), str(out), json.dumps(tokens.tolist()), text, str(result)],
        cwd=elsewhere, env=env, check=True, timeout=300,
    )
    got = json.loads(result.read_text())

    assert not got["project_imported"]
    assert max(segment_errors(torch.tensor(got["logits"]), megatron_logits(model, tokens))) < TOLERANCE
    assert got["ids"] == spm.SentencePieceProcessor(model_file=str(tokenizer_model)).encode(text)
    assert got["decoded"] == text
    # Greedy decoding: repeatable, equal to re-reading the whole document at every step, and
    # the same when the prompt was read in an earlier call into a kept memory.
    assert got["first"] == got["second"] == got["manual"]
    assert got["continued"] == got["first"]
    expected_names = (
        ["past_key_values", "cache"] if Version(got["transformers"]) >= Version("5.24") else ["past_key_values"]
    )
    assert sorted(got["passed_memory"]) == sorted(expected_names)
    for name, ids in got["passed_memory"].items():
        assert ids == got["first"], f"generate(..., {name}=memory) dropped the memory"
    # Beam search reorders the memory with its beams: its score is the re-read document's.
    assert got["beam_score"] == pytest.approx(got["beam_reread"], abs=1e-4)
    assert len(got["first"]) > 4 * SEGMENT  # generation crossed segment ends
    assert len(set(got["first"][40:])) > 3  # and produced more than a repeated token


def test_checkpoint_saved_at_tp2_pp2_exports_the_same_model(single_rank, tmp_path, tokenizer_model):
    config = model_config(**VARIANTS["xl-gqa-glu-rmsnorm-tied"])
    model = trained_like(config)
    reference = save_checkpoint(tmp_path / "tp1", model, config, tokenizer_model)
    run_torchrun(
        SCRIPTS / "hf_save_parallel.py",
        4,
        ["--config", str(reference / "config.yaml"), "--weights", str(reference / "model"),
         "--tokenizer", str(tokenizer_model), "--output", str(tmp_path / "tp2pp2")],
    )
    saved = yaml.safe_load((tmp_path / "tp2pp2" / "iter_0000007" / "config.yaml").read_text())["model"]
    assert (saved["tensor_model_parallel_size"], saved["pipeline_model_parallel_size"]) == (2, 2)

    from_tp1 = load_file(export(tmp_path / "tp1", tmp_path / "hf1") / "model.safetensors")
    from_tp2pp2 = load_file(export(tmp_path / "tp2pp2", tmp_path / "hf4") / "model.safetensors")
    assert from_tp1.keys() == from_tp2pp2.keys()
    for name in from_tp1:
        assert torch.equal(from_tp1[name], from_tp2pp2[name]), name
    hf = MemorizingGPTForCausalLM.from_pretrained(tmp_path / "hf4").eval()
    tokens = document()
    with torch.no_grad():
        assert max(segment_errors(hf(tokens).logits, megatron_logits(model, tokens))) < TOLERANCE


# --------------------------------------------------------------------------------------------------


def _write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))


def _model_section(run):
    return yaml.safe_load((run / "iter_0000100" / "config.yaml").read_text())["model"]


BROKEN = {
    "tracker names a missing iteration": (lambda run: (run / TRACKER).write_text("200"), "iter_0000200 does not exist"),
    "no config.yaml": (lambda run: (run / "iter_0000100" / "config.yaml").unlink(), "no config.yaml"),
    "another project's config": (
        lambda run: _write_yaml(run / "iter_0000100" / "config.yaml", {"model": {"n_embd": 64}}),
        "does not describe a memorizing GPT",
    ),
    "weights of another size": (
        lambda run: _write_yaml(
            run / "iter_0000100" / "config.yaml", {"model": {**_model_section(run), "hidden_size": 32}}
        ),
        "do not fit",
    ),
    "weights of another memory layout": (
        lambda run: _write_yaml(
            run / "iter_0000100" / "config.yaml", {"model": {**_model_section(run), "memory_layers": [2]}}
        ),
        "do not fit",
    ),
    "interrupted save": (lambda run: (run / "iter_0000100" / "model" / "metadata.json").unlink(), "metadata.json"),
    "no tokenizer": (lambda run: (run / "iter_0000100" / "tokenizer.model").unlink(), "--tokenizer"),
    "tokenizer is not sentencepiece": (
        lambda run: (run / "iter_0000100" / "tokenizer.model").write_text("{}"), "not a readable SentencePiece"
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoint_is_refused_clearly_and_writes_nothing(checkpoint, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(checkpoint[0], run)
    breaking, message = BROKEN[case]
    breaking(run)
    with pytest.raises(ExportError, match=message):
        export(run, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


@pytest.mark.parametrize(("fields", "message"), [
    (dict(memory_sink_tokens=16, segment_length=16), "memory_sink_tokens=16 must lie in 0..segment_length-1=15"),
    (dict(memory_mixing="sum"), "memory_mixing='sum' (use 'gate' or 'softmax')"),
    (dict(knn_top_k=64, memory_size=32), "knn_top_k=64 must lie in 1..memory_size=32"),
])
def test_the_exported_config_names_what_is_wrong(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MemorizingGPTConfig(**fields)


def test_other_bad_inputs(checkpoint, tmp_path, tokenizer_model, capsys):
    run, _ = checkpoint
    with pytest.raises(ExportError, match="not a directory"):
        export(tokenizer_model, tmp_path / "out")

    spm.SentencePieceTrainer.train(
        input=str(STDLIB / "argparse.py"), model_prefix=str(tmp_path / "big"), vocab_size=500, minloglevel=2
    )
    with pytest.raises(ExportError, match="not the one the model was trained with"):
        export(run, tmp_path / "out", tokenizer=tmp_path / "big.model")
    # The same vocabulary size, other pieces: refused too, naming both files.
    spm.SentencePieceTrainer.train(
        input=str(STDLIB / "argparse.py"), model_prefix=str(tmp_path / "same_size"), vocab_size=400, minloglevel=2,
        model_type="bpe", **EXACT_SETTINGS,
    )
    with pytest.raises(
        ExportError, match=r"same_size.model is not the one the model was trained with \(.*tokenizer.model"
    ):
        export(run, tmp_path / "out", tokenizer=tmp_path / "same_size.model")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()

    # An existing export survives a failed overwrite untouched.
    previous = export(run, tmp_path / "out")
    (previous / "note").write_text("previous export")
    with pytest.raises(ExportError, match="already exists"):
        export(run, tmp_path / "out")
    with pytest.raises(ValueError):
        export(run, tmp_path / "out", overwrite=True, max_shard_size="a lot")
    assert (tmp_path / "out" / "note").read_text() == "previous export"
    assert not (tmp_path / "out.tmp").exists()
    # A successful overwrite replaces it whole.
    assert export(run, tmp_path / "out", overwrite=True) == previous
    assert (previous / EXPORT_MARKER).is_file() and not (previous / "note").exists()

    assert convert_main(["--checkpoint", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x")]) == 2
    assert "error:" in capsys.readouterr().err


def test_an_interrupted_or_discarded_save_is_not_exported(checkpoint, tmp_path, capsys):
    """An `iter_*.tmp` (a save cut short, or weights the NaN guard discarded) is refused, as
    training and evaluation refuse it: one line, exit 2, nothing written."""
    run, _ = checkpoint
    interrupted = shutil.copytree(run / "iter_0000100", tmp_path / "run" / "iter_0000102.tmp")
    assert convert_main(["--checkpoint", str(interrupted), "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "iter_0000102.tmp is an incomplete checkpoint" in err and TRACKER in err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.tmp").exists()


def test_overwrite_replaces_only_what_an_export_wrote(checkpoint, tmp_path):
    """`--overwrite` pointed at a training run (or any folder of the user's) deletes nothing."""
    run, _ = checkpoint
    victim = tmp_path / "victim"
    shutil.copytree(run, victim)
    (tmp_path / "notes.tmp").mkdir()
    (tmp_path / "notes.tmp" / "mine.txt").write_text("not an export")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert convert_main(["--checkpoint", str(run), "--output", str(victim), "--overwrite"]) == 2
    with pytest.raises(ExportError, match=f"not written by megatron-memorizing-export.*{EXPORT_MARKER}"):
        export(run, victim, overwrite=True)
    # Nor is a folder that happens to sit where the export stages its files.
    with pytest.raises(ExportError, match="refusing to use it as the staging directory"):
        export(run, tmp_path / "notes")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_replaced_tmp_of_the_users_is_never_deleted(checkpoint, tmp_path, capsys):
    """OUT.replaced.tmp is where `--overwrite` sets the earlier export aside: one of the user's is
    left alone by an export that replaces nothing, and refused by one that would replace."""
    run, _ = checkpoint
    mine = tmp_path / "m.replaced.tmp"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    export(run, tmp_path / "m")
    assert (mine / "notes.txt").read_text() == "mine"
    capsys.readouterr()  # the export's progress bars

    assert convert_main(["--checkpoint", str(run), "--output", str(tmp_path / "m"), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{mine} was not written by megatron-memorizing-export" in err
    assert (mine / "notes.txt").read_text() == "mine" and (tmp_path / "m" / EXPORT_MARKER).is_file()
    assert not (tmp_path / "m.tmp").exists()
