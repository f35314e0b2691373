"""Engines (engine/engines.py): every command reaches a space's search and retraining
through the engine its space names, so a new kind of task is one plugin module (an
Engine plus a space naming it), with no edit to the commands or the config checks."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import uuid
from pathlib import Path

import pytest

from diffnas.cli import main
from diffnas.config import ConfigError, load_config
from diffnas.engine.engines import (
    ACCURACY,
    ENGINES,
    PERPLEXITY,
    Metric,
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
    with pytest.raises(ValueError, match="metric 'bleu' is not a Metric"):
        register_engine(odd)
    assert odd.name not in ENGINES


@pytest.mark.parametrize("args, match", [
    (("test_rmse", "RMSE", "rmse", ".4q"), r"format '\.4q' does not format a number"),
    (("test_rmse", "", "rmse"), "Metric.name must be a non-empty string"),
    ((None, "RMSE", "rmse"), "Metric.key must be a non-empty string"),
])
def test_a_malformed_metric_is_refused_where_it_is_made(args, match):
    with pytest.raises(ValueError, match=match):
        Metric(*args)


def test_metric_text_formats_a_value_and_marks_a_missing_one():
    assert ACCURACY.text(0.80354) == "80.35%" and PERPLEXITY.text(81.234) == "81.23"
    assert [ACCURACY.text(v) for v in (None, float("nan"), True, "0.5")] == ["-"] * 4


# A plugin engine judged by a figure of its own (lower is better): its search and
# retraining write what the built-in engines write, with "val_rmse" and "test_rmse".
RMSE_PLUGIN = PLUGIN + """

import types
from diffnas.engine.engines import Metric
from diffnas.genotype import resolve_genotype


def run_search(cfg, run_dir, resume):
    search = run_dir / "search"
    search.mkdir(exist_ok=True)
    genotype = resolve_genotype("DARTS_V2")
    genotype.save(search / "genotype.json")
    (search / "metrics.jsonl").write_text(json.dumps({{"epoch": 0, "val_rmse": 1 + cfg.seed}})
                                          + "\\n")
    (search / "DONE").write_text("")
    return types.SimpleNamespace(genotype=genotype)


def run_retrain(cfg, genotype, run_dir, resume):
    (run_dir / "retrain").mkdir(exist_ok=True)
    (run_dir / "retrain" / "result.json").write_text(json.dumps(
        {{"epochs_done": cfg.retrain.epochs, "test_rmse": 0.5 + 0.1 * cfg.seed, "params": 7}}))


register_engine(Engine(
    name="{engine}_rmse", label="toy regression", a_run="a toy regression run",
    data_kind="toy_rmse", datasets=lambda: ["toyset_rmse"], search=search, train=train,
    run_search=run_search, run_retrain=run_retrain, summary=lambda cfg, genotype: {{}},
    metric=Metric("test_rmse", "RMSE", "rmse", ".3f", "val_rmse",
                  search_title={search_title!r})))


@register_space("{space}_rmse")
class ToyRmseSpace(DartsCnnSpace):
    engine = "{engine}_rmse"
"""


@pytest.mark.parametrize("search_title", [None, "training RMSE of the supernet"])
def test_a_plugin_engine_s_own_metric_heads_its_seeds_summary_and_report(
        tmp_path, monkeypatch, capsys, search_title):
    """Not accuracy, not perplexity: the summary and the report say RMSE, format it as the
    engine's Metric does, and read the search's val_rmse (the built-in engines' metrics
    could be the only ones before); a Metric's ``search_title`` names the search's figure
    where "search validation" would be wrong."""
    tag = uuid.uuid4().hex[:8]
    path = tmp_path / f"toy_rmse_{tag}.py"
    path.write_text(RMSE_PLUGIN.format(engine=f"toy_{tag}", space=f"toy_space_{tag}",
                                       search_title=search_title))
    monkeypatch.chdir(tmp_path)
    argv = ["search", f"plugins=[{path}]", f"search.space.name=toy_space_{tag}_rmse",
            "data.name=toyset_rmse", "progress=false", "name=p", "--seeds", "0,1",
            "--workers", "1", "retrain.epochs=3"]
    assert main(argv) == 0
    parent = tmp_path / "runs" / "p"
    summary = json.loads((parent / "summary.json").read_text())
    assert summary["metric"] == "test_rmse"
    assert summary["test_rmse"]["mean"] == pytest.approx(0.55)
    assert summary["test_rmse"]["std"] == pytest.approx(0.1 * 2 ** -0.5)
    assert summary["search_val_rmse"]["mean"] == pytest.approx(1.5)
    assert summary["test_acc"]["n"] == 0 and summary["failed"] == []
    md = (parent / "summary.md").read_text()
    assert ("Retrained test RMSE: **0.550 +- 0.071** (mean +- sample std over 2 seeds; 95% CI "
            "of the mean -0.085 to 1.185)") in md  # t(1) = 12.7: two seeds say little
    named = search_title or "search validation RMSE"
    assert f"{named[0].upper()}{named[1:]}, last epoch: 1.500 +- 0.707" in md
    column = "search rmse" if search_title else "search val rmse"
    assert f"| seed | test rmse | {column} | params | genotype |" in md
    assert "| 1 | 0.600 | 2.000 | 7 | `" in md
    assert main(["report", str(parent / "seed_1"), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "<th>test RMSE, final</th><td>0.600</td>" in page
    assert f"<th>{named} (last epoch)</th><td>2.000</td>" in page


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
    assert image.endswith("; judged by retrained test accuracy; data parallel under torchrun")
    spaces = image.split("spaces ")[1].split(";")[0].split(", ")
    assert {"darts_cnn", "nb201"} <= set(spaces)  # (+ plugins')
    assert (f"{engine} (plugin: {path}): toy ({engine}), spaces {space}; judged by retrained "
            "test accuracy") in lines
    assert any(line.startswith("language_model: ") and line.endswith(
        "retrained test perplexity; data parallel under torchrun") for line in lines)
    assert any(line.startswith("graph: ") and line.endswith("retrained test accuracy")
               for line in lines)  # one process only
    assert main(["list", "spaces", f"plugins=[{path}]"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"{space} (plugin: {path}) ({engine} engine)" in lines
    assert "gnn (graph engine)" in lines and "darts_cnn" in lines


def test_an_engine_without_its_commands_is_made_from_its_halves_or_refused():
    """``search`` and ``train`` left out: made from ``run_search`` / ``run_retrain`` and
    ``report`` (the worked engines in docs/examples/plugins run through them); without
    ``report`` either, the Engine names what is missing."""
    from diffnas.engine.engines import Engine

    calls = []

    def run_search(cfg, run_dir, resume):
        calls.append(("search", resume))
        return types.SimpleNamespace(genotype="G")

    def run_retrain(cfg, genotype, run_dir, resume):
        calls.append(("retrain", genotype))
        return {"test_acc": 1.0}

    common = dict(name="made", label="made", a_run="a run", data_kind="toy",
                  datasets=lambda: [], run_search=run_search, run_retrain=run_retrain,
                  summary=lambda cfg, genotype: {})
    with pytest.raises(ValueError, match="engine 'made': give search and train, or report"):
        Engine(**common)
    reported = []
    engine = Engine(**common, report=lambda g, r: reported.append((g, r)))
    assert engine.__module__ == __name__  # (a plugin's failed import unregisters it)
    engine.train(None, "H", Path("."), False)
    assert calls == [("retrain", "H")] and reported == [("H", {"test_acc": 1.0})]


def test_an_engine_without_settings_refuses_an_engine_section():
    """The ``engine`` section holds the settings of an engine that declares them
    (``Engine.settings``); the built-in engines declare none, so a section on their runs
    is refused by name rather than ignored, and so is a settings class that is no
    dataclass."""
    from diffnas.engine.engines import Engine

    with pytest.raises(ConfigError, match=re.escape(
            "config.engine: the image (engine/search.py, retrain.py) engine takes no settings "
            "of its own (engine.envs): remove them")):
        load_config(None, ["engine={envs: 4}"], device=False)
    assert load_config(None, ["engine={}"], device=False).engine == {}
    with pytest.raises(ValueError, match="settings must be a dataclass"):
        Engine(name="x", label="x", a_run="an x run", data_kind="x", datasets=lambda: (),
               run_search=print, run_retrain=print, summary=print, report=print,
               settings=dict)


def test_list_engines_shows_an_engine_s_settings_and_their_defaults():
    from diffnas.cli import _settings_text

    @dataclasses.dataclass
    class Settings:
        table: str
        steps: int = 64
        sizes: list = dataclasses.field(default_factory=lambda: [1, 2])

    assert _settings_text(Settings) == "table (required), steps=64, sizes=[1, 2]"
