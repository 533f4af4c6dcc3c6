"""Import a Hugging Face Llama, Qwen2 or Mistral model as a checkpoint to fine-tune with memory.

    megatron-memorizing-import --hf-model HF_DIR --output CKPT_DIR [--set model.memory_layers=[24] ...]

HF_DIR is a local directory as `save_pretrained` writes it: config.json, *.safetensors and the
tokenizer's files; or a GGUF file (llama.cpp's format), dequantized on the way (hf/gguf.py).
CKPT_DIR becomes a weights-only checkpoint in the Megatron-LM layout (CKPT_DIR/iter_0000000/model
is dist_checkpointing, so any TP/PP layout reads it) whose config.yaml describes the model: the
architecture from config.json, and memory layers added where `--set model.memory_layers=[...]`
says (by default the layer at 3/4 depth; `[]` imports without memory), their gate nearly closed
(`model.gate_init`, default -3: sigmoid 0.05) and the config's `optimizer.memory_scalars_lr_mult`
1000, so that fine-tuning opens it where memory helps; the first 4 tokens of every segment, the
pretrained model's attention sinks, are kept out of what the memory returns
(`model.memory_sink_tokens`, default 4). The tokenizer's files are kept in
CKPT_DIR/iter_0000000/hf_tokenizer/ (a SentencePiece tokenizer.model also as tokenizer.model,
which data_tools and the trainer check datasets against). Train from it:

    megatron-memorizing-train --config CKPT_DIR/iter_0000000/config.yaml --set checkpoint.dir=runs/ft ...

(its config sets checkpoint.init_from=CKPT_DIR). The import runs in one process and holds the
converted weights once (each tensor is read from its file when its turn comes), in the files'
precision: bfloat16 files give a bfloat16 model (`model.bf16: true`), others float32; `--set
model.bf16=...` chooses.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from megatron_memorizing.cli_arguments import config_override
from megatron_memorizing.config import ConfigError, MemorizingConfig
from megatron_memorizing.hf.llama_family import ARCHITECTURE_FIELDS, UnsupportedModel, max_positions, model_fields
from megatron_memorizing.hf.weights import Layout, WeightsMismatch, to_megatron

# What a tokenizer directory may hold; tokenizer.json (fast) or tokenizer.model (SentencePiece) is needed.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")


# How a pretrained model starts with memory (docs/results.md, section 7: SmolLM2-135M). A gate of
# sigmoid(-3) = 0.05 leaves the pretrained model's perplexity as it was (-0.08%; a half-open gate:
# +0.94%), and with its scalars learning at 1000x the learning rate it opens as far, as fast: the
# same perplexity after fine-tuning. `--set model.gate_init=...` chooses otherwise.
IMPORT_GATE_INIT = -3.0
IMPORT_MEMORY_SCALARS_LR_MULT = 1000.0
# A pretrained model makes the first tokens of every segment it reads attention sinks, whose keys
# match nearly every query: in memory they would come back first for every lookup. Keeping the
# first 4 out (model.memory_sink_tokens) took SmolLM2's fine-tuned gain over its twin from 3.3%
# to 10.1% (docs/results.md, section 7). `--set model.memory_sink_tokens=0` keeps them in.
IMPORT_MEMORY_SINK_TOKENS = 4
# A sharded save's table of contents: which file holds each tensor.
INDEX_FILE = "model.safetensors.index.json"


class HFImportError(RuntimeError):
    """A Hugging Face directory that cannot be imported as asked; the message says why and what to do."""


def read_hf_config(directory: Path):
    if not (directory / "config.json").is_file():
        raise HFImportError(f"{directory} has no config.json: pass a directory written by save_pretrained.")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (ValueError, KeyError, OSError) as error:
        raise HFImportError(f"{directory}/config.json cannot be read by transformers: {error}") from None


def model_config(hf, overrides: dict) -> MemorizingConfig:
    """The imported model's config: the architecture from `hf`, memory and layout from `overrides`."""
    fields = model_fields(hf)
    fixed = sorted(set(overrides) & set(ARCHITECTURE_FIELDS))
    if fixed:
        raise HFImportError(
            f"model.{', model.'.join(fixed)} come(s) from config.json and fix the weights' shapes: leave them out."
        )
    try:
        config = MemorizingConfig.from_dict({**fields, "gate_init": IMPORT_GATE_INIT,
                                             "memory_sink_tokens": IMPORT_MEMORY_SINK_TOKENS, **overrides})
    except ConfigError as error:
        raise HFImportError(str(error)) from None
    if config.local_attention_span > max_positions(hf):
        raise HFImportError(
            f"local attention would span {config.local_attention_span} positions (segment_length="
            f"{config.segment_length}{', doubled by the XL cache' if config.xl_cache else ''}), more than "
            f"max_position_embeddings={max_positions(hf)} the model was pretrained for: use a shorter "
            f"model.segment_length."
        )
    return config


def tokenizer_files(directory: Path) -> dict[str, Path]:
    found = {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}
    if not ({"tokenizer.json", "tokenizer.model"} & set(found)):
        raise HFImportError(
            f"{directory} has no tokenizer (tokenizer.json or tokenizer.model): a model is imported with the "
            f"tokenizer it was trained with. Save it there (tokenizer.save_pretrained({str(directory)!r}))."
        )
    return found


class SafetensorsWeights(Mapping):
    """The tensors of a Hugging Face directory by name, each read from its safetensors file when
    asked for: an import holds one converted copy of the model, never the files' contents too.
    Every file's header is read up front, so that a truncated or missing file, or an index naming
    tensors its shards lack, is refused before the model is built."""

    def __init__(self, directory: Path):
        index = directory / INDEX_FILE
        if index.is_file():
            self.files = {name: directory / file for name, file in _weight_map(index).items()}
            for file in sorted(set(self.files.values())):
                _check_shard(file, [name for name, shard in self.files.items() if shard == file], index)
        elif (directory / "model.safetensors").is_file():
            with _opened(directory / "model.safetensors") as f:
                self.files = {name: directory / "model.safetensors" for name in f.keys()}
        else:
            raise HFImportError(
                f"{directory} has no model.safetensors (or its index): save the model with safe_serialization "
                f"(the default of save_pretrained)."
            )

    def __getitem__(self, name: str) -> torch.Tensor:
        with _opened(self.files[name]) as f:  # mapped for this one tensor only
            return f.get_tensor(name)

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def without(self, *names: str) -> "SafetensorsWeights":
        lighter = copy.copy(self)
        lighter.files = {name: file for name, file in self.files.items() if name not in names}
        return lighter

    def floating_types(self) -> set[str]:
        """The floating-point types the files store, as safetensors names them ("BF16", "F32", ...)."""
        found = set()
        for file in set(self.files.values()):
            with _opened(file) as f:
                found |= {f.get_slice(name).get_dtype() for name in f.keys()}
        return {kind for kind in found if kind.startswith(("F", "BF"))}


@contextlib.contextmanager
def _opened(file: Path):
    """`safe_open(file)`, with what safetensors cannot read (a truncated or damaged file, one that
    vanished) raised as an HFImportError naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as error:
        raise HFImportError(
            f"{file} cannot be read as safetensors ({error}): it is truncated or damaged; download or save "
            f"the model again."
        ) from None


def _weight_map(index: Path) -> dict[str, str]:
    """The tensor name -> shard file map of a sharded save's index."""
    try:
        return dict(json.loads(index.read_text())["weight_map"])
    except (ValueError, KeyError, TypeError) as error:
        raise HFImportError(
            f"{index} is not a safetensors index (no weight_map of tensor names to files: {error!r}): download or "
            f"save the model again."
        ) from None


def _check_shard(file: Path, names: list[str], index: Path) -> None:
    """That the shard `file` is there, readable, and holds the tensors `names` the index puts in it."""
    if not file.is_file():
        raise HFImportError(
            f"{index.name} names the shard {file.name}, which is not in {file.parent}: the download is "
            f"incomplete; copy every shard the index names."
        )
    with _opened(file) as f:
        held = set(f.keys())
    lacking = [name for name in names if name not in held]
    if lacking:
        raise HFImportError(
            f"{file} lacks {', '.join(lacking[:4])}{' ...' if len(lacking) > 4 else ''}, which {index.name} "
            f"puts there: the index and its shards come from different saves; download or save the model again."
        )


def megatron_weights(hf_weights: SafetensorsWeights, config: MemorizingConfig, expected: dict) -> dict:
    """`hf_weights` under Megatron's names, each in the dtype of the model's `expected` state dict
    and checked against it: every tensor there and of its shape, except the memory parameters the
    import adds."""
    from megatron_memorizing.knn_attention import MEMORY_PARAMETERS

    if config.share_embeddings_and_output_weights:  # the output layer is the embedding
        hf_weights = hf_weights.without("lm_head.weight")
    layout = Layout(config.num_layers, config.num_attention_heads,
                    config.num_query_groups or config.num_attention_heads, config.head_dim, config.gated_linear_unit)

    def cast(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(expected[name].dtype) if name in expected else tensor

    try:
        weights = to_megatron(hf_weights, layout, cast)
    except WeightsMismatch as error:
        raise HFImportError(f"the weights do not fit config.json's architecture: {error}") from None
    missing = sorted(k for k in set(expected) - set(weights) if not k.endswith(MEMORY_PARAMETERS))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{k} {tuple(weights[k].shape)} (expected {tuple(expected[k].shape)})"
             for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise HFImportError(
            "the weights do not fit config.json's architecture: "
            + "; ".join(f"{what}: {', '.join(keys[:4])}" for what, keys in
                        (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)) if keys)
        )
    return weights


def check_output(output: Path) -> None:
    """`output` must be a new or empty directory, where directories can be made."""
    if output.is_dir() and any(output.iterdir()):
        raise HFImportError(f"{output} already exists and is not empty: choose another --output.")
    blocking = next((path for path in (output, *output.parents) if path.exists() and not path.is_dir()), None)
    if blocking is not None:
        raise HFImportError(f"--output {output}: {blocking} is a file, not a directory: choose another --output.")


def import_model(hf_dir: str | Path, output: str | Path, overrides: dict | None = None) -> Path:
    """Write the weights-only checkpoint `output` from the Hugging Face directory `hf_dir` (or a
    GGUF file); returns its iteration directory. `overrides` are model fields (memory, segment, layout)."""
    hf_dir, output = Path(hf_dir), Path(output)
    check_output(output)
    if not (hf_dir.is_file() or hf_dir.suffix == ".gguf"):
        return _import_directory(hf_dir, output, overrides or {}, hf_dir)
    from megatron_memorizing.hf.gguf import GGUFError, gguf_to_hf

    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.gguf-") as converted:
        try:
            directory = gguf_to_hf(hf_dir, Path(converted) / "hf")
        except GGUFError as error:
            raise HFImportError(str(error)) from None
        return _import_directory(directory, output, overrides or {}, hf_dir)


def _import_directory(hf_dir: Path, output: Path, overrides: dict, source: Path) -> Path:
    # What the directory holds is checked before Megatron is imported: a refusal takes seconds.
    hf = read_hf_config(hf_dir)
    weights = SafetensorsWeights(hf_dir)
    if "bf16" not in overrides:  # the weights' own precision: bfloat16 in, bfloat16 out
        overrides = {**overrides, "bf16": weights.floating_types() == {"BF16"}}
    try:
        config = model_config(hf, overrides)
    except UnsupportedModel as error:
        raise HFImportError(f"{source}: {error}") from None
    files = tokenizer_files(hf_dir)

    from megatron.core import parallel_state

    from megatron_memorizing.data.manifest import IMPORTED_CONFIG_FILE, IMPORTED_TOKENIZER_DIR
    from megatron_memorizing.model import build_model_chunk
    from megatron_memorizing.parallel import destroy_distributed, initialize_distributed
    from megatron_memorizing.run.config import CheckpointConfig, OptimizerConfig, RunConfig
    from megatron_memorizing.run.weights import save_weights

    single = config.holding_weights_only()
    started = not parallel_state.model_parallel_is_initialized()
    if started:
        initialize_distributed()
    elif torch.distributed.get_world_size() != 1:
        raise HFImportError("import runs in one process: call it outside of a multi-process job.")
    try:
        # Shapes only (no memory, no initialisation thrown away): the weights come from the files,
        # converted one tensor at a time, and take the parameters' place. The memory's own
        # parameters are real from the start, at model.gate_init.
        with torch.device("meta"):
            model = build_model_chunk(single, use_transformer_engine=False)
        expected = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        model.load_state_dict(megatron_weights(weights, config, expected), strict=False, assign=True)
        unfilled = [name for name, t in model.state_dict().items() if isinstance(t, torch.Tensor) and t.is_meta]
        if unfilled:
            raise RuntimeError(f"the import left tensors without weights: {unfilled[:4]}")
        # The config fine-tuning starts from: these weights, and the memory's scalars free to move.
        optimizer = OptimizerConfig(
            memory_scalars_lr_mult=IMPORT_MEMORY_SCALARS_LR_MULT if config.memory_layers else 1.0
        )
        run = RunConfig(model=config, optimizer=optimizer,
                        checkpoint=CheckpointConfig(dir=None, init_from=str(output.resolve())))
        copied = ({f"{IMPORTED_TOKENIZER_DIR}/{name}": path for name, path in files.items()}
                  | {IMPORTED_CONFIG_FILE: hf_dir / "config.json"})
        if "tokenizer.model" in files:
            copied["tokenizer.model"] = files["tokenizer.model"]
        return save_weights(output, [model], run, copied, imported_from=str(source.resolve()))
    finally:
        if started:
            destroy_distributed()


def main(argv=None) -> int:
    from megatron_memorizing.run.config import apply_override

    parser = argparse.ArgumentParser(prog="megatron-memorizing-import", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-model", required=True,
                        help="Hugging Face model directory (config.json, safetensors, tokenizer), or a .gguf file")
    parser.add_argument("--output", required=True, help="checkpoint directory to create")
    parser.add_argument("--set", action="append", default=[], metavar="model.FIELD=VALUE", type=config_override,
                        help="memory, segment and layout fields, e.g. model.memory_layers=[12] model.memory_size=65536")
    args = parser.parse_args(argv)
    overrides = {}
    for override in args.set:
        if not override.startswith("model."):
            print(f"error: --set {override}: only model.* fields are set at import "
                  "(training settings go to the trainer).",
                  file=sys.stderr)
            return 2
        try:
            apply_override(overrides, override)
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    if not Path(args.hf_model).exists():
        print(f"error: --hf-model {args.hf_model} does not exist: pass a Hugging Face model directory (config.json, "
              f"safetensors, tokenizer) or a .gguf file.", file=sys.stderr)
        return 2
    try:
        iteration = import_model(args.hf_model, args.output, overrides.get("model", {}))
    except HFImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"imported {args.hf_model} -> {iteration}")
    if Path(args.hf_model).is_file():
        from megatron_memorizing.hf.gguf import quantization

        stored = ", ".join(f"{kind} ({count} tensors)" for kind, count in quantization(Path(args.hf_model)).items())
        print(f"dequantized to float32 from {stored}: the weights are the quantized ones, not the original model's")
    print(f"fine-tune: megatron-memorizing-train --config {iteration / 'config.yaml'} --set checkpoint.dir=DIR "
          f"--set data.train=PREFIX --set data.validation=PREFIX")
    return 0


if __name__ == "__main__":
    sys.exit(main())
