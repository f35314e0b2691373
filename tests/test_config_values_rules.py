"""Rules of the configuration's values that a mutation audit could break, beyond those of
``test_config_cli_rules.py``: what :func:`convert_value` and :func:`from_dict` accept (a
float is not an int, ints given for a float become floats, union members are tried in the
order written, a list element is named by its index, every unknown key is named and the
valid ones are listed, sections are copies rather than the caller's own mappings),
:func:`check_call` on keyword-only arguments, the retrain settings that must be >= 0 or
fit float32, how a user's YAML file sits over the defaults (a mapping given replaces the
default one, an override fills in the rest), the saved config of a run read back equal to
the one saved, the default network's hint, and the devices this machine
does not have. Each test replays the rule on a tiny example rather than comparing with
text the code once printed."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from diffnas.config import (
    ConfigError,
    DataConfig,
    RetrainConfig,
    RunConfig,
    SearchConfig,
    check_call,
    check_device,
    convert_value,
    from_dict,
    load_config,
    require,
    save_config,
    to_dict,
    validate_components,
)
from diffnas.registry import UnknownNameError

ROOT = Path(__file__).resolve().parents[1]
NB201 = ROOT / "configs/darts_nb201_fashion_mnist.yaml"


# --- helpers ---------------------------------------------------------------------------
@dataclasses.dataclass
class Widths:
    width: int = 4
    depth: int = 2
    alpha: float = 0.5


@dataclasses.dataclass
class WithDerived:
    steps: int = 3
    total: int = dataclasses.field(init=False, default=0)  # computed, not a setting

    def __post_init__(self) -> None:
        self.total = 2 * self.steps


def _unknown_keys(message: str) -> list[str]:
    """The keys an "unknown config key(s) ..." message names, in its order."""
    found = re.match(r"unknown config key\(s\) (.*?); valid keys", message)
    assert found, message
    return found.group(1).split(", ")


# --- converting values to the fields' types ----------------------------------------------
@pytest.mark.parametrize("value", [2.5, 2.0, "3"])
def test_a_float_or_a_string_is_not_an_int(value):
    """``batch_size: 2.0`` is not read as 2 (nor 2.5 truncated, nor "3" parsed): an int
    field takes an int alone, and the message names the key and the value given."""
    with pytest.raises(ConfigError, match=rf"^config\.data\.batch_size: expected int, got "
                       rf"{re.escape(repr(value))}$"):
        from_dict(RunConfig, {"data": {"batch_size": value}}, "config")
    assert from_dict(RunConfig, {"data": {"batch_size": 3}}, "config").data.batch_size == 3


def test_an_int_given_for_a_float_field_is_read_as_a_float():
    cfg = load_config(None, ["retrain.lr=1", "retrain.lr_min=0"])
    assert type(cfg.retrain.lr) is float and cfg.retrain.lr == 1.0
    assert type(cfg.retrain.lr_min) is float


@pytest.mark.parametrize("tp, value, want", [
    (int | float, 3, 3), (float | int, 3, 3.0),
    (str | float, "1e-3", "1e-3"), (float | str, "1e-3", 0.001),
])
def test_union_members_are_tried_in_the_order_written(tp, value, want):
    """The first member that takes the value wins: ``int | float`` keeps 3 an int,
    ``float | str`` reads "1e-3" as the number it means."""
    out = convert_value(tp, value, "k")
    assert out == want and type(out) is type(want)


def test_a_list_element_of_the_wrong_type_is_named_by_its_index():
    with pytest.raises(ConfigError, match=r"^xs\[2\]: expected int, got 'x'$"):
        convert_value(list[int], [1, 2, "x"], "xs")
    with pytest.raises(ConfigError, match=r"^config\.plugins\[1\]: expected str, got 3$"):
        load_config(None, ["plugins=[a_module, 3]"])


def test_a_mapping_section_is_a_copy_of_the_one_given():
    """The config holds its own mappings: a caller changing its dict afterwards (or a
    default the overrides started from) leaves the config as it was read."""
    given = {"name": "darts_cnn", "C": 8}
    cfg = from_dict(RunConfig, {"search": {"space": given}}, "config")
    given["C"] = 99
    assert cfg.search.space == {"name": "darts_cnn", "C": 8}


def test_to_dict_gives_a_structure_apart_from_the_config():
    cfg = RunConfig()
    out = to_dict(cfg)
    out["retrain"]["network"]["C"] = 1
    out["search"]["strategy"]["name"] = "changed"
    assert cfg.retrain.network == RetrainConfig().network
    assert cfg.search.strategy == {"name": "darts"}


# --- from_dict: keys -----------------------------------------------------------------------
def test_every_unknown_key_is_named_with_the_sorted_valid_ones():
    with pytest.raises(ConfigError) as info:
        from_dict(Widths, {"widht": 1, "alhpa": 2.0, "depth": 3}, "net")
    message = str(info.value)
    assert _unknown_keys(message) == ["net.alhpa", "net.widht"]
    assert message.endswith("; valid keys of net: alpha, depth, width")


def test_every_unknown_key_of_a_run_config_section_is_named():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.batchsize=8", "data.nmae=digits"])
    assert _unknown_keys(str(info.value)) == ["config.data.batchsize", "config.data.nmae"]


def test_a_field_that_is_not_a_setting_is_an_unknown_key():
    """A field with ``init=False`` is computed by the class: giving it is refused as an
    unknown key (listing the settings), not a TypeError from the constructor."""
    assert from_dict(WithDerived, {"steps": 4}, "w").total == 8
    with pytest.raises(ConfigError, match=r"^unknown config key\(s\) w\.total; valid keys "
                       r"of w: steps$"):
        from_dict(WithDerived, {"total": 5}, "w")


def test_an_instance_of_the_class_is_taken_as_it_is():
    data = DataConfig(batch_size=3)
    assert from_dict(DataConfig, data, "data") is data
    with pytest.raises(ConfigError, match=r"^data: expected a mapping, got RetrainConfig"):
        from_dict(DataConfig, RetrainConfig(), "data")


def test_a_subclass_of_a_dataclass_without_its_own_decorator_is_refused():
    class MoreWidths(Widths):  # (its own settings would be no fields)
        extra: int = 1

    with pytest.raises(ConfigError, match=r"^net: '.*MoreWidths', the class its settings "
                       r"are read into, is not a dataclass"):
        from_dict(MoreWidths, {"width": 2}, "net")
    assert from_dict(Widths, {"width": 2}, "net") == Widths(width=2)


# --- check_call ---------------------------------------------------------------------------------
def test_check_call_takes_keyword_only_arguments_as_keys():
    def penalty(*, lam, predictor, scale=1.0):
        return lam, predictor, scale

    check_call(penalty, {"lam": 1, "predictor": "p.pt"}, "penalties[0]")
    check_call(penalty, {"lam": 1, "predictor": "p.pt", "scale": 2.0}, "penalties[0]")
    with pytest.raises(ConfigError, match=r"^penalties\[0\]: missing required key\(s\) "
                       r"predictor; valid keys: name, lam, predictor, scale$"):
        check_call(penalty, {"lam": 1}, "penalties[0]")


def test_check_call_names_every_unknown_key_sorted():
    def penalty(lam):
        return lam

    with pytest.raises(ConfigError) as info:
        check_call(penalty, {"lam": 1, "zz": 2, "aa": 3}, "p")
    assert _unknown_keys(str(info.value)) == ["p.aa", "p.zz"]


# --- retrain ranges -----------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["lr", "lr_min", "momentum", "weight_decay",
                                 "auxiliary_weight", "cutout", "crop_padding"])
def test_each_retrain_setting_below_zero_is_refused_and_zero_accepted(key):
    """(lr_min below 0 is no lower than lr: only the range check refuses it.)"""
    negative = -1.0 if isinstance(getattr(RetrainConfig(), key), float) else -1
    with pytest.raises(ConfigError, match=rf"^retrain\.{key} must be >= 0, got -1"):
        RetrainConfig(**{key: negative})
    assert getattr(RetrainConfig(**{key: type(negative)(0)}), key) == 0


@pytest.mark.parametrize("key", ["lr", "lr_min", "momentum", "weight_decay",
                                 "auxiliary_weight"])
def test_each_retrain_optimizer_number_must_fit_float32(key):
    """torch's optimizers refuse a number past float32 only when they step: after the
    whole search. 3.0e38 fits float32 (largest about 3.4028e38), 3.5e38 does not."""
    with pytest.raises(ConfigError, match=rf"^retrain\.{key} must be finite and at most "
                       r"3\.403e\+38 \(float32's largest\), got 3\.5e\+38$"):
        RetrainConfig(**{key: 3.5e38})
    assert getattr(RetrainConfig(**{"lr": 3.0e38, key: 3.0e38}), key) == 3.0e38


def test_the_default_network_on_another_space_says_it_was_made_for_darts_cnn():
    """A RunConfig built in Python for nb201 keeps RetrainConfig's default network (the
    DARTS CIFAR one): the refusal says where it came from; a network the user wrote gets
    the bare refusal."""
    space = SearchConfig(space={"name": "nb201", "C": 4, "N": 1})
    with pytest.raises(ConfigError, match=r"retrain\.network defaults to the DARTS CIFAR "
                       r"network .* give space 'nb201' its own retrain\.network"):
        validate_components(RunConfig(search=space), device=False)
    own = RetrainConfig(network={"C": 8, "layers": 2}, auxiliary_weight=0.0)
    with pytest.raises(ConfigError) as info:
        validate_components(RunConfig(search=space, retrain=own), device=False)
    assert "retrain.network.layers" in str(info.value)
    assert "defaults to the DARTS CIFAR network" not in str(info.value)


def test_an_unknown_network_key_is_not_blamed_on_the_auxiliary_weight():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["search.space={name: nb201, C: 4, N: 1}",
                           "retrain.network={C: 8, layers: 2}"])
    message = str(info.value)
    assert message.startswith("unknown config key(s) retrain.network.layers; ")
    assert "auxiliary_weight" not in message, message


def test_an_unknown_discretizer_is_refused_for_a_retraining_too():
    """``diffnas train`` (search=False) skips the search's checks, not the names."""
    for search in (True, False):
        with pytest.raises(UnknownNameError, match=r"^unknown discretizer 'nodisc'; known: "
                           r".*darts"):
            load_config(None, ["search.discretizer=nodisc"], search=search)


def test_a_refusal_shows_the_bad_value_as_python_writes_it():
    """A string value is quoted, so ``got '1'`` (text) differs from ``got 1``."""
    with pytest.raises(ConfigError, match=r"^k must be >= 1, got '1'$"):
        require(False, "k", ">= 1", "1")
    with pytest.raises(ConfigError, match=r"^k must be >= 1, got 0$"):
        require(False, "k", ">= 1", 0)


# --- a user's file over the defaults ------------------------------------------------------
def test_a_mapping_in_a_file_replaces_the_default_and_overrides_fill_in(tmp_path):
    """A file's ``retrain.network`` is the whole network (the default's ``layers`` is not
    merged in); a dotted override adds to the file's mapping; a retrain section without
    a network starts an override's network from the default one; a list replaces."""
    path = tmp_path / "c.yaml"
    path.write_text("retrain:\n  network: {C: 8}\nsearch:\n  space:\n    name: darts_cnn\n"
                    "    ops: [sep_conv_3x3, skip_connect]\n")
    cfg = load_config(path)
    assert cfg.retrain.network == {"C": 8}
    assert cfg.search.space["ops"] == ["sep_conv_3x3", "skip_connect"]
    assert cfg.retrain.epochs == RetrainConfig().epochs  # the section's other defaults
    assert load_config(path, ["retrain.network.layers=3"]).retrain.network == {
        "C": 8, "layers": 3}
    path.write_text("retrain:\n  epochs: 3\n")
    default = RetrainConfig().network
    assert load_config(path, ["retrain.network.C=16"]).retrain.network == {**default,
                                                                         "C": 16}


def test_a_directory_given_as_the_config_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=rf"^config file not found: {re.escape(str(tmp_path))}$"):
        load_config(tmp_path)


# --- the saved config ------------------------------------------------------------------------
@pytest.mark.parametrize("name, overrides", [
    ("darts_fashion_mnist.yaml", ["seed=7", "retrain.lr=1", "plugins=[]"]),
    ("darts_nb201_fashion_mnist.yaml", ["search.diagnostics.cell=cell"]),
    ("darts_rnn_ptb.yaml", ["lm.eval_batch_size=4"]),
    ("gnn_cora.yaml", []),
])
def test_a_saved_config_reads_back_equal_and_in_field_order(tmp_path, name, overrides):
    cfg = load_config(ROOT / "configs" / name, overrides, device=False)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml", device=False, saved=True)
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    body = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert list(body) == [f.name for f in dataclasses.fields(RunConfig)]  # seed first


# --- the device ---------------------------------------------------------------------------------
def test_cuda_is_refused_when_torch_sees_no_gpu_whatever_the_device_count(monkeypatch):
    """Without CUDA, ``device_count`` is not asked (a driver without a GPU may answer
    anything); every cuda device is refused, naming 0 devices."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for device in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ConfigError, match=rf"^config\.device: '{device}' but this "
                           r"machine has 0 CUDA device\(s\)"):
            check_device(device)


def test_mps_is_refused_on_a_machine_without_it(monkeypatch):
    import torch

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"config\.device: 'mps'"):
        check_device("mps")
