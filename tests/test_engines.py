"""Engines (engine/engines.py): every command reaches a space's search and retraining
through the engine its space names, so a new kind of task is one plugin module (an
Engine plus a space naming it), with no edit to the commands or the config checks."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import pytest

from diffnas.cli import main
from diffnas.config import ConfigError, load_config
from diffnas.engine.engines import (
    ENGINES,
    all_engines,
    engine_of,
    get_engine,
    list_engines,
    register_engine,
)
from diffnas.export import ExportError, check_exportable
from diffnas.genotype import resolve_genotype
from diffnas.plugins import import_plugins

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# A plugin: an engine whose "search" records what it was given, and a space naming it.
PLUGIN = '''
import json
from diffnas.engine.engines import Engine, register_engine
from diffnas.spaces import register_space
from diffnas.spaces.darts_cnn import DartsCnnSpace


def search(cfg, run_dir, resume):
    (run_dir / "toy.json").write_text(json.dumps({{"data": cfg.data.name, "resume": resume}}))
    print("toy search ran")
    return 3


def train(cfg, genotype, run_dir, resume):
    (run_dir / "toy_train.json").write_text(json.dumps({{"genotype": genotype.to_dict()}}))


def unused(*_):
    raise AssertionError("not called by these tests")


register_engine(Engine(
    name="{engine}", label="toy ({engine})", a_run="a toy run", data_kind="toy",
    datasets=lambda: ["toyset"], search=search, train=train, run_search=unused,
    run_retrain=unused, summary=lambda cfg, genotype: {{"toy": cfg.data.name}},
    unused_data=("resolution",)))


@register_space("{space}")
class ToySpace(DartsCnnSpace):
    engine = "{engine}"
'''


def _plugin(tmp_path: Path) -> tuple[Path, str, str]:
    """A plugin file registering an engine and a space of fresh names (registries are
    global to the test process)."""
    tag = uuid.uuid4().hex[:8]
    engine, space = f"toy_{tag}", f"toy_space_{tag}"
    path = tmp_path / f"toy_engine_{tag}.py"
    path.write_text(PLUGIN.format(engine=engine, space=space))
    return path, engine, space


@pytest.mark.parametrize("config, engine", [
    (None, "image"), ("darts_nb201_fashion_mnist.yaml", "image"),
    ("darts_rnn_ptb.yaml", "language_model"), ("gnn_cora.yaml", "graph")])
def test_each_built_in_space_is_run_by_its_engine(config, engine):
    cfg = load_config(CONFIGS / config if config else None, [])
    assert engine_of(cfg) is get_engine(engine)
    assert get_engine(engine).exportable == get_engine(engine).timed == (engine == "image")


@pytest.mark.parametrize("name", list_engines())
def test_every_engine_names_real_settings_and_datasets_of_its_own(name):
    """Over the registry (a new built-in engine is checked with no new test code): the
    settings it refuses as unread exist (a misspelt one would never be refused), its
    datasets belong to no other engine (a name's kind must be one), some space runs on
    it, and its sections are sections of the config."""
    import dataclasses

    from diffnas.config import DataConfig, RetrainConfig, RunConfig
    from diffnas.spaces import SPACES

    engine = get_engine(name)
    assert set(engine.unused_data) <= {f.name for f in dataclasses.fields(DataConfig)}
    assert set(engine.unread_retrain) <= {f.name for f in dataclasses.fields(RetrainConfig)}
    assert set(engine.sections) <= {f.name for f in dataclasses.fields(RunConfig)}
    own = set(engine.datasets())
    assert own, name
    for other in all_engines():
        if other is not engine:
            assert not own & set(other.datasets()), (name, other.name)
    assert any(getattr(SPACES.get(s), "engine", "image") == name for s in SPACES.names())


def test_a_plugin_engine_runs_the_searches_of_its_spaces(tmp_path, monkeypatch, capsys):
    path, engine, space = _plugin(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["search", f"plugins=[{path}]", f"search.space.name={space}", "data.name=toyset",
            "progress=false"]
    assert main(argv) == 3  # the engine's exit status
    assert "toy search ran" in capsys.readouterr().out
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "toy.json").read_text()) == {"data": "toyset", "resume": False}
    assert main(["search", "--resume", str(run)]) == 3
    assert json.loads((run / "toy.json").read_text())["resume"] is True
    cfg = load_config(run / "config.yaml")
    assert engine_of(cfg).name == engine
    with pytest.raises(ExportError, match="is a toy run, of space .*: it cannot be exported"):
        check_exportable(cfg, run)


def test_a_plugin_engine_retrains_and_sizes_networks(tmp_path, monkeypatch, capsys):
    path, _, space = _plugin(tmp_path)
    monkeypatch.chdir(tmp_path)
    common = [f"plugins=[{path}]", f"search.space.name={space}", "data.name=toyset"]
    genotype = tmp_path / "toy_genotype.json"  # DARTS_V2, as a genotype of the toy space
    genotype.write_text(json.dumps({**resolve_genotype("DARTS_V2").to_dict(), "space": space}))
    assert main(["train", "--genotype", str(genotype), "--dry-run", *common]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1]) == {"toy": "toyset"}
    assert main(["train", "--genotype", str(genotype), *common]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "toy_train.json").read_text())["genotype"]["space"] == space


def test_the_config_checks_ask_the_plugin_engine(tmp_path):
    """Its datasets, the data settings it never reads, and sections only another engine
    reads are judged from its Engine, without an entry anywhere else."""
    path, _, space = _plugin(tmp_path)
    common = [f"plugins=[{path}]", f"search.space.name={space}"]
    load_config(None, [*common, "data.name=toyset"])
    with pytest.raises(ConfigError, match=r"'digits' is not a toy dataset \(it is an image "
                       r"dataset: .*search.space.name=darts_cnn\).*\['toyset'\]"):
        load_config(None, [*common, "data.name=digits"])
    with pytest.raises(ConfigError, match="data.resolution is not used by a toy run"):
        load_config(None, [*common, "data.name=toyset", "data.resolution=16"])
    with pytest.raises(ConfigError, match="lm section .* read by language-model"):
        load_config(None, [*common, "data.name=toyset", "lm.bptt=5"])
    with pytest.raises(ConfigError, match="'toyset' is not an image dataset"):
        load_config(None, [f"plugins=[{path}]", "data.name=toyset"])


def test_a_space_naming_an_unregistered_engine_is_refused(tmp_path):
    tag = uuid.uuid4().hex[:8]
    path = tmp_path / f"stray_{tag}.py"
    path.write_text("from diffnas.spaces import register_space\n"
                    "from diffnas.spaces.darts_cnn import DartsCnnSpace\n\n"
                    f"@register_space('stray_{tag}')\n"
                    "class Stray(DartsCnnSpace):\n    engine = 'nowhere'\n")
    with pytest.raises(ConfigError, match="declares engine 'nowhere', which is not registered; "
                       "the engines: graph, image, language_model"):
        load_config(None, [f"plugins=[{path}]", f"search.space.name=stray_{tag}"])


def test_engine_registration_refuses_duplicates_and_unknown_metrics():
    image = get_engine("image")
    with pytest.raises(ValueError, match="engine 'image' is already registered"):
        register_engine(image)
    odd = dataclasses.replace(image, name=f"odd_{uuid.uuid4().hex[:8]}", metric="bleu")
    with pytest.raises(ValueError, match="metric 'bleu' is not one of test_acc, test_ppl"):
        register_engine(odd)
    assert odd.name not in ENGINES


def test_a_plugin_engine_that_fails_to_import_is_unregistered(tmp_path):
    """As for any component: the fixed plugin then imports in the same process."""
    path, engine, _ = _plugin(tmp_path)
    body = path.read_text()
    path.write_text(body + "\nraise RuntimeError('fix me')\n")
    with pytest.raises(ConfigError, match="fix me"):
        import_plugins([str(path)])
    assert engine not in ENGINES
    path.write_text(body)
    import_plugins([str(path)])
    assert engine in ENGINES


def test_list_engines_names_each_engine_and_its_spaces(tmp_path, capsys):
    path, engine, space = _plugin(tmp_path)
    assert main(["list", "engines", f"plugins=[{path}]"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (image,) = [line for line in lines if line.startswith("image: ")]
    assert image.startswith("image: image (engine/search.py, retrain.py), spaces ")
    assert {"darts_cnn", "nb201"} <= set(image.split("spaces ")[1].split(", "))  # (+ plugins')
    assert f"{engine} (plugin: {path}): toy ({engine}), spaces {space}" in lines
    assert main(["list", "spaces", f"plugins=[{path}]"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"{space} (plugin: {path}) ({engine} engine)" in lines
    assert "gnn (graph engine)" in lines and "darts_cnn" in lines
