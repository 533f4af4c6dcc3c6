"""Hugging Face import: small random Llama, Qwen2 and Mistral models (built by transformers, no
download) -> weights-only checkpoints with memory added -> the same model in Megatron-Core.

With memory disabled the imported model must compute the Hugging Face model's logits, in one
process and loaded at TP=2 or PP=2; a model imported without memory must export back as the
standard class with the same weights; what cannot be represented is refused with a reason.
"""

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import transformers
from safetensors.torch import load_file, save_file

from data_tools.preprocess import preprocess
from megatron_memorizing.data import IncompatibleError, check_compatible, load_tokenizer
from megatron_memorizing.hf.convert import export, llama_tokenizer
from megatron_memorizing.hf.importer import (
    IMPORT_GATE_INIT,
    IMPORT_MEMORY_SCALARS_LR_MULT,
    IMPORT_MEMORY_SINK_TOKENS,
    HFImportError,
    import_model,
)
from megatron_memorizing.hf.importer import main as import_main
from megatron_memorizing.memories import ModelMemories
from megatron_memorizing.model import build_model
from megatron_memorizing.run.config import CheckpointConfig, RunConfig
from megatron_memorizing.run.folder import CheckpointError
from megatron_memorizing.run.weights import load_weights
from megatron_memorizing.training.checkpoint import Checkpointer, check_checkpoint_tokenizer

from conftest import STDLIB
from distributed import SCRIPTS, environment_without_launcher, run_torchrun
from tiny import document_batches, stream_logits

TOLERANCE = 1e-4
SEGMENT = 32
SLOTS = 2
SHAPE = dict(vocab_size=448, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=50000.0)
FAMILY = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(sliding_window=64, tie_word_embeddings=False)),
}
IMPORT = {"segment_length": SEGMENT, "micro_batch_size": SLOTS, "memory_size": 64, "knn_top_k": 4}


def hf_model(kind: str, directory: Path, tokenizer: Path, seed=0, **overrides):
    """A random model of `kind` saved with `tokenizer` (a SentencePiece model, as tokenizer.model, or
    a transformers tokenizer directory). Weights are perturbed so that zero biases and unit norms
    cannot hide a misplaced tensor."""
    config_class, model_class, own = FAMILY[kind]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**SHAPE, **own, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.dim() == 1 else 0.05))
    model.save_pretrained(directory)
    if tokenizer.is_dir():
        for f in tokenizer.iterdir():
            shutil.copy(f, directory / f.name)
    else:
        shutil.copy(tokenizer, directory / "tokenizer.model")
    return model


def imported_model(output: Path):
    run = RunConfig.load(output / "iter_0000000" / "config.yaml")
    (model,) = build_model(run.model)
    load_weights(output, [model])
    return model.eval(), run.model


def tokens(seed=1):
    return torch.randint(0, SHAPE["vocab_size"], (SLOTS, SEGMENT), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def megatron_logits_without_memory(model, ids):
    memories = ModelMemories([model], SLOTS)
    memories.reset(torch.ones(SLOTS, dtype=torch.bool))
    memories.use_micro_batch(0)
    with memories.disabled():
        return model(ids, torch.arange(ids.shape[1]).expand(SLOTS, -1), None)


@pytest.fixture(scope="module")
def fast_tokenizer(tmp_path_factory, tokenizer_model):
    """The SentencePiece model as a transformers tokenizer directory (tokenizer.json)."""
    out = tmp_path_factory.mktemp("fast")
    llama_tokenizer(tokenizer_model).save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FAMILY)
def test_import_computes_the_hf_logits_with_memory_disabled(single_rank, tmp_path, tokenizer_model, kind):
    hf = hf_model(kind, tmp_path / "hf", tokenizer_model)
    iteration = import_model(tmp_path / "hf", tmp_path / "ckpt", IMPORT)
    model, config = imported_model(tmp_path / "ckpt")

    assert config.memory_layers == (3,)  # by default the layer at 3/4 depth
    assert (iteration / "tokenizer.model").is_file() and (iteration / "hf_tokenizer" / "tokenizer.model").is_file()
    ids = tokens()
    with torch.no_grad():
        expected = hf(ids).logits
    assert (megatron_logits_without_memory(model, ids) - expected).abs().max().item() < TOLERANCE
    gate = dict(model.named_parameters())["decoder.layers.2.self_attention.core_attention.gate_bias"]
    assert torch.equal(gate, torch.full_like(gate, IMPORT_GATE_INIT))  # added, nearly closed
    assert config.memory_sink_tokens == IMPORT_MEMORY_SINK_TOKENS  # the segments' attention sinks kept out
    # ... and the config fine-tuning starts from lets the gate open
    assert RunConfig.load(iteration / "config.yaml").optimizer.memory_scalars_lr_mult == IMPORT_MEMORY_SCALARS_LR_MULT


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_import_loads_at_other_layouts(single_rank, tmp_path, fast_tokenizer, tp, pp):
    hf = hf_model("qwen2", tmp_path / "hf", fast_tokenizer)  # biases, GQA and tied embeddings
    import_model(tmp_path / "hf", tmp_path / "ckpt", IMPORT)
    result = run_torchrun(SCRIPTS / "hf_import_losses.py", tp * pp,
                          ["--checkpoint", str(tmp_path / "ckpt"), "--tp", str(tp), "--pp", str(pp)])
    batches = document_batches(2, SLOTS, SEGMENT, SHAPE["vocab_size"], seed=3)
    for batch, got in zip(batches, result["token_losses"]):
        with torch.no_grad():
            logits = hf(batch.tokens).logits
        expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.labels, reduction="none")
        assert (torch.tensor(got) - expected).abs().max().item() < TOLERANCE


def test_a_model_imported_without_memory_exports_as_the_same_llama(single_rank, tmp_path, fast_tokenizer):
    hf = hf_model("llama", tmp_path / "hf", fast_tokenizer)
    import_model(tmp_path / "hf", tmp_path / "ckpt", {**IMPORT, "memory_layers": []})
    out = export(tmp_path / "ckpt", tmp_path / "back")

    assert not list(out.glob("*.py"))  # no remote code
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    original, exported = load_file(tmp_path / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[name], exported[name]) for name in original)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
    text = (STDLIB / "textwrap.py").read_text()[:2000]
    assert transformers.AutoTokenizer.from_pretrained(out).encode(text) == \
        transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").encode(text)


# Llama 3.1's own scaling (factor 8; Llama 3.2: 32), linear scaling and YaRN, as transformers 5 writes
# them. YaRN's original context (32) is shorter than the test's segment (128), so that its blend matters.
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
ROPE_SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": YARN,
    # every parameter given, the attention factor too, and the blend's ends not rounded
    "yarn-attention-factor": {**YARN, "attention_factor": 1.3, "beta_fast": 16.0, "beta_slow": 2.0,
                              "truncate": False},
    # DeepSeek's way to the attention factor (the ratio of two magnitudes), on a Qwen2 (biases, tied)
    "yarn-mscale-qwen2": {**YARN, "factor": 8.0, "mscale": 0.707, "mscale_all_dim": 1.0},
}


@pytest.mark.parametrize("scaling", ROPE_SCALINGS)
def test_scaled_rope_imports_and_exports_exactly(single_rank, tmp_path, fast_tokenizer, scaling):
    """Llama 3.1/3.2, linearly scaled and YaRN models: the import computes transformers' logits, the
    plain export gives the same model back, the export with memory the same first segment."""
    kind = "qwen2" if scaling.endswith("qwen2") else "llama"
    rope = {**ROPE_SCALINGS[scaling], "rope_theta": SHAPE["rope_theta"]}
    hf = hf_model(kind, tmp_path / "hf", fast_tokenizer, rope_parameters=rope, max_position_embeddings=65536)
    unscaled = hf_model(kind, tmp_path / "unscaled", fast_tokenizer)  # the same weights (same seed)
    segment = 128  # long enough for the slowed-down frequencies to move the logits
    ids = torch.randint(0, SHAPE["vocab_size"], (SLOTS, segment), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        assert (unscaled(ids).logits - expected).abs().max().item() > 10 * TOLERANCE  # the scaling matters

    import_model(tmp_path / "hf", tmp_path / "plain", {**IMPORT, "segment_length": segment, "memory_layers": []})
    model, config = imported_model(tmp_path / "plain")
    assert (megatron_logits_without_memory(model, ids) - expected).abs().max().item() < TOLERANCE
    back = export(tmp_path / "plain", tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["rope_parameters"] == rope
    original, exported = load_file(tmp_path / "hf" / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[name], exported[name]) for name in original)
    with torch.no_grad():
        assert torch.equal(transformers.AutoModelForCausalLM.from_pretrained(back).eval()(ids).logits, expected)

    import_model(tmp_path / "hf", tmp_path / "memory", {**IMPORT, "segment_length": segment})
    remote = transformers.AutoModelForCausalLM.from_pretrained(
        export(tmp_path / "memory", tmp_path / "remote"), trust_remote_code=True).eval()
    with torch.no_grad():  # a document's first segment: the memory is empty, the model is the pretrained one
        assert (remote(ids).logits - expected).abs().max().item() < TOLERANCE


def test_a_mistral_without_window_goes_back_as_mistral(single_rank, tmp_path, fast_tokenizer):
    """Mistral v0.2 and later ship without a sliding window: the same computation as a Llama, but
    the architecture a user imported is the one they get back."""
    hf = hf_model("mistral", tmp_path / "hf", fast_tokenizer, sliding_window=None)
    import_model(tmp_path / "hf", tmp_path / "ckpt", {**IMPORT, "memory_layers": []})
    out = export(tmp_path / "ckpt", tmp_path / "back")
    config = json.loads((out / "config.json").read_text())
    assert ((config["architectures"], config["model_type"], config["sliding_window"])
            == (["MistralForCausalLM"], "mistral", None))
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(transformers.AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits, hf(ids).logits)


def test_a_qwen2_with_its_window_switched_off_imports(single_rank, tmp_path, fast_tokenizer):
    """Qwen2 checkpoints ship `use_sliding_window: false` beside a `sliding_window` value."""
    hf = hf_model("qwen2", tmp_path / "hf", fast_tokenizer)
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps({**saved, "use_sliding_window": False, "sliding_window": 16})
    )
    import_model(tmp_path / "hf", tmp_path / "ckpt", {**IMPORT, "memory_layers": []})
    model, config = imported_model(tmp_path / "ckpt")
    assert config.sliding_window is None
    ids = tokens()
    with torch.no_grad():
        assert (megatron_logits_without_memory(model, ids) - hf(ids).logits).abs().max().item() < TOLERANCE


def test_bfloat16_weights_stay_bfloat16_from_import_to_export(single_rank, tmp_path, fast_tokenizer):
    """The source's precision is kept by default: bfloat16 in, the checkpoint and the export in
    bfloat16, every tensor bit-identical (no float32 detour that would double the memory)."""
    hf = hf_model("llama", tmp_path / "fp32", fast_tokenizer)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    for f in fast_tokenizer.iterdir():
        shutil.copy(f, tmp_path / "hf" / f.name)
    import_model(tmp_path / "hf", tmp_path / "ckpt", {**IMPORT, "memory_layers": []})
    assert RunConfig.load(tmp_path / "ckpt" / "iter_0000000" / "config.yaml").model.bf16
    out = export(tmp_path / "ckpt", tmp_path / "back")
    original, exported = load_file(tmp_path / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    assert {t.dtype for t in exported.values()} == {torch.bfloat16} and sorted(original) == sorted(exported)
    assert all(torch.equal(original[name], exported[name]) for name in original)


def test_a_sentencepiece_model_becomes_a_llama_tokenizer_with_the_same_ids(tokenizer_model, tmp_path, monkeypatch):
    # A model type inside the temporary folder's path ("mpt" in /tmp/tmpt...) must not choose the tokenizer.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmpt-mpt-run"))
    (tmp_path / "tmpt-mpt-run").mkdir()
    text = (STDLIB / "argparse.py").read_text()[:20000] + "\n\t  é 日本語 \U0001f600\n\n"
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    tokenizer = llama_tokenizer(tokenizer_model)
    assert tokenizer.encode(text) == sp.encode(text)
    assert tokenizer.decode(sp.encode(text)) == text


@pytest.fixture(scope="module")
def byte_level_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer (as Llama-3's and Qwen2's are) with an end-of-text token, saved
    as transformers saves one: tokenizer.json and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([(STDLIB / name).read_text() for name in ("textwrap.py", "bisect.py")], trainer)
    out = tmp_path_factory.mktemp("byte_level")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(out)
    return out


def test_a_hugging_face_tokenizer_works_through_data_tools(tmp_path, byte_level_tokenizer):
    text = (STDLIB / "heapq.py").read_text() + "\n# é 日本語 \U0001f600\n"
    tokenizer = load_tokenizer(byte_level_tokenizer)  # the directory: its tokenizer.json
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert sum(tokenizer.bytes_per_id()[i] for i in ids) == len(text.encode())  # bits per byte's denominator
    assert tokenizer.eod_id == tokenizer.encode("<|endoftext|>")[0] and tokenizer.bytes_per_id()[tokenizer.eod_id] == 0

    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": text}) + "\n")
    manifest = preprocess(tmp_path / "docs.jsonl", byte_level_tokenizer, tmp_path / "data" / "train")
    assert ((manifest.tokenizer_file, manifest.eod_id, manifest.tokens)
            == ("tokenizer.json", tokenizer.eod_id, len(ids) + 1))
    assert (tmp_path / "data" / "tokenizer_config.json").is_file()  # where the end-of-document token is named
    assert check_compatible(tmp_path / "data" / "train", 448, byte_level_tokenizer / "tokenizer.json").documents == 1


def test_an_imported_model_fine_tunes_on_its_own_tokenizer_and_exports_with_memory(
    single_rank, tmp_path, byte_level_tokenizer, tokenizer_model
):
    """The whole path of a Llama-3-like model: its tokenizer.json tokenizes the data, the import
    gets a memory layer, a few training steps, then the remote-code export computes what Megatron
    computes, memory included, and loads the tokenizer without remote code."""
    hf_model("llama", tmp_path / "hf", byte_level_tokenizer)
    iteration = import_model(tmp_path / "hf", tmp_path / "imported", IMPORT)
    documents = [(STDLIB / name).read_text() for name in ("textwrap.py", "heapq.py", "bisect.py", "shlex.py")]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    for split in ("train", "validation"):
        preprocess(tmp_path / "docs.jsonl", iteration / "hf_tokenizer", tmp_path / "data" / split)
    with pytest.raises(IncompatibleError, match="sha256 differs"):  # data of another tokenizer
        check_checkpoint_tokenizer(iteration, tokenizer_model)

    run = tmp_path / "run"
    settings = [f"data.train={tmp_path / 'data' / 'train'}", f"data.validation={tmp_path / 'data' / 'validation'}",
                "training.steps=3", "training.eval_segments=2", "optimizer.lr=1e-3", "optimizer.warmup_steps=1",
                f"checkpoint.dir={run}", f"logging.dir={run}", "logging.interval=1"]
    trained = subprocess.run(
        [sys.executable, "-m", "megatron_memorizing.train", "--config", str(iteration / "config.yaml"),
         *[a for s in settings for a in ("--set", s)]],
        capture_output=True, text=True, timeout=600, env=environment_without_launcher(),
    )
    assert trained.returncode == 0, trained.stderr[-3000:]

    out = export(run, tmp_path / "hf-memory")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MemorizingGPTForCausalLM"]
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())  # a standard tokenizer
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer.encode(documents[0])[: 3 * SEGMENT]] * SLOTS)
    assert ids[0].tolist() == load_tokenizer(byte_level_tokenizer).encode(documents[0])[: 3 * SEGMENT]

    config = RunConfig.load(run / "iter_0000003" / "config.yaml").model
    (model,) = build_model(config)
    assert load_weights(run, [model]) == []  # the memory's gate and scale were trained and saved
    expected = stream_logits(model.eval(), ids, SEGMENT)
    with torch.no_grad():
        assert (hf(ids).logits - expected).abs().max().item() < TOLERANCE


def test_a_weights_only_checkpoint_is_refused_for_resuming(single_rank, tmp_path, tokenizer_model):
    hf_model("llama", tmp_path / "hf", tokenizer_model)
    import_model(tmp_path / "hf", tmp_path / "ckpt", IMPORT)
    with pytest.raises(CheckpointError, match="weights only.*checkpoint.init_from"):
        Checkpointer(CheckpointConfig(dir=str(tmp_path / "ckpt"))).load(tmp_path / "ckpt", state=None)


# --------------------------------------------------------------------------------------------------
# Refusals: one clear line, exit code 1 or 2, nothing written


def sharded(directory: Path, without=()) -> None:
    """Split model.safetensors over two shards and an index, as save_pretrained does for a large
    model; shards and tensors named in `without` are left out, as a broken download leaves them."""
    weights = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    files = {name: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, name in enumerate(sorted(weights))}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": files}))
    for file in set(files.values()) - set(without):
        save_file({name: weights[name] for name in weights if files[name] == file and name not in without},
                  directory / file, metadata={"format": "pt"})


def cut_in_half(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


REFUSALS = {
    "outside the family": (dict(kind="gpt2"), [], "not in the Llama family"),
    "heads not divisible by TP": (dict(), ["model.tensor_model_parallel_size=3"],
                                  "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3"),
    "no tokenizer": (dict(tokenizer=False), [], "has no tokenizer"),
    "llama3 rope of another original context": (
        dict(rope_parameters={**ROPE_SCALINGS["llama3"], "rope_theta": 50000.0,
                              "original_max_position_embeddings": 64}),
        [], "rope scaling 'llama3' with .*'original_max_position_embeddings': 64"),
    "dynamic rope": (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 50000.0, "factor": 4.0}), [],
                     "rope scaling of type 'dynamic' is not supported"),
    "yarn rope on part of the channels": (
        dict(rope_parameters={**YARN, "rope_theta": 50000.0, "partial_rotary_factor": 0.5}),
        [], "rope scaling 'yarn' with partial_rotary_factor=0.5"),
    "yarn rope without attention": (dict(rope_parameters={**YARN, "rope_theta": 50000.0, "attention_factor": 0.0}),
                                    [], "yarn_attention_factor=0: must be positive"),
    "segment beyond the pretrained context": (dict(), ["model.segment_length=256"], "max_position_embeddings=128"),
    "window shorter than a segment": (dict(kind="mistral", sliding_window=16), [], "sliding_window=16"),
    "architecture overridden": (dict(), ["model.hidden_size=32"], "come.* from config.json"),
    "a training setting": (dict(), ["optimizer.lr=1e-4"], "only model.\\* fields"),
    "truncated weights": (dict(damage=lambda d: cut_in_half(d / "model.safetensors")), [],
                          "model.safetensors cannot be read as safetensors .*truncated or damaged"),
    "random bytes as weights": (dict(damage=lambda d: (d / "model.safetensors").write_bytes(bytes(range(256)) * 64)),
                                [], "model.safetensors cannot be read as safetensors"),
    "an index naming a missing shard": (dict(damage=lambda d: sharded(d, without=["model-00002-of-00002.safetensors"])),
                                        [], "names the shard model-00002-of-00002.safetensors, which is not in"),
    "a shard lacking a tensor of the index": (dict(damage=lambda d: sharded(d, without=["model.norm.weight"])), [],
                                              "model-0000.-of-00002.safetensors lacks model.norm.weight"),
    "an index that is not one": (dict(damage=lambda d: (d / "model.safetensors.index.json").write_text("{")), [],
                                 "model.safetensors.index.json is not a safetensors index"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_what_cannot_be_imported_is_refused_with_a_reason(tmp_path, tokenizer_model, capsys, case):
    spec, settings, message = REFUSALS[case]
    spec = dict(spec)
    kind, with_tokenizer, damage = spec.pop("kind", "llama"), spec.pop("tokenizer", True), spec.pop("damage", None)
    directory = tmp_path / "hf"
    if kind == "gpt2":
        transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=448)
        ).save_pretrained(directory)
        shutil.copy(tokenizer_model, directory / "tokenizer.model")
    else:
        hf_model(kind, directory, tokenizer_model, **spec)
    if not with_tokenizer:
        (directory / "tokenizer.model").unlink()
    if damage:
        damage(directory)
    before = sorted(p.name for p in directory.iterdir())
    capsys.readouterr()  # the setup's own output

    argv = ["--hf-model", str(directory), "--output", str(tmp_path / "ckpt"),
            "--set", f"model.segment_length={SEGMENT}"]
    code = import_main(argv + [a for s in settings for a in ("--set", s)])

    error = capsys.readouterr().err.strip()
    assert code in (1, 2) and len(error.splitlines()) == 1 and error.startswith("error: ")
    assert re.search(message, error), error
    assert not (tmp_path / "ckpt").exists()
    assert sorted(p.name for p in directory.iterdir()) == before


@pytest.mark.parametrize("damage, damaged", [(Path.unlink, "tokenizer.model"), (cut_in_half, "model.safetensors")],
                         ids=["no tokenizer", "truncated weights"])
def test_a_refusal_comes_before_megatron_is_imported(tmp_path, tokenizer_model, damage, damaged):
    """What the Hugging Face directory holds is checked first: a refusal does not wait seconds to
    minutes for Megatron-Core to import."""
    hf_model("llama", tmp_path / "hf", tokenizer_model)
    damage(tmp_path / "hf" / damaged)
    script = ("import sys; from megatron_memorizing.hf.importer import main; "
              f"code = main(['--hf-model', {str(tmp_path / 'hf')!r}, '--output', {str(tmp_path / 'ckpt')!r}, "
              f"'--set', 'model.segment_length={SEGMENT}']); "
              "print(code, 'megatron.core' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["2", "False"], result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1 and damaged in result.stderr


def test_an_existing_output_is_refused_and_left_alone(tmp_path, tokenizer_model):
    hf_model("llama", tmp_path / "hf", tokenizer_model)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    with pytest.raises(HFImportError, match="not empty"):
        import_model(tmp_path / "hf", tmp_path / "ckpt", IMPORT)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["notes.txt"]


def test_an_output_that_is_a_file_is_refused_and_left_alone(tmp_path, tokenizer_model, capsys):
    hf_model("llama", tmp_path / "hf", tokenizer_model)
    (tmp_path / "notes.txt").write_text("mine")
    capsys.readouterr()
    for output in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "ckpt"):
        assert import_main(["--hf-model", str(tmp_path / "hf"), "--output", str(output)]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and f"{tmp_path / 'notes.txt'} is a file, not a directory" in error, error
    assert (tmp_path / "notes.txt").read_text() == "mine"
