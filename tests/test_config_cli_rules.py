"""Rules of the configuration and the command line that a mutation audit could break:
the boundaries of each value check (0, 1, equal to the limit), how YAML values are
converted to the fields' types (bools are not numbers, strings are not lists, an empty
section is the defaults), how overrides are split and applied, the saved config's digest,
the device check, the plugin loader (which entries are files, what a failed import leaves
behind) and the registries (built-in versus plugin names). Each test replays the rule on a
tiny example or compares with an independent computation, rather than with numbers the
code once printed."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import sys

import pytest

from diffnas.config import (
    MAX_CELL_EDGES,
    ConfigError,
    DataConfig,
    RetrainConfig,
    RunConfig,
    check_call,
    convert_value,
    from_dict,
    load_config,
    require_cell_edges,
    require_float32,
    require_sizes,
)


# --- helpers ---------------------------------------------------------------------------
@dataclasses.dataclass
class Sizes:
    width: int = 4
    depth: int | None = None


@dataclasses.dataclass
class Rates:
    lr: float = 0.1


@dataclasses.dataclass
class NeedsFile:
    seed_file: str
    steps: int = 8


def _most(edges, limit: int = MAX_CELL_EDGES) -> int:
    """The largest node count whose cell has at most ``limit`` edges, by brute force."""
    return max(n for n in range(1, 400) if edges(n) <= limit)


# --- value checks: boundaries -----------------------------------------------------------
def test_require_sizes_takes_null_only_where_the_field_is_optional():
    require_sizes(Sizes(width=1, depth=None), ("width", "depth"), "net")  # both allowed
    with pytest.raises(ConfigError, match=r"^net\.width must be >= 1, got None$"):
        require_sizes(Sizes(width=None), ("width",), "net")
    with pytest.raises(ConfigError, match=r"^net\.depth must be >= 1 \(or null\), got 0$"):
        require_sizes(Sizes(depth=0), ("depth",), "net")


@pytest.mark.parametrize("edges", [lambda n: n * MAX_CELL_EDGES // 5,
                                   lambda n: n * (n + 3) // 2, lambda n: n * (n + 1) // 2],
                         ids=["exactly-at-5", "n(n+3)/2", "n(n+1)/2"])
def test_a_cell_at_the_edge_limit_loads_and_one_node_more_names_the_largest_count(edges):
    """The largest node count (found by brute force) loads, one more is refused naming it;
    the first formula reaches MAX_CELL_EDGES exactly (at 5 nodes), which is allowed."""
    most = _most(edges)
    require_cell_edges(most, edges, "f(n)")
    with pytest.raises(ConfigError, match=rf"nodes must be at most {most} \(a cell of n "
                       rf"nodes has f\(n\) mixed edges.* got {most + 1}$"):
        require_cell_edges(most + 1, edges, "f(n)")



@pytest.mark.parametrize("value", [-3.5e38, 3.5e38])
def test_numbers_beyond_float32_are_refused_whatever_their_sign(value):
    with pytest.raises(ConfigError, match=r"^opt\.lr must be finite and at most 3\.403e\+38"):
        require_float32(Rates(lr=value), ("lr",), "opt")
    require_float32(Rates(lr=-3.4e38), ("lr",), "opt")  # float32's most negative: fits


@pytest.mark.parametrize("split", [0.0, 1.0, -0.1])
def test_a_search_split_of_zero_or_one_is_refused(split):
    """The split gives weights and alphas a part each: 0 or 1 leaves one of them none."""
    with pytest.raises(ConfigError, match=r"data\.search_split must be in \(0, 1\)"):
        DataConfig(search_split=split)


@pytest.mark.parametrize("split", [1e-6, 0.5, 1 - 1e-6])
def test_a_search_split_strictly_inside_zero_one_is_accepted(split):
    assert DataConfig(search_split=split).search_split == split


@pytest.mark.parametrize("override, key", [("data.batch_size=0", "data.batch_size"),
                                           ("search.epochs=0", "search.epochs")])
def test_a_count_of_zero_is_refused_and_one_accepted(override, key):
    with pytest.raises(ConfigError, match=rf"{key} must be >= 1, got 0"):
        load_config(None, [override])
    one = load_config(None, [override.replace("=0", "=1")])
    section, field = key.split(".")
    assert getattr(getattr(one, section), field) == 1


# --- converting YAML values to the fields' types ----------------------------------------
def test_null_for_a_union_without_none_is_refused_naming_the_union():
    """``recompute: bool | int``: null fits neither, and the message names the union
    rather than one member's complaint."""
    with pytest.raises(ConfigError, match=r"search\.space\[darts_cnn\]\.recompute: None "
                       r"does not fit bool \| int"):
        load_config(None, ["search.space.recompute=null"])
    with pytest.raises(ConfigError, match=r"^k: None does not fit"):
        convert_value(int | float, None, "k")
    assert convert_value(int | None, None, "k") is None


def test_a_tuple_field_is_read_as_a_tuple_of_its_type():
    out = convert_value(tuple[float, float], [1, "2e-1"], "betas")
    assert out == (1.0, 0.2) and type(out) is tuple and all(type(b) is float for b in out)
    assert type(convert_value(list[int], (1, 2), "xs")) is list


@pytest.mark.parametrize("override, match", [
    ("plugins=my_ops.py", r"config\.plugins: expected a list, got 'my_ops\.py'"),
    ("retrain.network=null", r"config\.retrain\.network: expected a mapping, got None"),
    ("retrain.network=[C, 8]", r"config\.retrain\.network: expected a mapping"),
    ("data.batch_size=true", r"config\.data\.batch_size: expected int, got True"),
    ("retrain.flip=1", r"config\.retrain\.flip: expected bool, got 1"),
    ("name=7", r"config\.name: expected str, got 7"),
])
def test_a_value_of_the_wrong_kind_is_refused_not_coerced(override, match):
    """A string is not a one-entry list (it would be read letter by letter), null is not
    an empty mapping, ``true`` is not the batch size 1, ``1`` is not ``true``."""
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_an_empty_section_in_a_file_is_that_section_s_defaults(tmp_path):
    """``retrain:`` with nothing under it (YAML's null: every key commented out) reads as
    the section's defaults."""
    path = tmp_path / "c.yaml"
    path.write_text("retrain:\n#  epochs: 3\ndata:\n")
    cfg = load_config(path)
    assert cfg.retrain == RetrainConfig() and cfg.data == DataConfig()


def test_a_missing_required_setting_is_a_config_error_naming_the_section():
    with pytest.raises(ConfigError, match=r"^engine: .*seed_file"):
        from_dict(NeedsFile, {"steps": 3}, "engine")
    assert from_dict(NeedsFile, {"seed_file": "s.txt"}, "engine") == NeedsFile("s.txt")


def test_check_call_lets_any_key_through_to_a_function_taking_keywords():
    def open_kw(lam, **extra):
        return lam, extra

    check_call(open_kw, {"lam": 1, "anything": 2}, "penalties[0]")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) penalties\[0\]\.anything"
                       r"; valid keys of penalties\[0\]: name, lam$"):
        check_call(lambda lam: lam, {"lam": 1, "anything": 2}, "penalties[0]")


# --- run settings ------------------------------------------------------------------------
def test_the_auxiliary_head_is_added_only_with_a_positive_weight_and_never_overrides():
    assert RetrainConfig(auxiliary_weight=0.4, network={"C": 8}).image_network() == {
        "C": 8, "auxiliary": True}
    assert RetrainConfig(auxiliary_weight=0.0, network={"C": 8}).image_network() == {"C": 8}
    # the user's own word on the head is kept
    said = RetrainConfig(auxiliary_weight=0.4, network={"C": 8, "auxiliary": False})
    assert said.image_network()["auxiliary"] is False


@pytest.mark.parametrize("drop_path", [-0.1, 1.0])
def test_drop_path_outside_zero_one_is_refused(drop_path):
    with pytest.raises(ConfigError, match=r"retrain\.drop_path must be in \[0, 1\)"):
        RetrainConfig(drop_path=drop_path)
    assert RetrainConfig(drop_path=0.0).drop_path == 0.0


@pytest.mark.parametrize("seed, ok", [(0, True), (2**32 - 1, True), (2**32, False),
                                      (-1, False), (1.5, False), ("3", False)])
def test_the_seed_is_an_integer_in_numpys_range(seed, ok):
    if ok:
        assert RunConfig(seed=seed).seed == seed
    else:
        with pytest.raises(ConfigError, match=r"^seed must be an integer in \[0, 2\*\*32\)"):
            RunConfig(seed=seed)


def test_the_logger_must_be_jsonl_or_tensorboard():
    with pytest.raises(ConfigError, match=r"config\.logger: 'csv' is not one of jsonl, "
                       r"tensorboard"):
        load_config(None, ["logger=csv"])


# --- overrides -----------------------------------------------------------------------------
def test_an_override_value_may_hold_an_equals_sign_and_the_key_spaces():
    """``key=value`` splits at the first ``=``; spaces around the key are dropped."""
    from diffnas.config import parse_override

    assert parse_override("name=a=b") == (["name"], "a=b")
    assert parse_override(" search.epochs =3") == (["search", "epochs"], 3)
    cfg = load_config(None, ["name=lr=0.1", "search.epochs =3"])
    assert cfg.name == "lr=0.1" and cfg.search.epochs == 3


def test_an_override_below_a_value_is_refused_naming_the_value():
    with pytest.raises(ConfigError, match=r"override 'search\.epochs\.x=1': 'epochs' is not "
                       r"a section"):
        load_config(None, ["search.epochs.x=1"])


@pytest.mark.parametrize("text, hint", [("my.yaml", True), ("MY.YML", True),
                                        ("search.epochs", False)])
def test_an_override_without_equals_that_names_a_yaml_file_points_at_config(text, hint):
    from diffnas.config import parse_override

    with pytest.raises(ConfigError, match=rf"override '{text}' must look like key\.sub="
                       r"value") as info:
        parse_override(text)
    assert ("given as --config PATH" in str(info.value)) is hint


def test_apply_overrides_starts_a_missing_section_from_its_defaults_at_every_depth():
    from diffnas.config import apply_overrides

    defaults = {"a": {"b": {"c": 1, "d": 2}, "e": 3}}
    out = apply_overrides({}, ["a.b.c=5"], defaults)
    assert out == {"a": {"b": {"c": 5, "d": 2}, "e": 3}}
    assert defaults == {"a": {"b": {"c": 1, "d": 2}, "e": 3}}  # left as it was
    assert apply_overrides({"a": {"b": {"c": 0}}}, ["a.b.d=7"], defaults) == {
        "a": {"b": {"c": 0, "d": 7}}}  # a section given is not filled in


# --- config files ----------------------------------------------------------------------------
def test_an_empty_config_file_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set yet\n")
    assert load_config(path) == load_config(None)


def test_a_config_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- seed: 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: top level must be a mapping$"):
        load_config(path)


def test_the_saved_digest_is_of_the_lines_below_it_and_survives_crlf(tmp_path):
    from diffnas.config import DIGEST_PREFIX, save_config, saved_config_edit

    path = tmp_path / "config.yaml"
    save_config(load_config(None, ["search.epochs=3"]), path)
    text = path.read_text()
    first, _, body = text.partition("\n")
    assert first.startswith(DIGEST_PREFIX + hashlib.sha256(body.encode()).hexdigest())
    assert not saved_config_edit(text)
    assert not saved_config_edit(text.replace("\n", "\r\n"))  # an editor's line ends
    assert saved_config_edit(text.replace("epochs: 3", "epochs: 4"))
    assert saved_config_edit(text[:-20])  # cut short
    assert not saved_config_edit(body)  # no digest line (by hand): not judged


# --- the device -------------------------------------------------------------------------------
@pytest.fixture
def one_gpu(monkeypatch):
    """This machine seen as having one CUDA device (checks only: nothing is built)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_a_device_index_past_the_machine_s_gpus_is_refused(one_gpu):
    from diffnas.config import check_device

    check_device("cuda")
    check_device("cuda:0")
    with pytest.raises(ConfigError, match=r"'cuda:1' but this machine has 1 CUDA device"):
        check_device("cuda:1")


def test_one_gpu_index_for_several_processes_is_refused(one_gpu, monkeypatch):
    import diffnas.engine.distributed as dist_mod
    from diffnas.config import check_device

    monkeypatch.setattr(dist_mod, "planned_world_size", lambda: 2)
    monkeypatch.setattr(dist_mod, "nccl_for_cuda", lambda: True)
    check_device("cuda")  # each process takes cuda:LOCAL_RANK
    with pytest.raises(ConfigError, match=r"'cuda:0' would put all 2 processes on one GPU"):
        check_device("cuda:0")
    monkeypatch.setattr(dist_mod, "nccl_for_cuda", lambda: False)  # gloo shares a GPU
    check_device("cuda:0")


@pytest.mark.parametrize("device", ["meta", "cpu", "auto"])
def test_only_cpu_cuda_mps_and_auto_are_devices_of_a_run(device):
    from diffnas.config import check_device

    if device == "meta":
        with pytest.raises(ConfigError, match=r"config\.device: 'meta' is not supported"):
            check_device(device)
    else:
        check_device(device)


# --- plugins ----------------------------------------------------------------------------------
@pytest.mark.parametrize("entry, is_file", [
    ("my_ops.py", True), ("lab/ops", True), ("lab\\ops", True), ("~/ops.py", True),
    ("mylab.ops", False), ("my_ops", False)])
def test_an_entry_is_a_file_when_it_ends_in_py_or_holds_a_slash(entry, is_file):
    from diffnas.plugins import is_file_plugin

    assert is_file_plugin(entry) is is_file


def test_a_file_entry_under_home_is_made_absolute_and_a_module_is_kept(tmp_path, monkeypatch):
    from diffnas.plugins import absolute_plugins

    monkeypatch.setenv("HOME", str(tmp_path))
    assert absolute_plugins(["~/ops.py", "mylab.ops"]) == [str(tmp_path / "ops.py"),
                                                           "mylab.ops"]


@pytest.mark.parametrize("entry", ["", "   ", 3])
def test_an_empty_or_non_string_entry_is_refused_by_name(entry):
    from diffnas.plugins import import_plugins

    with pytest.raises(ConfigError, match=rf"config\.plugins: {entry!r} is not a module name "
                       r"or file path"):
        import_plugins([entry])


def test_a_plugin_file_named_like_an_imported_module_does_not_replace_it(tmp_path,
                                                                         clean_path):
    """A plugin ``json.py`` is imported under a name made of its path: ``json`` stays the
    standard library's for everything else in the process."""
    import json

    from diffnas.plugins import import_plugins

    (tmp_path / "json.py").write_text("WHO = 'plugin'\n")
    (module,) = import_plugins([str(tmp_path / "json.py")])
    assert module.WHO == "plugin" and module.__name__.startswith("diffnas_plugin_")
    assert sys.modules["json"] is json
    del sys.modules[module.__name__]


def test_two_plugin_files_with_one_name_in_two_folders_are_both_imported(tmp_path,
                                                                          clean_path):
    from diffnas.plugins import import_plugins

    for who in ("a", "b"):
        (tmp_path / who).mkdir()
        (tmp_path / who / "p_rule_same.py").write_text(f"WHO = {who!r}\n")
    first, second = import_plugins([str(tmp_path / "a" / "p_rule_same.py"),
                                    str(tmp_path / "b" / "p_rule_same.py")])
    assert (first.WHO, second.WHO) == ("a", "b")


def test_a_failing_plugin_file_leaves_sys_path_as_it_was(tmp_path, clean_path):
    from diffnas.plugins import import_plugins

    (tmp_path / "p_rule_fails.py").write_text("raise RuntimeError('broken on purpose')\n")
    before = list(sys.path)
    with pytest.raises(ConfigError, match=r"importing '.*p_rule_fails\.py' failed: "
                       r"RuntimeError: broken on purpose \(at .*p_rule_fails\.py:1\)"):
        import_plugins([str(tmp_path / "p_rule_fails.py")])
    assert sys.path == before and "p_rule_fails" not in sys.modules


def test_a_module_not_found_leaves_sys_path_as_it_was(tmp_path, monkeypatch, clean_path):
    from diffnas.plugins import import_plugins

    monkeypatch.chdir(tmp_path)
    sys.path[:] = [p for p in sys.path if p not in ("", str(tmp_path))]
    before = list(sys.path)
    with pytest.raises(ConfigError, match=rf"no module named 'p_rule_absent' on the Python "
                       rf"path or in {tmp_path}"):
        import_plugins(["p_rule_absent"])
    assert sys.path == before


def test_a_module_plugin_missing_its_own_import_names_that_import(tmp_path, monkeypatch,
                                                                  clean_path):
    """Found, but it imports a package that is not installed: the message names that
    package, not "no module named <plugin>"."""
    from diffnas.plugins import import_plugins

    (tmp_path / "p_rule_needs.py").write_text("import p_rule_not_installed\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"importing 'p_rule_needs' failed: "
                       r"ModuleNotFoundError: No module named 'p_rule_not_installed'"):
        import_plugins(["p_rule_needs"])


def test_changed_plugins_compares_code_by_entry_then_by_file_name():
    from diffnas.plugins import changed_plugins

    rec = {"ops.py": {"file": "/old/ops.py", "sha256": "1"}}
    assert changed_plugins(rec, {"ops.py": {"file": "/old/ops.py", "sha256": "1"}}) == []
    assert changed_plugins(rec, {"ops.py": {"file": "/old/ops.py", "sha256": "2"}}) == [
        "/old/ops.py"]
    # moved (another entry now): matched by its file name
    assert changed_plugins(rec, {"/new/ops.py": {"file": "/new/ops.py", "sha256": "2"}}) == [
        "/new/ops.py"]
    assert changed_plugins(rec, {"/new/other.py": {"file": "/new/other.py",
                                                   "sha256": "2"}}) == []


# --- registries -----------------------------------------------------------------------------
@pytest.mark.parametrize("module, own", [
    ("diffnas", True), ("diffnas.ops.conv", True), ("diffnas_plugin__tmp_x_py", False),
    ("diffnasty", False), ("my_ops", False), (None, False)])
def test_builtin_means_diffnas_or_a_module_below_it(module, own):
    from diffnas.registry import builtin

    assert builtin(module) is own


def test_a_registry_lists_sorted_names_and_answers_in_for_any_object():
    from diffnas.registry import Registry, UnknownNameError

    reg = Registry("widget")
    for name in ("zeta", "alpha", "mid"):
        reg.register(name)(object())
    assert reg.names() == ["alpha", "mid", "zeta"] == list(reg)
    assert "mid" in reg and {"name": "mid"} not in reg and 3 not in reg
    with pytest.raises(ValueError, match=r"widget 'mid' is already registered"):
        reg.register("mid")(object())
    with pytest.raises(UnknownNameError, match=r"^unknown widget 'nope'; known: alpha, mid, "
                       r"zeta \(one registered"):
        reg.get("nope")
    with pytest.raises(UnknownNameError, match=r"unknown widget \{'name': 'mid'\} \(of type "
                       r"dict: a widget is named by a string\)"):
        reg.get({"name": "mid"})


def test_a_failed_import_undoes_its_own_registrations_and_modules_only(monkeypatch):
    """Names a plugin registered are removed, with the new module that defined them; a
    built-in's name (a diffnas module imported meanwhile) and older modules stay."""
    import types

    from diffnas.registry import Registry, registrations_undone_on_error

    reg = Registry("gadget")
    reg.register("old")(type("Old", (), {"__module__": "p_rule_old"}))
    monkeypatch.setitem(sys.modules, "p_rule_old", types.ModuleType("p_rule_old"))
    with pytest.raises(RuntimeError), registrations_undone_on_error():
        sys.modules["p_rule_new"] = types.ModuleType("p_rule_new")
        reg.register("mine")(type("Mine", (), {"__module__": "p_rule_new"}))
        reg.register("core")(type("Core", (), {"__module__": "diffnas.p_rule_core"}))
        raise RuntimeError("the plugin fails after registering")
    assert reg.names() == ["core", "old"]
    assert "p_rule_new" not in sys.modules and "p_rule_old" in sys.modules


# --- the command line -------------------------------------------------------------------------
def test_an_unknown_flag_after_the_kind_is_an_error_not_an_override(capsys):
    from diffnas.cli import main

    with pytest.raises(SystemExit) as info:
        main(["list", "ops", "--colour=red"])
    assert info.value.code == 2
    assert "unrecognized arguments: --colour=red" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["list", "ops", "plugins=my_ops.py"], r"config\.plugins: expected a list of modules "
                                           r"or \.py files, got 'my_ops\.py'"),
    (["list", "ops", "--config", "/nonexistent/c.yaml"], r"config file not found: "
                                                          r"/nonexistent/c\.yaml"),
])
def test_list_refuses_plugins_that_are_not_a_list(argv, match, capsys):
    from diffnas.cli import main

    assert main(argv) == 2
    assert re.search(match, capsys.readouterr().err)


def test_list_reads_only_the_plugins_key_of_its_overrides(capsys):
    """``plugins.x=1`` is another dotted key: accepted, not used."""
    from diffnas.cli import main

    assert main(["list", "strategies", "plugins.x=1", "device=nope"]) == 0
    assert "darts" in capsys.readouterr().out.split()


def test_list_imports_the_plugins_its_config_names(tmp_path, capsys, clean_path):
    from diffnas.cli import main

    (tmp_path / "p_rule_discretizer.py").write_text(
        "from diffnas.genotype.discretize import DISCRETIZERS\n"
        "@DISCRETIZERS.register('p_rule_listed')\n"
        "def listed(*args, **kwargs):\n"
        "    raise NotImplementedError\n")
    (tmp_path / "c.yaml").write_text(f"plugins: [{tmp_path / 'p_rule_discretizer.py'}]\n"
                                     "device: nowhere\n")
    try:
        assert main(["list", "discretizers", "--config", str(tmp_path / "c.yaml")]) == 0
        out = capsys.readouterr().out.splitlines()
        assert f"p_rule_listed (plugin: {tmp_path / 'p_rule_discretizer.py'})" in out
    finally:
        from diffnas.genotype.discretize import DISCRETIZERS

        DISCRETIZERS._items.pop("p_rule_listed", None)


def test_an_engine_s_settings_are_shown_with_defaults_and_required_ones_marked():
    from diffnas.cli import _settings_text

    @dataclasses.dataclass
    class Settings:
        seed_file: str
        envs: int = 8
        gammas: list = dataclasses.field(default_factory=lambda: [0.9])

    assert _settings_text(Settings) == "seed_file (required), envs=8, gammas=[0.9]"


def test_an_os_error_names_its_paths_first():
    import errno

    from diffnas.cli import os_error_message

    err = OSError(errno.ENOENT, "No such file or directory", "a.txt", None, "b.txt")
    assert os_error_message(err) == "a.txt -> b.txt: No such file or directory"
    assert os_error_message(OSError("a message of its own")) == "a message of its own"


def test_a_folder_asked_where_a_file_is_says_so(tmp_path):
    import errno

    from diffnas.cli import os_error_message

    (tmp_path / "runs").write_text("")
    err = FileExistsError(errno.EEXIST, "File exists", str(tmp_path / "runs"))
    assert os_error_message(err) == f"{tmp_path / 'runs'} is a file, not a folder: choose " \
        "another path"


def _args(**kw):
    import argparse

    base = {"command": "search", "resume": None, "seeds": None, "overrides": [],
            "dry_run": False, "_run_dir": None, "genotype": None}
    return argparse.Namespace(**{**base, **kw})


def test_a_full_disk_says_how_to_resume_the_run():
    import errno

    from diffnas.cli import _way_on

    full = OSError(errno.ENOSPC, "No space left on device")
    assert _way_on(_args(_run_dir="runs/r 1"), full) == (
        "; free some space, then resume with: diffnas search --resume 'runs/r 1'")
    assert _way_on(_args(), full) == ""  # no run directory yet: nothing to resume


def test_the_resume_hint_repeats_a_resume_s_overrides_only():
    from diffnas.cli import _resume_hint

    assert _resume_hint(_args(_run_dir="runs/r", overrides=["search.epochs=3"])) == \
        "diffnas search --resume runs/r"  # a new run's overrides are in its config.yaml
    assert _resume_hint(_args(resume="runs/r", overrides=["device=cpu"])) == \
        "diffnas search --resume runs/r device=cpu"


def test_missing_data_hint_leaves_out_the_data_root_that_failed():
    from diffnas.cli import _way_on
    from diffnas.data import DatasetNotFoundError

    hint = _way_on(_args(resume="runs/r", overrides=["data.root=/old", "device=cpu"]),
                   DatasetNotFoundError("files not found"))
    assert "diffnas search --resume runs/r device=cpu;" in hint and "/old" not in hint


def test_seeds_under_torchrun_are_refused(monkeypatch, capsys):
    import diffnas.engine.distributed as dist_mod
    import diffnas.engine.multiseed as multiseed
    from diffnas.cli import main

    monkeypatch.setattr(dist_mod, "planned_world_size", lambda: 2)
    monkeypatch.setattr(multiseed, "seeds_command", lambda args: 99)  # (would run seeds)
    assert main(["search", "--seeds", "0,1", "search.epochs=1"]) == 2
    assert "--seeds runs its seeds as separate processes itself; launch it with python -m " \
        "diffnas, not under torchrun with 2 processes" in capsys.readouterr().err


def test_a_config_error_on_a_rank_other_than_zero_is_left_to_rank_zero(monkeypatch, capsys):
    import diffnas.engine.distributed as dist_mod
    from diffnas.cli import main

    for var in dist_mod.TORCHRUN_VARS:
        monkeypatch.setenv(var, "0")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["list", "ops", "--config", "/nonexistent/c.yaml"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["list", "ops", "--config", "/nonexistent/c.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_an_unread_retrain_setting_is_refused_for_diffnas_train_even_with_retraining_off():
    """A search with ``retrain.enabled=false`` never retrains, so it reads no retrain
    setting; ``diffnas train`` (``search=False``) retrains whatever ``enabled`` says."""
    from pathlib import Path

    from diffnas.config import validate_components

    nb201 = Path(__file__).resolve().parents[1] / "configs/darts_nb201_fashion_mnist.yaml"
    cfg = load_config(nb201, ["retrain.enabled=false", "retrain.drop_path=0.3"])
    validate_components(cfg, device=False, unused_data=False)  # the search's: accepted
    with pytest.raises(ConfigError, match=r"retrain\.drop_path: the nb201 network's "
                       r"retraining does not read this"):
        validate_components(cfg, device=False, search=False, unused_data=False)


@pytest.mark.parametrize("prefix, default_min", [("search.strategy.w_optim", 0.001),
                                                 ("retrain", 0.0)])
def test_an_lr_min_above_lr_is_refused_and_an_equal_one_is_a_constant_lr(prefix, default_min):
    """A cosine schedule from lr to lr_min > lr would raise the learning rate over the run
    (e.g. lowering ``w_optim.lr`` below the default lr_min alone)."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(prefix)}\.lr_min=0\.002 > lr="
                       r"0\.001: the cosine schedule would raise the learning rate"):
        load_config(None, [f"{prefix}.lr=0.001", f"{prefix}.lr_min=0.002"])
    load_config(None, [f"{prefix}.lr=0.002", f"{prefix}.lr_min=0.002"])
    load_config(None, [f"{prefix}.lr={default_min}"])  # down to the default lr_min
