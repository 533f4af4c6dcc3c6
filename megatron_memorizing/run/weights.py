"""A run's model weights: loading them into a model of any TP/PP layout, saving them alone.

The weights are Megatron-Core dist_checkpointing tensors under `iter_N/model/`, named as
Megatron-LM names them ("model", or "model0", "model1", ... per virtual pipeline stage), so any
layout reads them. A model may have memory layers the saved one lacked (or the reverse): the
memory's parameters then keep their initial values, which is how memory is added to a vanilla
or imported model. Everything else must fit, or loading names what does not.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

from megatron_memorizing.config import MemorizingConfig
from megatron_memorizing.knn_attention import MEMORY_PARAMETERS
from megatron_memorizing.parallel import current_layout, raise_on_every_rank
from megatron_memorizing.run import folder
from megatron_memorizing.run.config import RunConfig
from megatron_memorizing.run.folder import CheckpointError

# Those of them that shape the weights: a model differing in one cannot take the checkpoint's weights.
WEIGHT_SHAPE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "kv_channels", "num_query_groups", "ffn_hidden_size",
    "vocab_size", "position_embedding_type", "normalization", "gated_linear_unit", "add_bias_linear", "add_qkv_bias",
    "share_embeddings_and_output_weights",
)


def parameter_changes(saved: MemorizingConfig, model: MemorizingConfig) -> str:
    """The fields in which `model` drops or reshapes parameters that a model configured as `saved`
    trained ("field: saved X, now Y; ..."; "" if none): an architecture field, or memory_layers
    without all of the saved ones. Memory layers added are new parameters, which `load_weights`
    leaves at their initial values (a model trained without memory, given one for a look)."""
    changed = [name for name in WEIGHT_SHAPE_FIELDS if getattr(saved, name) != getattr(model, name)]
    if not set(saved.memory_layers) <= set(model.memory_layers):
        changed.append("memory_layers")
    return differences(saved, model, changed)


def load_weights(path: str | Path, model_chunks) -> list[str]:
    """Model weights only (`checkpoint.init_from`), into a model of any TP/PP layout (collective).

    The model may have memory layers that the checkpoint's model lacked (or the reverse): its
    memory parameters then keep their initial values. Anything else missing, extra or of another
    shape is an error. Returns the names of the parameters left at their initial values.
    """
    path = folder.resolve(path)
    folder.read_info(path)
    return load_model(path / "model", [unwrap(c) for c in model_chunks], allow_memory_mismatch=True)


def differences(saved: MemorizingConfig, model: MemorizingConfig, names: list[str]) -> str:
    """"name: saved X, now Y" for each of `names`, as the config files write the values."""
    saved, model = saved.to_dict(), model.to_dict()
    return "; ".join(f"{name}: saved {saved[name]}, now {model[name]}" for name in names)


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):  # Megatron DDP and DeepSpeed engines keep the model in .module
        chunk = chunk.module
    return chunk


def _model_keys(chunks) -> list[str]:
    """Megatron-LM's names: "model", or "model0", "model1", ... for virtual pipeline stages."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def model_state(chunks) -> dict:
    return {key: chunk.sharded_state_dict() for key, chunk in zip(_model_keys(chunks), chunks)}


def save_weights(root: Path, model_chunks, run_config: RunConfig, files: dict[str, Path] = {}, **info) -> Path:
    """Save the model weights alone as step 0, the latest checkpoint of the empty folder `root`
    (collective): what megatron-memorizing-import writes, and runs start from with
    `checkpoint.init_from`. `files` are copied in (relative name -> source file), `info` joins
    checkpoint.json."""
    if folder.latest(root) is not None:
        raise CheckpointError(f"{root} already holds a checkpoint ({folder.latest(root)}): choose an empty folder.")
    final = folder.iteration_dir(root, 0)
    tmp = final.with_name(final.name + folder.TMP)
    raise_on_every_rank(folder.stage(root, tmp) if dist.get_rank() == 0 else None, CheckpointError)
    if dist.get_rank() == 0:
        (tmp / "model").mkdir()
        info = {"format": folder.FORMAT, "step": 0, "layout": current_layout(), "weights_only": True, **info}
        (tmp / "checkpoint.json").write_text(json.dumps(info, indent=2) + "\n")
        run_config.save(tmp / "config.yaml")
        for name, source in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tmp / name)
    dist.barrier()
    dist_checkpointing.save(model_state([unwrap(c) for c in model_chunks]), str(tmp / "model"))
    dist.barrier()
    if dist.get_rank() == 0:
        folder.publish(tmp, final, 0)
    dist.barrier()
    return final


_PER_LAYER_KEY = re.compile(r"decoder\.layers\.\d+\.")


@contextlib.contextmanager
def _layer_keys(chunks, per_layer: bool):
    """Name transformer-layer tensors per layer ("decoder.layers.3.x") or stacked along a layer
    axis ("decoder.layers.x"). Megatron stacks them unless layers differ; a model with memory in
    some layers names them per layer, so a vanilla checkpoint is read with the stacked names."""
    configs = [chunk.config for chunk in chunks]
    saved = [config.hetereogenous_dist_checkpoint for config in configs]
    for config in configs:
        config.hetereogenous_dist_checkpoint = per_layer
    try:
        yield
    finally:
        for config, value in zip(configs, saved):
            config.hetereogenous_dist_checkpoint = value


def _is_memory_parameter(key: str) -> bool:
    return key.endswith(MEMORY_PARAMETERS)


def load_model(model_dir: Path, chunks, allow_memory_mismatch: bool) -> list[str]:
    """Load model weights from a dist_checkpointing directory after checking that every parameter
    is there with its shape (collective: all ranks agree on the verdict before anyone loads)."""
    saved = load_sharded_metadata(str(model_dir))
    names = [{k: v.key for k, v in chunk.sharded_state_dict().items()} for chunk in chunks]
    with _layer_keys(chunks, any(_PER_LAYER_KEY.match(key) for key in saved)):
        requests = [chunk.sharded_state_dict() for chunk in chunks]

    fit = {"requested": set(), "left_at_init": set(), "missing": set(), "mismatched": set()}
    for request, chunk_names in zip(requests, names):
        for local_key, sharded in list(request.items()):
            if sharded.key not in saved:
                del request[local_key]
                # Only tensors are weights; objects hold kernel metadata ("extra state"), which
                # builds with and without Transformer Engine keep differently.
                if isinstance(sharded, ShardedTensor):
                    name = chunk_names[local_key]
                    memory_only = allow_memory_mismatch and _is_memory_parameter(name)
                    fit["left_at_init" if memory_only else "missing"].add(name)
                continue
            fit["requested"].add(sharded.key)
            if isinstance(sharded, ShardedTensor):
                saved_shape, shape = tuple(saved[sharded.key].global_shape), tuple(sharded.global_shape)
                if saved_shape != shape:
                    fit["mismatched"].add(f"{sharded.key} (checkpoint {saved_shape}, model {shape})")

    # Under pipeline parallelism each rank sees its own stage only: decide on the union.
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, fit)
    fit = {kind: sorted(set().union(*(g[kind] for g in gathered))) for kind in fit}
    unexpected = [
        key for key, meta in sorted(saved.items())
        if isinstance(meta, ShardedTensor) and key not in fit["requested"]
        and not (allow_memory_mismatch and _is_memory_parameter(key))
    ]
    problems = [
        f"{what}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
        for what, keys in (("missing from the checkpoint", fit["missing"]), ("of another shape", fit["mismatched"]),
                           ("in the checkpoint but not in this model", unexpected))
        if keys
    ]
    if problems:
        also = "" if allow_memory_mismatch else ", memory layers"
        raise CheckpointError(
            f"{model_dir} does not fit this model ({'; '.join(problems)}): it was saved by a model of another "
            f"architecture (number of layers, hidden size, heads, vocabulary{also})."
        )

    loaded = dist_checkpointing.load(dict(zip(_model_keys(chunks), requests)), str(model_dir))
    for key, chunk in zip(_model_keys(chunks), chunks):
        chunk.load_state_dict(loaded[key], strict=False)
    return fit["left_at_init"]
