"""Save given weights as a training checkpoint written under TP=2 x PP=2 (launched by tests/test_hf_export.py).

Loads a dist_checkpointing checkpoint (any layout) into the tiny model built at the launch's
layout and saves it in the Megatron-LM directory layout the exporter reads, with a config.yaml
that records this layout.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

import yaml
from megatron.core import dist_checkpointing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for `distributed`

from megatron_memorizing.config import MemorizingConfig  # noqa: E402
from megatron_memorizing.model import build_model  # noqa: E402
from megatron_memorizing.parallel import destroy_distributed, initialize_distributed  # noqa: E402

from distributed import write_result  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="config.yaml of the source checkpoint")
    parser.add_argument("--weights", required=True, help="dist_checkpointing directory to load")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--output", required=True, help="run directory to create")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    run = yaml.safe_load(Path(args.config).read_text())
    run["model"].update(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    config = MemorizingConfig.from_dict(run["model"])
    initialize_distributed(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    (model,) = build_model(config)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), args.weights))

    iteration = Path(args.output) / "iter_0000007"
    (iteration / "model").mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(iteration / "model"))
    if int(os.environ["RANK"]) == 0:
        (iteration / "config.yaml").write_text(yaml.safe_dump(run))
        shutil.copy(args.tokenizer, iteration / "tokenizer.model")
        (Path(args.output) / "latest_checkpointed_iteration.txt").write_text("7")
    write_result(args.result, {"saved": str(iteration)})
    destroy_distributed()


if __name__ == "__main__":
    main()
