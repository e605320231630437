"""The config system: presets, dotted overrides, validation errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from lmforge.config import dump_yaml, from_dict, load_config, parse_overrides, split_cli, to_dict
from lmforge.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-3  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Resume:
    __scalar_field__ = "mode"
    mode: str = "auto"
    allow_data_change: bool = False


@dataclass
class Cfg:
    name: str = "x"
    steps: int = 10
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    shards: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    optim: Optim = field(default_factory=Optim)
    flag: bool = False
    resume: Resume = field(default_factory=Resume)

    def validate(self) -> None:
        if self.steps < 0:
            raise ConfigError("steps: must be >= 0")


def test_yaml_preset_with_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("steps: 5\noptim:\n  lr: 0.01\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nname: child\n")
    cfg = load_config(Cfg, child, ["--optim.lr=3e-4", "--shards=[a, b]", "--flag", "true"])
    assert cfg.name == "child" and cfg.steps == 5
    assert cfg.optim.lr == pytest.approx(3e-4)  # "3e-4" is a string in YAML 1.1; coerced
    assert cfg.shards == ["a", "b"] and cfg.flag is True
    assert cfg.optim.betas == (0.9, 0.95)


def test_a_single_value_is_a_one_item_list():
    # `--data.shards=out/shards` (no brackets) is what a new user types
    cfg = load_config(Cfg, None, ["--shards=out/shards", "--weights=0.5"])
    assert cfg.shards == ["out/shards"] and cfg.weights == [0.5]
    with pytest.raises(ConfigError, match="optim.betas: expected a list"):
        load_config(Cfg, None, ["--optim.betas=0.9"])  # a fixed-length tuple still needs all its items


def test_roundtrip_through_yaml(tmp_path):
    cfg = load_config(Cfg, None, ["--weights=[0.7, 0.3]", "--precision=fp16"])
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_yaml(cfg))
    again = load_config(Cfg, p)
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("--nope=1", "unknown config key 'nope'"),
        ("--steps=ten", "steps: expected an integer"),
        ("--precision=fp8", "precision: expected one of bf16|fp16|fp32"),
        ("--flag=maybe", "flag: expected true or false"),
        ("--optim=3", "optim: expected a mapping"),
        ("--steps=-1", "steps: must be >= 0"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|")):
        load_config(Cfg, None, [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="nothere.yaml not found"):
        load_config(Cfg, tmp_path / "nothere.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(Cfg, bad)


def test_split_cli_and_overrides():
    path, ov, flags = split_cli(["c.yaml", "--a.b=1", "--dry-run", "--c", "x"])
    assert path == "c.yaml" and flags == {"dry-run"}
    assert parse_overrides(ov) == {"a": {"b": 1}, "c": "x"}
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--a.b"])


def test_from_dict_int_to_float_and_back():
    cfg = from_dict(Cfg, {"optim": {"lr": 1}, "steps": 4.0})
    assert isinstance(cfg.optim.lr, float) and cfg.steps == 4


def test_section_with_a_main_field_takes_a_bare_value(tmp_path):
    cfg = load_config(Cfg, None, ["--resume=none", "--resume.allow_data_change=true"])
    assert cfg.resume.mode == "none" and cfg.resume.allow_data_change
    cfg = load_config(Cfg, None, ["--resume.allow_data_change=true", "--resume=runs/x/checkpoints/step_00000010"])
    assert cfg.resume.mode.endswith("step_00000010") and cfg.resume.allow_data_change
    preset = tmp_path / "p.yaml"
    preset.write_text("resume: none\n")
    cfg = load_config(Cfg, preset, ["--resume.allow_data_change=true"])
    assert cfg.resume.mode == "none" and cfg.resume.allow_data_change
    assert load_config(Cfg, None, []).resume.mode == "auto"


def test_a_stage_resolves_its_config_once_then_it_is_frozen(tmp_path):
    """pretrain.run.resolve: a concrete precision and a resumed run's global batch go into a new, frozen
    config (what config.yaml and the checkpoints record); the loaded one is not changed, and nothing that
    runs later can change the resolved one."""
    import json

    from lmforge.config import freeze, is_frozen, resolved
    from lmforge.rundir import checkpoint_dir, mark_complete
    from pretrain.config import PretrainConfig
    from pretrain.run import resolve

    loaded = load_config(PretrainConfig, "configs/pretrain/tiny.yaml",
                         [f"--run_dir={tmp_path}", "--precision=auto", "--zero.stage=2"])
    step = checkpoint_dir(tmp_path, 4)
    step.mkdir(parents=True)
    mark_complete(step, {"step": 4, "world_size": 4, "global_batch": 12, "zero_stage": 2,
                         "model": to_dict(loaded.model)})
    cfg, target = resolve(loaded, 2)
    assert target.universal and cfg.train.global_batch_size == 12 and cfg.precision in ("bf16", "fp32")
    assert loaded.train.global_batch_size is None and loaded.precision == "auto"  # not touched
    assert is_frozen(cfg) and is_frozen(cfg.train) and not is_frozen(loaded)
    with pytest.raises(ConfigError, match="frozen after start-up: TrainConfig.max_steps cannot change"):
        cfg.train.max_steps = 7
    with pytest.raises(ConfigError, match="frozen"):
        cfg.precision = "fp16"
    assert json.loads(json.dumps(to_dict(cfg)))["train"]["global_batch_size"] == 12  # still reads as before
    again = resolved(cfg, {"train.max_steps": 7})  # a changed copy is the way, and it is not frozen
    assert again.train.max_steps == 7 and cfg.train.max_steps != 7 and not is_frozen(again)
    assert isinstance(freeze(again), PretrainConfig) and dump_yaml(again) == dump_yaml(resolved(again, {}))
