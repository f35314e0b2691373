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
    ("retrain.lr=abc", r"retrain.lr: expected a number, got 'abc'"),
    ("retrain.lr=true", r"retrain.lr: expected a number, got True"),
    ("data.search_split=1.5", r"search_split must be in \(0, 1\)"),
    ("search.epochs=-2", r"search.epochs must be >= 1"),
    ("retrain.epochs=0", r"retrain.epochs must be >= 1 \(retrain.enabled=false skips "
                         r"retraining\), got 0$"),
    ("retrain.batch_size=0", r"retrain.batch_size must be >= 1 .*, got 0$"),
    ("device=gpu", r"config.device: 'gpu' is not a device"),
    ("search.discretizer=foo", r"unknown discretizer 'foo'"),
    ("data.name=imagenet", r"unknown dataset 'imagenet'"),
    ("search.space.ops=[none]", r"at least one op besides 'none'"),
])
def test_bad_config_is_a_clear_error(override, match):
    with pytest.raises((ConfigError, ValueError, KeyError), match=match):
        load_config(ROOT / "configs/darts_fashion_mnist.yaml", [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_float_written_without_a_dot_is_a_number():
    """YAML reads ``1e-3`` as a string; the config reads it as the number it means."""
    cfg = load_config(None, ["retrain.lr=1e-3", "search.strategy.w_optim.lr=2e-2"])
    assert cfg.retrain.lr == 0.001 and isinstance(cfg.retrain.lr, float)
    from diffnas.strategies import strategy_config

    assert strategy_config(cfg.search.strategy).w_optim.lr == 0.02


def test_an_override_inside_a_default_mapping_keeps_its_other_keys():
    cfg = load_config(None, ["retrain.network.C=16", "search.strategy.order=2"])
    assert cfg.retrain.network == {"C": 16, "layers": 20}
    assert cfg.search.strategy == {"name": "darts", "order": 2}
    # a whole mapping still replaces the default
    assert load_config(None, ["retrain.network={C: 8}"]).retrain.network == {"C": 8}


def test_a_relaxation_setting_without_a_name_changes_the_strategys_own_relaxation():
    """``search.strategy.relaxation.tau=5`` on gdas was refused as "relaxation must be
    'hard_gumbel', got None": the section without a name now keeps the strategy's
    relaxation and its other settings; a named one still replaces it."""
    from diffnas.strategies.registry import check_strategy

    cfg = load_config(None, ["search.strategy.name=gdas", "search.strategy.relaxation.tau=5"])
    assert check_strategy(cfg.search.strategy).relaxation == {
        "name": "hard_gumbel", "tau": 5, "tau_min": 0.1, "anneal": "linear"}
    named = {"name": "gdas", "relaxation": {"name": "hard_gumbel", "tau": 5}}
    assert check_strategy(named).relaxation == {"name": "hard_gumbel", "tau": 5}
    with pytest.raises(ConfigError, match="tau"):  # darts' softmax takes no temperature
        load_config(None, ["search.strategy.relaxation.tau=5"])


def test_a_data_root_under_home_is_expanded_for_every_dataset(tmp_path, monkeypatch):
    """``data.root=~/corpus`` worked for npz and folder alone (their loaders expand it);
    ptb looked for a literal ~/corpus/ptb.train.txt."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name, space in (("ptb", "darts_rnn"), ("fashion_mnist", "darts_cnn"),
                        ("npz", "darts_cnn")):
        cfg = load_config(None, [f"data.name={name}", "data.root=~/corpus",
                                 f"search.space.name={space}"], device=False)
        assert cfg.data.root == str(tmp_path / "corpus")


def test_a_relative_data_root_that_exists_is_kept_absolute(tmp_path, monkeypatch):
    """A relative data.root was saved as typed, so the run's resume and its printed
    follow-up commands (diffnas train --config RUN/config.yaml) failed from any other
    directory. A relative path naming nothing (e.g. a plugin loader's own address) is
    left as given."""
    (tmp_path / "corpus").mkdir()
    monkeypatch.chdir(tmp_path)
    corpus = str(tmp_path / "corpus")
    for root, want in (("corpus", corpus), ("./corpus/", corpus),
                       ("bucket:scans/2026", "bucket:scans/2026")):
        cfg = load_config(None, ["data.name=ptb", f"data.root={root}",
                                 "search.space.name=darts_rnn"], device=False)
        assert cfg.data.root == want
    cfg = load_config(None, ["data.name=cifar10", "data.root=new_dir", "data.download=true"],
                      device=False)  # where a download will put the files
    assert cfg.data.root == str(tmp_path / "new_dir")


def test_cuda_on_a_machine_without_it_is_refused_before_anything_runs():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="0 CUDA device"):
        load_config(None, ["device=cuda"])


def test_a_run_made_on_a_gpu_can_still_be_read_here(tmp_path):
    """Reports and export read a run's config without requiring its device."""
    import torch

    from diffnas.engine.rundir import load_run_config

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "config.yaml").write_text("device: cuda\n")
    with pytest.raises(ConfigError, match="0 CUDA device"):
        load_run_config(tmp_path)
    assert load_run_config(tmp_path, device=False).device == "cuda"
    assert load_run_config(tmp_path, ["device=cpu"]).device == "cpu"  # resume elsewhere


def test_a_language_model_eval_batch_of_one_is_refused_at_load():
    with pytest.raises(ValueError, match="lm.eval_batch_size must be >= 2"):
        load_config(ROOT / "configs/darts_rnn_ptb.yaml", ["lm.eval_batch_size=1"])


def test_a_language_model_run_names_a_text_dataset():
    with pytest.raises(ConfigError, match="'digits' is not a text dataset.*ptb"):
        load_config(ROOT / "configs/darts_rnn_ptb.yaml", ["data.name=digits"])
