"""Export a training checkpoint as a Hugging Face model directory.

    megatron-memorizing-export --checkpoint RUN_OR_ITER_DIR --output OUT [--memory-size N]

A model with memory (or the XL cache) becomes the remote-code model of modeling_memorizing_gpt.py
(`trust_remote_code=True`), described below. A model without them whose architecture is a Llama
family member's (RMSNorm, SwiGLU, RoPE: an imported one, or one trained so) becomes that standard
class instead, LlamaForCausalLM, Qwen2ForCausalLM or MistralForCausalLM, with no remote code, so
any Hugging Face tool takes it; its tokenizer is the imported one, or the SentencePiece model as
a LlamaTokenizer encoding exactly as it does.

The checkpoint may have been saved under any tensor/pipeline layout: its weights are loaded,
resharded by dist_checkpointing, into a single-process (TP=1, PP=1) Megatron model built from the
checkpoint's own config, then renamed and split into the layout of `modeling_memorizing_gpt.py`.
The output holds config.json, (sharded) safetensors, the SentencePiece tokenizer and the modeling
code, so loading it needs transformers, torch and sentencepiece only. It is written to OUT.tmp
and renamed to OUT at the end: a failed export leaves no OUT behind. An earlier export that
`--overwrite` replaces is moved to OUT.replaced.tmp first, and removed once the new one is in place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_memorizing.cli_arguments import existing_file, output_folder, positive_int
from megatron_memorizing.config import ConfigError, MemorizingConfig
from megatron_memorizing.data import trained_tokenizer
from megatron_memorizing.data.manifest import IMPORTED_CONFIG_FILE, IMPORTED_TOKENIZER_DIR, checkpoint_tokenizers
from megatron_memorizing.data.tokenizer import file_sha256, load_tokenizer
from megatron_memorizing.hf.configuration_memorizing_gpt import MemorizingGPTConfig
from megatron_memorizing.hf.llama_family import rope_scaling, standard_class, standard_config
from megatron_memorizing.hf.modeling_memorizing_gpt import MemorizingGPTForCausalLM
from megatron_memorizing.hf.tokenization_memorizing_gpt import MemorizingGPTTokenizer
from megatron_memorizing.hf.weights import Layout, WeightsMismatch, to_hf
from megatron_memorizing.owned import discard, is_marked, make_marked_dir, remove_marked
from megatron_memorizing.run.config import read_sections
from megatron_memorizing.run.folder import TRACKER, CheckpointError, resolve

# Written into every export: `--overwrite` replaces only a directory that holds it.
EXPORT_MARKER = "megatron_memorizing_export.json"
_ACTIVATIONS = {F.gelu: "gelu", F.silu: "silu", F.relu: "relu"}
# TransformerConfig features the exported model does not implement, with the value it assumes.
_ASSUMED = {
    "qk_layernorm": False,
    "layernorm_zero_centered_gamma": False,
    "apply_residual_connection_post_layernorm": False,
    "rotary_interleaved": False,
    "multi_latent_attention": False,
    "num_moe_experts": None,
    "softmax_scale": None,
    "attention_output_gate": False,
}


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported; the message says what is wrong and what to do."""


@dataclasses.dataclass
class Checkpoint:
    iteration_dir: Path
    config: MemorizingConfig
    tokenizer: Path  # the SentencePiece model or tokenizer.json the model was trained with
    hf_tokenizer: Path | None = None  # an imported model's own tokenizer directory



# --------------------------------------------------------------------------------------------------
# Reading the checkpoint


def iteration_dir(path: Path) -> Path:
    """The iter_* directory of `path`: one itself, or in a run directory the one training would
    resume from (its tracker file's, else its newest complete iteration)."""
    if not path.is_dir():
        raise ExportError(
            f"--checkpoint {path} is not a directory: pass a run directory or one of its iter_* directories."
        )
    try:
        return resolve(path)
    except CheckpointError as error:
        raise ExportError(str(error)) from None


def read_checkpoint(path: str | Path, tokenizer: str | Path | None = None) -> Checkpoint:
    """Check that everything an export needs is there, before anything is loaded or written."""
    directory = iteration_dir(Path(path))
    config_path = directory / "config.yaml"
    if not config_path.exists():
        raise ExportError(
            f"{directory} has no config.yaml: it is not a megatron-memorizing checkpoint (or is incomplete). "
            f"Expected <run>/{TRACKER} or <run>/iter_NNNNNNN/ with config.yaml, model/ and tokenizer.model."
        )
    # The model's section only: the training sections may hold what only the training machine
    # runs (a GPU optimizer, say), which export does not need.
    try:
        run = read_sections(config_path)
    except ConfigError as error:
        raise ExportError(str(error)) from None
    if not isinstance(run.get("model"), dict):
        raise ExportError(f"{config_path} has no `model:` section: it was not written by megatron-memorizing.")
    try:
        config = MemorizingConfig.from_dict(run["model"])
    except (ConfigError, TypeError) as error:
        raise ExportError(f"{config_path} does not describe a memorizing GPT: {error}") from None
    if not (directory / "model" / "metadata.json").exists():
        raise ExportError(
            f"{directory / 'model'} is not a complete dist_checkpointing checkpoint (no metadata.json): "
            f"the save was interrupted, or this is another kind of checkpoint."
        )
    own = checkpoint_tokenizers(directory)
    if tokenizer is None and not own:
        raise ExportError(
            f"no tokenizer in {directory}: the checkpoint was saved without one. Pass the tokenizer the data was "
            f"tokenized with (SentencePiece .model or tokenizer.json): --tokenizer PATH."
        )
    tokenizer = Path(tokenizer) if tokenizer is not None else own[0]
    if not tokenizer.is_file():
        raise ExportError(f"--tokenizer {tokenizer} does not exist.")
    trained_with = own or [t for t in [trained_tokenizer(directory, (run.get("data") or {}).get("train"))] if t]
    if trained_with and file_sha256(tokenizer) not in {file_sha256(t) for t in trained_with}:
        raise ExportError(
            f"--tokenizer {tokenizer} is not the one the model was trained with ({trained_with[0]}, sha256 differs): "
            f"leave --tokenizer out, or pass {trained_with[0]}."
        )
    hf_tokenizer = directory / IMPORTED_TOKENIZER_DIR if (directory / IMPORTED_TOKENIZER_DIR).is_dir() else None
    return Checkpoint(directory, config, tokenizer, hf_tokenizer)


def load_megatron_state(checkpoint: Checkpoint) -> tuple[dict, object]:
    """The checkpoint's weights as one unsharded Megatron state dict, and the TransformerConfig."""
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_memorizing.model import build_model_chunk
    from megatron_memorizing.parallel import destroy_distributed, initialize_distributed

    single = checkpoint.config.holding_weights_only()
    started = not parallel_state.model_parallel_is_initialized()
    if started:
        initialize_distributed()
    elif (parallel_state.get_tensor_model_parallel_world_size()
          * parallel_state.get_pipeline_model_parallel_world_size() != 1):
        raise ExportError("export runs in one process: call it outside of a tensor/pipeline-parallel job.")
    try:
        model = build_model_chunk(single, use_transformer_engine=False)
        wanted = model.sharded_state_dict()
        _check_tensors_match(dist_checkpointing.load_tensors_metadata(str(checkpoint.iteration_dir / "model")), wanted)
        model.load_state_dict(dist_checkpointing.load(wanted, str(checkpoint.iteration_dir / "model")))
        state = {name: t.detach().cpu() for name, t in model.state_dict().items() if not name.endswith("_extra_state")}
        return state, model.config
    finally:
        if started:
            destroy_distributed()


def _check_tensors_match(saved: dict, wanted: dict) -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    expected = {t.key: tuple(t.global_shape) for t in wanted.values() if isinstance(t, ShardedTensor)}
    missing = sorted(set(expected) - set(saved))
    wrong = [f"{k}: saved {tuple(saved[k].global_shape)}, config implies {shape}"
             for k, shape in expected.items() if k in saved and tuple(saved[k].global_shape) != shape]
    if missing or wrong:
        raise ExportError(
            "the weights do not fit the checkpoint's config.yaml (saved by another model, or incomplete): "
            + "; ".join(([f"{len(missing)} missing, e.g. {missing[:3]}"] if missing else []) + wrong[:3])
        )


# --------------------------------------------------------------------------------------------------
# Megatron -> Hugging Face


def hf_config(config: MemorizingConfig, transformer, tokenizer, memory_size=None):
    # The softmax scale is Megatron's default, or YaRN's (which the exported model computes).
    assumed = {**_ASSUMED, "softmax_scale": config.attention_softmax_scale}
    unsupported = {name: getattr(transformer, name) for name, expected in assumed.items()
                   if getattr(transformer, name, expected) != expected}
    if transformer.activation_func not in _ACTIVATIONS:
        unsupported["activation_func"] = transformer.activation_func
    if unsupported:
        raise ExportError(f"the exported model does not implement {unsupported}; train without these settings.")
    if len(tokenizer) > config.vocab_size:
        raise ExportError(
            f"the tokenizer has {len(tokenizer)} pieces but the model only {config.vocab_size} "
            f"embeddings: this tokenizer is not the one the model was trained with."
        )
    return MemorizingGPTConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=transformer.num_query_groups,
        head_dim=transformer.kv_channels,
        intermediate_size=transformer.ffn_hidden_size,
        hidden_act=_ACTIVATIONS[transformer.activation_func],
        gated_linear_unit=transformer.gated_linear_unit,
        normalization=transformer.normalization,
        layernorm_epsilon=transformer.layernorm_epsilon,
        attention_bias=transformer.add_bias_linear or transformer.add_qkv_bias,
        linear_bias=transformer.add_bias_linear,
        position_embedding_type=config.position_embedding_type,
        rotary_base=config.rotary_base,
        rotary_percent=config.rotary_percent,
        **rope_scaling(config),
        segment_length=config.segment_length,
        memory_layers=list(config.memory_layers),
        memory_size=memory_size or config.memory_size,
        knn_top_k=config.knn_top_k,
        # Exact search either way; torch needs no extra package where the model is loaded.
        memory_backend="torch",
        xl_cache=config.xl_cache,
        gate_init=config.gate_init,
        memory_mixing=config.memory_mixing,
        memory_sink_tokens=config.memory_sink_tokens,
        initializer_range=config.init_method_std,
        tie_word_embeddings=config.share_embeddings_and_output_weights,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16" if config.bf16 else "float32",
    )


# --------------------------------------------------------------------------------------------------


def export(
    checkpoint: str | Path,
    output: str | Path,
    memory_size: int | None = None,
    tokenizer: str | Path | None = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write the Hugging Face directory `output` from a training checkpoint; returns its path.

    `overwrite` replaces only a directory an earlier export wrote (it holds EXPORT_MARKER);
    anything else at `output` is refused and left untouched.
    """
    output = Path(output)
    staging = output.with_name(output.name + ".tmp")
    replaced = output.with_name(output.name + ".replaced.tmp")
    replacing = output.exists()
    if replacing:
        if not overwrite:
            raise ExportError(f"{output} already exists: choose another --output or pass --overwrite.")
        _check_written_by_export(output, "replace it")
        if replaced.exists():  # left by an export killed while replacing, or somebody else's
            _check_written_by_export(replaced, "use it to set aside the export being replaced")
    if staging.exists():  # left by an export that was killed, or somebody else's
        _check_written_by_export(staging, "use it as the staging directory of this export")
    source = read_checkpoint(checkpoint, tokenizer)
    class_name = standard_class(source.config, imported_config(source).get("model_type"))
    if class_name is None:
        model, save_tokenizer = remote_code_model(source, memory_size)
    else:
        model, save_tokenizer = standard_model(source, class_name)
    model.to(torch.bfloat16 if source.config.bf16 else torch.float32)

    remove_marked(staging, EXPORT_MARKER, missing_ok=True)  # checked above: a killed export's, if there
    try:
        # The marker first: a staging directory left by a killed export is recognisably ours.
        make_marked_dir(staging, EXPORT_MARKER)
        (staging / EXPORT_MARKER).write_text(
            json.dumps({"exported_from": str(source.iteration_dir), "architecture": type(model).__name__,
                        "memory_size": getattr(model.config, "memory_size", None)}, indent=2) + "\n"
        )
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        save_tokenizer(staging)
        if replacing:
            remove_marked(replaced, EXPORT_MARKER, missing_ok=True)  # checked above: an earlier export's, if there
            output.rename(replaced)
            staging.rename(output)
            remove_marked(replaced, EXPORT_MARKER)  # its marker last: cut short, still an export's
        else:
            staging.rename(output)
    except BaseException:
        discard(staging, EXPORT_MARKER)
        raise
    return output


def remote_code_model(source: Checkpoint, memory_size: int | None):
    """The model with its memory, as modeling_memorizing_gpt.py (loaded with trust_remote_code),
    and the function saving its tokenizer (SentencePiece, with remote code too; or a Hugging Face one)."""
    if memory_size is not None and source.config.memory_layers and memory_size < source.config.knn_top_k:
        raise ExportError(f"--memory-size {memory_size} is smaller than knn_top_k={source.config.knn_top_k}.")
    hf_tokenizer = standard_tokenizer(source)  # loads without remote code
    if hf_tokenizer is None:
        try:
            hf_tokenizer = MemorizingGPTTokenizer(vocab_file=str(source.tokenizer))
        except (OSError, RuntimeError) as error:
            raise ExportError(f"{source.tokenizer} is not a readable SentencePiece model: {error}") from None
        MemorizingGPTTokenizer.register_for_auto_class("AutoTokenizer")
    megatron, transformer = load_megatron_state(source)
    config = hf_config(source.config, transformer, hf_tokenizer, memory_size)
    model = MemorizingGPTForCausalLM(config)
    _load_hf_weights(model, megatron)
    # Registration makes save_pretrained copy the code files and write `auto_map`.
    MemorizingGPTConfig.register_for_auto_class()
    MemorizingGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    return model, hf_tokenizer.save_pretrained


def standard_model(source: Checkpoint, class_name: str):
    """A model without memory as the transformers class it is (LlamaForCausalLM, ...; no remote
    code), and the function saving its tokenizer: the imported one, or the SentencePiece model
    as a LlamaTokenizer that encodes exactly as it does."""
    import transformers

    tokenizer = standard_tokenizer(source)
    if tokenizer is not None:
        save_tokenizer = tokenizer.save_pretrained
    else:
        tokenizer = llama_tokenizer(source.tokenizer)

        def save_tokenizer(directory: Path):
            tokenizer.save_pretrained(directory)
            # As Llama-2's repositories do: the SentencePiece model beside tokenizer.json, which an
            # import of this export then checks datasets against.
            shutil.copy(source.tokenizer, Path(directory) / "tokenizer.model")
    fields = {f"{kind}_token_id": getattr(tokenizer, f"{kind}_token_id") for kind in ("bos", "eos", "pad")}
    positions = imported_config(source).get("max_position_embeddings")  # an imported model's pretrained context
    fields["max_position_embeddings"] = max(positions or 0, source.config.segment_length)
    config = standard_config(source.config, class_name, fields)
    model = getattr(transformers, class_name)(config)
    megatron, _ = load_megatron_state(source)
    _load_hf_weights(model, megatron)
    return model, save_tokenizer


def imported_config(source: Checkpoint) -> dict:
    """The config.json of the Hugging Face model the checkpoint was imported from ({} if none)."""
    origin = source.iteration_dir / IMPORTED_CONFIG_FILE
    return json.loads(origin.read_text()) if origin.is_file() else {}


def standard_tokenizer(source: Checkpoint):
    """The checkpoint's tokenizer as a standard transformers tokenizer, or None for a SentencePiece
    model that did not come with an imported model: an imported model's own tokenizer, with
    everything it came with (special tokens, chat template), when it is the one the model was
    trained with; else a tokenizer.json as it is."""
    import transformers

    imported = source.hf_tokenizer
    trained_with = file_sha256(source.tokenizer)
    if imported is not None and any(file_sha256(f) == trained_with for f in imported.iterdir() if f.is_file()):
        return _tokenizer_in(imported)
    if source.tokenizer.suffix != ".json":
        return None
    tokenizer = load_tokenizer(source.tokenizer)
    eos = tokenizer.piece(tokenizer.eod_id) if tokenizer.eod_id is not None else None
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(source.tokenizer), eos_token=eos)


def llama_tokenizer(sentencepiece_model: Path):
    """The SentencePiece model as a transformers LlamaTokenizer with the same ids for the same text:
    no prefix space, no BOS or EOS added (the project's datasets have neither)."""
    import tempfile

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    special = {kind: sp.id_to_piece(index) for kind, index in
               (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id()))
               if index >= 0}
    settings = dict(tokenizer_class="LlamaTokenizer", add_bos_token=False, add_eos_token=False, legacy=False,
                    add_prefix_space=False, **special)
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(sentencepiece_model, Path(folder) / "tokenizer.model")
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps(settings))
        return _tokenizer_in(Path(folder))


def _tokenizer_in(folder: Path):
    """The tokenizer its tokenizer_config.json names. The folder has no config.json, and without one
    transformers would take the model type from any model name inside the path ("mpt" in "/tmp/tmpt..."),
    and with it another tokenizer: an empty config leaves the choice to tokenizer_config.json."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(folder), config=transformers.PreTrainedConfig())


def _load_hf_weights(model, megatron: dict) -> None:
    try:
        missing, unexpected = model.load_state_dict(to_hf(megatron, Layout.of_hf_config(model.config)), strict=False)
    except WeightsMismatch as error:
        raise ExportError(f"the checkpoint does not fit the exported model: {error}") from None
    tied = model.config.tie_word_embeddings and missing == ["lm_head.weight"]
    if unexpected or (missing and not tied):
        raise ExportError(
            f"the checkpoint does not fit the exported model: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    if tied:
        model.tie_weights()


def _check_written_by_export(path: Path, action: str) -> None:
    if not is_marked(path, EXPORT_MARKER):
        raise ExportError(
            f"{path} was not written by megatron-memorizing-export (it has no {EXPORT_MARKER}): refusing to "
            f"{action}. Choose another --output, or move {path} away yourself."
        )


SHARD_SIZE_UNITS = ("KB", "MB", "GB", "TB")  # what save_pretrained's max_shard_size takes


def shard_size(text: str) -> str:
    """argparse type of --max-shard-size: a positive number and a unit, as save_pretrained takes it."""
    number, unit = text.strip()[:-2], text.strip()[-2:].upper()
    try:
        valid = unit in SHARD_SIZE_UNITS and 0 < float(number) < float("inf")
    except ValueError:
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write a number and a unit, e.g. 5GB or 500MB "
                                         f"(units {', '.join(SHARD_SIZE_UNITS)})")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-memorizing-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (its latest checkpoint, as training resumes it) or an iter_* directory")
    parser.add_argument("--output", required=True, type=output_folder, help="Hugging Face directory to create")
    parser.add_argument("--memory-size", type=positive_int, help="kNN memory size at inference (default: as trained)")
    parser.add_argument("--tokenizer", type=existing_file,
                        help="SentencePiece model, if the checkpoint has no tokenizer.model")
    parser.add_argument("--max-shard-size", default="5GB", type=shard_size,
                        help="safetensors shard size (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    try:
        out = export(
            args.checkpoint, args.output, args.memory_size, args.tokenizer, args.max_shard_size, args.overwrite
        )
    except ExportError as error:
        print(f"megatron-memorizing-export: error: {error}", file=sys.stderr)
        return 2
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
