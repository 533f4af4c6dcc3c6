"""The run config file: documented sections, command-line overrides, refusals before any process starts."""

import signal
from pathlib import Path

import pytest
import yaml

from megatron_memorizing.config import ConfigError, MemorizingConfig
from megatron_memorizing.run.config import RunConfig
from megatron_memorizing.train import main as train_main
from megatron_memorizing.training.schedules import learning_rate, memory_size

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# The experiments' configs (the recall task's) live beside the benchmarks that run them.
SHIPPED = sorted([*CONFIGS.glob("*.yaml"), *(ROOT / "benchmarks" / "configs").glob("*.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    config = RunConfig.load(path)
    config.save(tmp_path / "saved.yaml")
    assert RunConfig.load(tmp_path / "saved.yaml") == config


def test_a_checkpoint_config_with_removed_settings_at_what_the_code_does_now_loads(tmp_path):
    """Every checkpoint's config.yaml spells out every field; those saved before an option was
    removed hold it at the value that means what the code does now, and must keep loading."""
    saved = RunConfig.load(CONFIGS / "tiny-cpu.yaml", ["model.xl_cache=true"]).to_dict()
    saved["model"]["xl_cache_contents"] = "inputs"
    saved["training"]["xl_cache_dropout"] = 0.0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert (RunConfig.load(tmp_path / "config.yaml")
            == RunConfig.load(CONFIGS / "tiny-cpu.yaml", ["model.xl_cache=true"]))
    assert MemorizingConfig.from_dict(saved["model"]).xl_cache  # as export reads a checkpoint's model


def test_a_checkpoint_config_saved_before_yarn_loads_with_yarn_off(tmp_path):
    """config.yaml files written before the yarn_* fields existed lack them: they load as unscaled RoPE."""
    saved = RunConfig.load(CONFIGS / "tiny-cpu.yaml").to_dict()
    saved["model"] = {name: value for name, value in saved["model"].items() if not name.startswith("yarn_")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    loaded = RunConfig.load(tmp_path / "config.yaml")
    assert loaded == RunConfig.load(CONFIGS / "tiny-cpu.yaml") and loaded.model.yarn is None
    yarn = RunConfig.load(tmp_path / "config.yaml", ["model.yarn_rotary_scaling_factor=4",
                                                     "model.yarn_original_max_position_embeddings=64"])
    assert yarn.model.yarn["factor"] == 4.0 and yarn.model.yarn["original_max_position_embeddings"] == 64
    yarn.save(tmp_path / "yarn.yaml")
    assert RunConfig.load(tmp_path / "yarn.yaml") == yarn


@pytest.mark.parametrize(
    "section, field, value, message",
    [
        ("model", "xl_cache_contents", "keys_values",
         r"model.xl_cache_contents='keys_values': the XL cache of projected keys and values was removed .*"
         r"checkpoint.init_from=<that checkpoint> and a fresh checkpoint.dir"),
        ("training", "xl_cache_dropout", 0.15,
         r"training.xl_cache_dropout=0.15: XL cache dropout was removed \(it did not help, .*\): delete this line"),
    ],
)
def test_a_removed_setting_asking_for_what_no_longer_exists_is_refused_with_the_fix(tmp_path, section, field, value,
                                                                                    message):
    saved = RunConfig.load(CONFIGS / "tiny-cpu.yaml", ["model.xl_cache=true"]).to_dict()
    saved[section][field] = value
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(ConfigError, match=message) as refused:
        RunConfig.load(tmp_path / "config.yaml")
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match=message):  # a flag asking for it likewise
        RunConfig.load(CONFIGS / "tiny-cpu.yaml", [f"{section}.{field}={value}"])


def test_overrides_parse_yaml_values_including_exponent_floats():
    config = RunConfig.load(
        CONFIGS / "tiny-cpu.yaml",
        ["optimizer.lr=3e-4", "model.memory_layers=[2, 3]", "training.memory_curriculum=[[0, 64], [10, 128]]"],
    )
    assert config.optimizer.lr == 3e-4
    assert config.model.memory_layers == (2, 3)
    assert memory_size(5, config.training.memory_curriculum, 2048) == 64
    assert memory_size(10, config.training.memory_curriculum, 2048) == 128


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer.zero_stage=2", "model.pipeline_model_parallel_size=2"],
         "Use zero_stage=1 with pipeline parallelism"),
        (["optimizer.backend=adamw"], "use 'deepspeed' or 'megatron'"),
        (["training.memory_curriculum=[[0, 8192], [100, 1536]]"], "must both increase"),
        (["training.memory_curriculum=[[0, 16]]"], "below model.knn_top_k=32"),
        (["optimizer.min_lr=1.0"], "optimizer.min_lr=1.0 must be between 0 and optimizer.lr"),
        (["optimizer.memory_scalars_lr_mult=0"], r"memory_scalars_lr_mult=0.0 must be > 0"),
        # a stage without memory would wait for ever on the others' extra parameter group
        (["optimizer.memory_scalars_lr_mult=10", "model.pipeline_model_parallel_size=2", "model.memory_layers=[4]"],
         r"pipeline rank\(s\) \[0\] hold none of model.memory_layers=\[4\]"),
        (["optimizer.lr=fast"], "optimizer.lr='fast' is not a number"),
        (["optimiser.lr=1e-3"], r"unknown config section\(s\) \['optimiser'\]"),
        (["training.stepz=10"], r"unknown field\(s\) \['stepz'\] in training"),
        (["lr=1e-3"], "must look like section.field=value"),
        (["model.hidden_size='256'"], r"model.hidden_size='256' \(str\): expected a whole number"),
        (["model.memory_layers=3"], r"model.memory_layers=3 \(int\): expected a list, e.g. \[1, 2\] or null"),
        (["model.bf16=1"], r"model.bf16=1 \(int\): expected true or false"),
        (["checkpoint.interval=0"], "checkpoint.interval=0 must be at least 1"),
        (["logging.interval=0"], "logging.interval=0 must be at least 1"),
        (["optimizer.lr=[1"], r"--set optimizer.lr=\[1 is not valid YAML"),
        (["training.exit_duration_minutes=-1"], r"exit_duration_minutes=-1.0 must be >= 0"),
        (["training.exit_duration_minutes=30", "checkpoint.dir=null"],
         "continued from its checkpoint: set checkpoint.dir"),
        (["training.train_from_layer=0"], "train_from_layer=0 must be a layer number, 1 \\(train every layer\\)"),
        (["training.train_from_layer=99"], "to model.num_layers="),
    ],
)
def test_bad_run_config_is_refused_with_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.load(CONFIGS / "tiny-cpu.yaml", overrides)


def test_yaml_syntax_error_is_one_line_naming_file_and_line(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  hidden_size: 256\n  memory_layers: [3\ndata:\n  train: x\n")
    assert train_main(["--config", str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{broken} is not valid YAML" in err[0] and "at line" in err[0]


def test_train_cli_reports_a_bad_config_without_starting(capsys):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    assert train_main(["--config", str(CONFIGS / "tiny-cpu.yaml"), "--set", "model.knn_top_k=4096"]) == 2
    assert "knn_top_k=4096 must be between 1 and memory_size=2048" in capsys.readouterr().err
    # Training run in-process hands the caller its own signal handlers back.
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_learning_rate_warms_up_then_decays_to_min():
    config = RunConfig.load(CONFIGS / "tiny-cpu.yaml").optimizer
    rates = [learning_rate(step, config, 300) for step in range(300)]
    assert rates[config.warmup_steps - 1] == pytest.approx(config.lr)
    assert rates[0] < rates[10] < rates[config.warmup_steps - 1]
    assert all(a >= b for a, b in zip(rates[config.warmup_steps :], rates[config.warmup_steps + 1 :]))
    assert rates[-1] == pytest.approx(config.min_lr, rel=1e-3)
