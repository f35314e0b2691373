"""Config loading: overrides, validation, unknown keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffnas.config import ConfigError, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    load_config(ROOT / "configs" / name)


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs/darts_fashion_mnist.yaml",
                      ["search.epochs=7", "search.strategy.order=2", "data.batch_size=8"])
    assert cfg.search.epochs == 7 and cfg.search.strategy["order"] == 2
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override, match", [
    ("search.epoch=3", r"unknown config key\(s\) config.search.epoch"),
    ("bogus=1", r"config.bogus"),
    ("search.space.widht=3", r"search.space\[darts_cnn\].widht"),
    ("search.strategy.ordre=2", r"search.strategy\[darts\].ordre"),
    ("search.strategy.w_optim.lrr=0.1", r"w_optim.lrr"),
    ("data.batch_size=abc", r"data.batch_size: expected int"),
    ("search.strategy.name=nope", r"unknown strategy 'nope'"),
    ("search.space.ops=[sep_conv_3x3, conv_9x9]", r"unknown op\(s\) \['conv_9x9'\]"),
    ("search.strategy.order=3", r"order must be 1 or 2"),
])
def test_bad_config_is_a_clear_error(override, match):
    with pytest.raises((ConfigError, ValueError, KeyError), match=match):
        load_config(ROOT / "configs/darts_fashion_mnist.yaml", [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
