"""Config checks that must hold before a run directory is written: retrain settings,
malformed YAML, penalty and relaxation settings, value ranges, the ``lm`` section, what
the search engines refuse, the genotype ``diffnas train`` is given, and saving the config."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from diffnas.cli import main
from diffnas.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT / "configs/darts_fashion_mnist.yaml"
RNN = ROOT / "configs/darts_rnn_ptb.yaml"
GNN = ROOT / "configs/gnn_cora.yaml"
NB201 = ROOT / "configs/darts_nb201_fashion_mnist.yaml"
TINY = """\
seed: 0
device: cpu
progress: false
data: {name: digits, train_subset: 64, test_subset: 32, batch_size: 16}
search:
  epochs: 1
  space: {name: darts_cnn, C: 4, layers: 3, nodes: 2}
  strategy: {name: darts, order: 1}
retrain: {epochs: 1, batch_size: 16, train_subset: 64, auxiliary_weight: 0.0,
          network: {C: 4, layers: 2}}
"""


def _refused(overrides: list[str], match: str, path: Path = FASHION) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(path, overrides)


# --- 1. retrain and diagnostics settings, checked before the search ---------------------
@pytest.mark.parametrize("override, match", [
    ("retrain.network.Cx=8", r"retrain\.network\.Cx; valid keys of retrain\.network: C, "),
    ("retrain.network.C=0", r"retrain\.network\.C must be >= 1"),
    ("search.space.layers=2", r"search\.space\.layers must be >= 3 \(with fewer, every cell"),
    ("retrain.lr=-1", r"retrain\.lr must be >= 0, got -1"),
    ("retrain.momentum=-0.5", r"retrain\.momentum must be >= 0"),
    ("retrain.weight_decay=-1", r"retrain\.weight_decay must be >= 0"),
    ("retrain.grad_clip=0", r"retrain\.grad_clip must be > 0"),
    ("retrain.drop_path=1", r"retrain\.drop_path must be in \[0, 1\)"),
    ("retrain.auxiliary_weight=-1", r"retrain\.auxiliary_weight must be >= 0"),
    ("retrain.train_subset=0", r"retrain\.train_subset must be >= 1"),
    ("search.diagnostics.cell=foo", r"search\.diagnostics\.cell: 'foo' .*normal, reduce"),
    ("search.strategy.w_optim.lr=-1", r"search\.strategy\.w_optim\.lr must be >= 0"),
    ("search.strategy.w_optim.grad_clip=-5", r"w_optim\.grad_clip must be > 0"),
    ("search.strategy.a_optim.betas=[0.5, 1.5]", r"a_optim\.betas must be two numbers"),
    ("search.strategy={name: implicit, eta: 1e39}", r"search\.strategy\.eta must be finite"),
    ("search.strategy={name: implicit, eta: .inf}", r"\.eta: expected a finite number, got inf"),
])
def test_retrain_and_search_settings_are_checked_at_load(override, match):
    _refused([override], match)


@pytest.mark.parametrize("override, kind", [
    ("search.space.name={a: 1}", "search space"), ("search.strategy.name=[gdas]", "strategy"),
    ("search.strategy.relaxation={name: [1]}", "relaxation"),
])
def test_a_name_that_is_not_a_string_is_an_error_naming_the_known_ones(override, kind,
                                                                       capsys):
    """A mapping or list where a registered name belongs was a TypeError traceback
    (unhashable) from the registry lookup; now the registry says what it got and lists
    the names it knows."""
    assert main(["search", override]) == 2
    err = capsys.readouterr().err
    assert f"unknown {kind} " in err and f"a {kind} is named by a string); known: " in err
    assert "Traceback" not in err


# NaN passes every range check (each comparison is false) and inf breaks the step's
# arithmetic: both used to surface only as "loss is nan" (or a traceback) at the first step.
@pytest.mark.parametrize("override, match", [
    ("data.search_split=.nan", r"data\.search_split: expected a number, got NaN"),
    ("retrain.grad_clip=.nan", r"retrain\.grad_clip: expected a number, got NaN"),
    ("search.strategy={name: darts, order: 2, fd_radius: .nan}", r"fd_radius: .* got NaN"),
    ("search.strategy={name: darts, order: 2, fd_radius: .inf}",
     r"fd_radius: expected a finite number, got inf"),
    ("search.strategy={name: zero_order, mu: .nan}", r"mu: expected a number, got NaN"),
    ("search.strategy={name: zero_order, mu: .inf}", r"\.mu: expected a finite number"),
    ("search.strategy={name: mean_shift, bandwidth: .inf}", r"bandwidth: expected a finite number"),
    ("search.strategy={name: mean_shift, temperature: .inf}", r"temperature: expected a finite"),
    ("search.strategy={name: snas, cost_weight: .nan}", r"cost_weight: .* got NaN"),
    ("search.strategy={name: snas, cost_weight: .inf}", r"cost_weight: expected a finite number"),
    ("search.strategy={name: snas, relaxation: {name: gumbel, tau: .nan}}",
     r"temperatures must be finite, got tau=nan"),
    ("search.strategy={name: gdas, relaxation: {name: hard_gumbel, tau: 10, tau_min: .inf}}",
     r"temperatures must be finite"),
])
def test_non_finite_settings_are_refused_at_load(override, match):
    _refused([override], match, NB201)


def test_retrain_batch_larger_than_its_subset_is_refused():
    _refused(["retrain.train_subset=50", "retrain.batch_size=64"],
             r"retrain\.batch_size=64 exceeds retrain\.train_subset=50")


def test_a_diagnostics_cell_of_the_space_is_accepted():
    cfg = load_config(FASHION, ["search.diagnostics.cell=reduce"])
    assert cfg.search.diagnostics.cell == "reduce"


def test_the_network_is_checked_against_the_configured_space():
    nb201 = "search.space={name: nb201, C: 4, N: 1}"
    _refused([nb201, "retrain.auxiliary_weight=0", "retrain.network={C: 4, layers: 2}"],
             r"retrain\.network\.layers; valid keys of retrain\.network: C, N, ")
    # the auxiliary head retraining adds for auxiliary_weight > 0
    with pytest.raises(ValueError, match="no auxiliary head"):
        load_config(FASHION, [nb201, "retrain.auxiliary_weight=0.4",
                              "retrain.network={C: 4, N: 1}"])
    _refused(["retrain.network.C=8"], r"retrain\.network\.C; valid keys of retrain\.network: "
             "dropout, ", RNN)
    _refused(["retrain.network.nhid=0"], r"retrain\.network\.nhid must be >= 1 \(or null\)",
             RNN)  # (None: the search's value)
    # a search size has no null: the message offered one, which was then refused
    _refused(["search.space.nodes=0"], r"search\.space\.nodes must be >= 1, got 0$", RNN)
    _refused(["retrain.network.dropout=1.5"], r"retrain\.network\.dropout must be in", RNN)


def test_another_space_retrains_at_its_search_settings_unless_told():
    """The default retrain.network is the DARTS CIFAR network, for darts_cnn alone: another
    space's config that sets none retrains at its search settings ({}), whether or not
    another retrain key is given (it used to be {} only then, and an error naming C and
    layers otherwise: `search.space.name=gnn data.name=karate` was refused)."""
    nb201 = ["search.space={name: nb201, C: 4, N: 1}", "retrain.auxiliary_weight=0"]
    assert load_config(None, nb201).retrain.network == {}
    assert load_config(None, [*nb201, "retrain.epochs=3"]).retrain.network == {}
    assert load_config(None, ["search.space.name=gnn", "data.name=karate"]).retrain.network == {}
    assert load_config(None, []).retrain.network == {"C": 36, "layers": 20}
    cfg = load_config(None, [*nb201, "retrain.network.C=8"])
    assert cfg.retrain.network == {"C": 8}
    _refused(["search.space={name: nb201, C: 4, N: 1}"],  # nb201 has no auxiliary head
             r"nb201 networks have no auxiliary head: set retrain\.auxiliary_weight=0",
             path=None)


def test_a_network_is_not_checked_when_retraining_is_off():
    cfg = load_config(FASHION, ["search.space={name: nb201, C: 4, N: 1}",
                                "retrain.enabled=false"])
    assert cfg.retrain.network == {"C": 16, "layers": 8}


def test_a_bad_retrain_network_writes_no_run_directory(tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text(TINY)
    argv = ["search", "--config", str(tmp_path / "tiny.yaml"), f"out_dir={tmp_path / 'runs'}",
            "name=r", "retrain.network.Cx=8"]
    assert main(argv) == 2
    assert "retrain.network.Cx" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "r").exists()


# --- 2. malformed YAML ------------------------------------------------------------------
def test_a_malformed_override_names_the_override(capsys):
    _refused(["search.space={name: darts_cnn, C: 4"],
             r"override 'search\.space=\{name: darts_cnn, C: 4': invalid YAML")
    _refused(["seed"], r"override 'seed' must look like key\.sub=value$")
    # a config file given where an override goes (without --config) says how to give it
    assert main(["search", str(FASHION)]) == 2
    assert capsys.readouterr().err.endswith(
        f"override {str(FASHION)!r} must look like key.sub=value (a config file is given as "
        "--config PATH)\n")


def test_a_malformed_file_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\ndata:\n  name: digits\n batch_size: 4\n")
    with pytest.raises(ConfigError, match=rf"{bad}: invalid YAML: .*\(line 4, column 2\)"):
        load_config(bad)


def test_a_key_given_twice_is_refused_not_overwritten(tmp_path):
    """PyYAML keeps the last of two equal keys: a second ``search:`` dropped the first
    one's space and strategy without a word."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("seed: 0\nsearch:\n  epochs: 2\n  space: {name: nb201}\n"
                     "search:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=rf"{twice}: invalid YAML: key 'search' given twice "
                                          r"in one mapping \(line 5, column 1\)"):
        load_config(twice)
    _refused(["search.space={name: darts_cnn, C: 4, C: 8}"], r"key 'C' given twice")


def test_a_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("seed: 0\n# caf\u00e9\n".encode("latin-1"))  # an editor's Latin-1
    with pytest.raises(ConfigError, match=rf"{latin}: this config file is not UTF-8 text "
                                          r"\(byte 0xe9 on line 2\); save it as UTF-8"):
        load_config(latin)
    latin.write_bytes("seed: 0\n# caf\u00e9\n".encode("utf-8"))
    assert load_config(latin).seed == 0


# --- 3. penalty and relaxation settings -------------------------------------------------
@pytest.mark.parametrize("override, match", [
    ("search.strategy.penalties=[{name: latency, predictor: p.pt, lamx: 1}]",
     r"search\.strategy\.penalties\[0\]\.lamx; valid keys of search\.strategy\.penalties\[0\]:"
     r" name, predictor, lam"),
    ("search.strategy.penalties=[{name: latency, lam: 1}]",
     r"penalties\[0\]: missing required key\(s\) predictor"),
    ("search.strategy.penalties=[{lam: 1}]", r"penalties\[0\] needs a 'name' \(one of .*latency"),
    ("search.strategy.relaxation={name: gumbel, tau_typo: 1}",
     r"search\.strategy\.relaxation\.tau_typo; valid keys of search\.strategy\.relaxation: "
     "name, tau, tau_min, anneal"),
    ("search.strategy.relaxation={name: gumbel, tau: -1}",
     r"search\.strategy\.relaxation: temperatures must be positive"),
    # no name: the strategy's own relaxation (darts: softmax, which has no temperature)
    ("search.strategy.relaxation={tau: 1}",
     r"search\.strategy\.relaxation\.tau; valid keys of search\.strategy\.relaxation: name$"),
])
def test_penalty_and_relaxation_settings_are_checked_at_load(override, match):
    _refused([override], match)


def test_an_unknown_penalty_name_writes_no_run_directory(tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text(TINY)
    argv = ["search", "--config", str(tmp_path / "tiny.yaml"), f"out_dir={tmp_path / 'runs'}",
            "name=r", "search.strategy.penalties=[{name: latncy, lam: 1}]"]
    assert main(argv) == 2
    assert "unknown architecture penalty 'latncy'; known: latency" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "r").exists()


def test_create_penalty_names_a_bad_key():
    from diffnas.strategies.base import create_penalty

    with pytest.raises(ConfigError, match=r"penalties\.lamx"):
        create_penalty({"name": "latency", "predictor": "p.pt", "lamx": 1})


# --- 4. value ranges --------------------------------------------------------------------
@pytest.mark.parametrize("override, match", [
    ("data.resolution=-4", r"data\.resolution must be >= 1"),
    ("data.train_subset=0", r"data\.train_subset must be >= 1"),
    ("data.test_subset=-1", r"data\.test_subset must be >= 1"),
    ("retrain.crop_padding=-1", r"retrain\.crop_padding must be >= 0, got -1"),
    ("retrain.cutout=-3", r"retrain\.cutout must be >= 0, got -3"),
    ("search.diagnostics.iters=-3", r"search\.diagnostics\.iters must be >= 1, got -3"),
    ("search.diagnostics.iters=0", r"search\.diagnostics\.iters must be >= 1, got 0"),
])
def test_out_of_range_numbers_name_their_key(override, match):
    _refused([override], match)


@pytest.mark.parametrize("override, match", [
    ("search.space.C=0", r"search\.space\.C must be >= 1, got 0"),
    ("search.space.C=-4", r"search\.space\.C must be >= 1, got -4"),
    ("search.space.layers=0", r"search\.space\.layers must be >= 1, got 0"),
    ("search.space.nodes=0", r"search\.space\.nodes must be >= 1, got 0"),
    ("search.space.nodes=-1", r"search\.space\.nodes must be >= 1, got -1"),
    ("search.space.stem_multiplier=0", r"search\.space\.stem_multiplier must be >= 1, got 0"),
    ("search.space.recompute=-1",
     r"search\.space\.recompute must be true, false or a number of cells >= 0, got -1"),
])
def test_darts_cnn_sizes_are_checked_at_load(override, match):
    """torch would refuse these only inside the first search step, after the run
    directory (an empty parameter list, a negative dimension, no gradient at all)."""
    _refused([override], match)


@pytest.mark.parametrize("space, match", [
    ("{name: nb201, C: 0}", r"search\.space\.C must be >= 1, got 0"),
    ("{name: nb201, N: -1}", r"search\.space\.N must be >= 1, got -1"),
    ("{name: gnn, hidden: 0}", r"search\.space\.hidden must be >= 1, got 0"),
    ("{name: gnn, cells: 0}", r"search\.space\.cells must be >= 1, got 0"),
])
def test_other_space_sizes_name_their_key(space, match):
    _refused([f"search.space={space}"], match)


@pytest.mark.parametrize("space, most, edges", [
    ("{name: darts_cnn, nodes: 100000}", 61, "5,000,150,000"),
    ("{name: darts_cnn, nodes: 62}", 61, "2,015"),
    ("{name: darts_rnn, nodes: 63}", 62, "2,016"),  # one cell input (DARTS's)
    ("{name: darts_rnn, nodes: 63, backbone: two_input}", 61, "2,079"),  # x_t and h_{t-1}
    ("{name: gnn, nodes: 1000000}", 62, "500,000,500,000"),
])
def test_a_cell_too_large_to_build_is_refused_by_its_node_count(space, most, edges):
    """A typo such as nodes=100000 used to fill the memory while the cell's edges were
    listed, with no message; the largest allowed count is named (edges: n(n+3)/2 with two
    cell inputs, n(n+1)/2 with one)."""
    _refused([f"search.space={space}"], rf"search\.space\.nodes must be at most {most} "
             rf"\(a cell of n nodes has n\(n\+[13]\)/2 mixed edges.* would make {edges} edges")


def test_the_largest_allowed_cells_load():
    from diffnas.config import MAX_CELL_EDGES

    for config, nodes, edges in [(FASHION, 61, 61 * 64 // 2), (GNN, 62, 62 * 63 // 2),
                                 (ROOT / "configs/darts_rnn_ptb.yaml", 62, 62 * 63 // 2)]:
        assert edges <= MAX_CELL_EDGES
        assert load_config(config, [f"search.space.nodes={nodes}"]).search.space["nodes"] == nodes


def test_darts_cnn_sizes_write_no_run_directory(tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text(TINY)
    argv = ["search", "--config", str(tmp_path / "tiny.yaml"), f"out_dir={tmp_path / 'runs'}",
            "name=r", "search.space.layers=0"]
    assert main(argv) == 2
    assert "search.space.layers must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "r").exists()


@pytest.mark.parametrize("override, match", [
    ("retrain.lr=1e39", r"retrain\.lr must be finite and at most 3\.403e\+38 .*, got 1e\+39"),
    ("retrain.lr=.inf", r"retrain\.lr: expected a finite number, got inf"),
    ("retrain.lr_min=1e39", r"retrain\.lr_min must be finite"),
    ("retrain.momentum=1e39", r"retrain\.momentum must be finite"),
    ("retrain.weight_decay=.inf", r"retrain\.weight_decay: expected a finite number"),
    ("retrain.auxiliary_weight=.inf", r"retrain\.auxiliary_weight: expected a finite number"),
    ("search.strategy.w_optim={lr: 1e300}",
     r"search\.strategy\.w_optim\.lr must be finite .*, got 1e\+300"),
    ("search.strategy.w_optim.weight_decay=1e39", r"w_optim\.weight_decay must be finite"),
    ("search.strategy.a_optim={lr: 1e300}",
     r"search\.strategy\.a_optim\.lr must be finite .*, got 1e\+300"),
    ("search.strategy.a_optim.weight_decay=.inf", r"a_optim\.weight_decay: expected a finite"),
])
def test_optimizer_numbers_beyond_float32_are_refused_at_load(override, match):
    """torch's optimizers take these as float32 and fail ("cannot be converted to type
    float without overflow") only when they first step: for retraining, after a search."""
    _refused([override], match)


def test_the_largest_float32_learning_rate_is_accepted():
    import torch

    big = float(torch.finfo(torch.float32).max)
    cfg = load_config(FASHION, [f"retrain.lr={big!r}", f"search.strategy.w_optim.lr={big!r}"])
    assert cfg.retrain.lr == big


# --- 5. the lm section ------------------------------------------------------------------
def test_an_lm_section_outside_language_models_is_refused():
    _refused(["lm.bptt=10"], r"config\.lm: the lm section \(lm\.bptt\) .*space 'darts_cnn'")


def test_an_lm_section_of_a_language_model_is_read():
    assert load_config(RNN, ["lm.bptt=10"]).lm["bptt"] == 10


# --- 6. what the search engines refuse, at load ----------------------------------------
GDAS_COMPILE = ["search.strategy.name=gdas", "search.compile={backend: inductor}"]
IMAGE_REFUSALS = [  # (overrides, match): configured_step's refusals and the diagnostics'
    (["search.amp=fp16"], r"search\.amp must be null or 'bf16', got 'fp16'"),
    (["search.strategy.order=2", "search.amp=bf16"],
     r"'darts' \(as configured\) is not declared first-order.*without search\.amp"),
    (["search.strategy.order=2", "search.compile={backend: inductor}"],
     r"'darts' \(as configured\) is not declared first-order.*without search\.compile"),
    (GDAS_COMPILE, r"'gdas' samples one op per edge.*without search\.compile"),
    (["device=cpu", "search.cuda_graph=true"], r"search\.cuda_graph needs a CUDA device"),
    (["search.diagnostics.enabled=true", "search.diagnostics.hessian=true",
      "search.compile={backend: inductor}"], r"search\.diagnostics\.hessian differentiates"),
    (["search.compile={backend: inductor, fullgraph: true}"],
     r"search\.compile: unknown setting\(s\) \['fullgraph'\]"),
    (["search.compile={backend: eager, mode: max-autotune}"],
     r"search\.compile\.mode applies to the inductor backend only"),
    (["search.compile={backend: foo}"],
     r"search\.compile\.backend must be a torch\.compile backend: one of .*inductor.*, "
     r"got 'foo'"),
    (["search.compile={mode: fast}"],
     r"search\.compile\.mode must be null or one of default, .*max-autotune.*, got 'fast'"),
    (["data.train_subset=64", "data.batch_size=64"],
     r"data\.batch_size=64 gives no full batch per epoch from data\.train_subset=64: .* 32 "
     r"images to train the weights and 32 the architecture"),
]


@pytest.mark.parametrize("overrides, match", IMAGE_REFUSALS)
def test_image_search_refusals_are_made_at_load(overrides, match):
    _refused(overrides, match)


@pytest.mark.parametrize("overrides, match", IMAGE_REFUSALS)
def test_image_search_refusals_write_no_run_directory(tmp_path, capsys, overrides, match):
    argv = ["search", "--config", str(FASHION), "data.name=digits", "progress=false",
            f"out_dir={tmp_path / 'runs'}", "name=r", *overrides]
    assert main(argv) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "runs" / "r").exists()


@pytest.mark.parametrize("spec", [{}, {"backend": "inductor", "mode": "reduce-overhead"},
                                  {"mode": "max-autotune-no-cudagraphs"},
                                  {"backend": "eager"}, {"backend": "aot_eager"}])
def test_compile_settings_torch_takes_are_accepted(spec):
    from diffnas.supernet.compile import check_compile_settings

    check_compile_settings(spec)


def test_the_device_is_only_checked_with_the_device_flag():
    """Reading a run made elsewhere (``device=False``) leaves the device out; what the
    strategy cannot do is refused on any device."""
    cfg = load_config(FASHION, ["device=cpu", "search.cuda_graph=true"], device=False)
    assert cfg.search.cuda_graph
    with pytest.raises(ConfigError, match=r"'darts' \(as configured\) cannot be captured"):
        load_config(FASHION, ["search.strategy.order=2", "search.cuda_graph=true"],
                    device=False)


STRATEGY_TRAITS = [  # (section, (first_order, graph_safe, hard)) by docs/strategies.md
    ({"name": "darts"}, (True, True, False)),
    ({"name": "darts", "order": 2}, (False, False, False)),
    ({"name": "darts", "edge_norm": True}, (True, False, False)),
    ({"name": "darts", "relaxation": {"name": "gumbel"}}, (True, False, False)),
    ({"name": "gdas"}, (True, False, True)),
    ({"name": "single_level"}, (True, False, False)),
    ({"name": "implicit"}, (False, False, False)),
    ({"name": "zero_order"}, (False, False, False)),
]


@pytest.mark.parametrize("section, expected", STRATEGY_TRAITS, ids=lambda s: str(s))
def test_traits_read_from_the_config_are_the_documented_ones(section, expected):
    """Config loading reads first_order / graph_safe / hard without building the strategy:
    they are the documented ones, and the built strategy's too."""
    from conftest import tiny_strategy

    from diffnas.engine.search import StepTraits

    got = StepTraits.from_config(section)
    assert (got.first_order, got.graph_safe, got.hard) == expected
    assert StepTraits.of(tiny_strategy(section)) == got


@pytest.mark.parametrize("n, split", [(63, ("32", "31")), (64, None), (65, None)])
def test_the_full_batch_check_agrees_with_the_search_loaders(tmp_path, n, split):
    """The split rounds (63 images -> 32 + 31): the load check refuses a batch of 32
    exactly where the search's own loaders would have no full batch."""
    from diffnas.engine.search import build_search, load_search_data

    (tmp_path / "tiny.yaml").write_text(TINY)
    error = _error(tmp_path / "tiny.yaml", [f"data.train_subset={n}", "data.batch_size=32"])
    found = re.search(r"(\d+) images to train the weights and (\d+)", error)
    assert (found and found.groups()) == split, error
    cfg = load_config(tmp_path / "tiny.yaml")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_subset=n,
                                                            batch_size=32))
    assert (build_search(cfg, load_search_data(cfg)).num_batches() == 0) == (split is not None)


def _error(path: Path, overrides: list[str]) -> str:
    """The ConfigError message of loading ``path`` with ``overrides`` ("" if it loads)."""
    try:
        load_config(path, overrides)
    except ConfigError as exc:
        return str(exc)
    return ""


def test_a_single_level_strategy_searches_on_every_subset_image():
    cfg = load_config(FASHION, ["data.train_subset=64", "data.batch_size=64",
                                "search.strategy={name: single_level}"])
    assert cfg.data.batch_size == 64


@pytest.mark.parametrize("setting", ["search.amp=bf16", "search.compile={backend: inductor}",
                                     "search.cuda_graph=true", "search.cudnn_benchmark=true",
                                     "search.diagnostics.enabled=true"])
@pytest.mark.parametrize("path", [RNN, GNN], ids=["darts_rnn", "gnn"])
def test_language_and_graph_searches_refuse_image_settings_at_load(path, setting):
    _refused([setting], rf"{re.escape(setting.split('=')[0])} is (for image searches|not "
             "supported)", path)


def test_growth_epochs_after_the_search_are_refused_at_load():
    growth = "search.space.growth={mode: grow_prune, init_nodes: 7, grow_epochs: [2], " \
             "fade_steps: 5}"
    _refused([growth, "search.epochs=2"],
             r"search\.space\.growth\.grow_epochs: growth epoch 2 is not before "
             r"search\.epochs=2", RNN)
    assert load_config(RNN, [growth, "search.epochs=3"]).search.epochs == 3


@pytest.mark.parametrize("path, overrides, match", [
    (RNN, ["search.cudnn_benchmark=true"], r"search\.cudnn_benchmark is for image searches"),
    (RNN, ["search.epochs=2", "search.space.growth={mode: grow_prune, init_nodes: 7, "
           "grow_epochs: [2], fade_steps: 5}"], r"growth epoch 2 is not before"),
    (GNN, ["search.amp=bf16"], r"search\.amp is for image searches; the graph "
     r"\(engine/graph\.py\) search does not take it: switch it off"),
    # (both evaluated their validation split every epoch whatever it said)
    (GNN, ["search.evaluate=false"], r"search\.evaluate=false is for image searches; the "
     r"graph \(engine/graph\.py\) search evaluates .* leave it true"),
    (RNN, ["search.evaluate=false"], r"search\.evaluate=false is for image searches; the "
     r"language-model"),
    # (read with lm.arch_data: split alone; it was accepted and unused)
    (RNN, ["data.search_split=0.8"], r"data\.search_split=0\.8 is read with lm\.arch_data: "
     r"split alone .* with lm\.arch_data: valid the alphas learn on the validation text"),
    (RNN, ["data.search_split=0.8", "lm.arch_data=split",
           "search.strategy={name: single_level}"], r"lm\.arch_data: 'single_level' is "
     r"single-level"),
    (RNN, ["data.search_split=0.8", "search.strategy={name: single_level}"],
     r"data\.search_split=0\.8 .* the single-level strategy learns the alphas on the whole"),
], ids=["rnn-image-setting", "rnn-growth", "gnn-image-setting", "gnn-evaluate",
        "rnn-evaluate", "rnn-split-unread", "rnn-single-level-arch-data",
        "rnn-single-level-split"])
def test_language_and_graph_refusals_write_no_run_directory(tmp_path, capsys, path,
                                                              overrides, match):
    argv = ["search", "--config", str(path), f"out_dir={tmp_path / 'runs'}", "name=r",
            *overrides]
    assert main(argv) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "runs" / "r").exists()


@pytest.mark.parametrize("path, overrides, match", [
    (FASHION, ["search.strategy={name: few_shot, split_epoch: 3}", "search.epochs=3"],
     r"few_shot split_epoch must be in \[1, epochs\), got 3 with epochs=3"),
    (RNN, ["search.strategy={name: few_shot, split_edges: [normal/n2/e0]}"],
     r"split_edges \['normal/n2/e0'\] are not edges of the space; edges: recurrent/n1/e0"),
    (FASHION, ["search.strategy={name: few_shot, split_edges: [normal/n2/e0, normal/n2/e1, "
               "normal/n3/e0]}"], r"few_shot would make 512 sub-supernets"),
    (GNN, ["search.strategy={name: snas, cost_weight: 0.5}"],
     r"snas cost_weight counts the parameters of convolutional ops"),
    (RNN, ["search.strategy={name: snas, cost_weight: 0.5}"], r"unknown op 'tanh'"),
    (NB201, ["search.strategy={name: random_labels, exclude_ops: [none, skip_connect, "
             "nor_conv_1x1, nor_conv_3x3, avg_pool_3x3]}"], r"leave no op in group 'cell'"),
    (FASHION, ["search.strategy={name: few_shot, split_edges: [normal/n2/e0, normal/n2/e0]}"],
     r"few_shot split_edges names \['normal/n2/e0'\] more than once"),
    (FASHION, ["search.strategy={name: few_shot}", "search.epochs=1"],
     r"few_shot needs search.epochs >= 2 .*split_epoch defaults to epochs // 2\), got 1"),
], ids=["few-shot-epoch", "few-shot-edge", "few-shot-size", "snas-gnn", "snas-rnn",
        "rlnas-ops", "few-shot-repeated-edge", "few-shot-one-epoch"])
def test_strategy_settings_judged_by_the_space_write_no_run_directory(tmp_path, capsys, path,
                                                                       overrides, match):
    """Settings a strategy checks against the space's edges or the epochs are refused when
    the config is read (they used to surface after the run directory and the data)."""
    _refused(overrides, match, path)
    argv = ["search", "--config", str(path), f"out_dir={tmp_path / 'runs'}", "name=r",
            *overrides]
    assert main(argv) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("strategy, match", [
    ("{name: snas, cost_channels: 0}", r"snas cost_channels must be >= 1, got 0"),
    ("{name: mean_shift, samples: 1}", r"mean_shift needs samples >= 2 when bandwidth > 0"),
], ids=["snas-cost-channels", "mean-shift-one-sample"])
def test_strategy_values_refused_when_the_config_is_read(tmp_path, capsys, strategy, match):
    """snas cost_channels 0 failed when the strategy was built, after the run directory,
    with torch's "groups must be a positive integer"; one mean_shift sample made the
    shift a random walk."""
    with pytest.raises(ValueError, match=match):
        load_config(FASHION, [f"search.strategy={strategy}"])
    argv = ["search", "--config", str(FASHION), f"out_dir={tmp_path / 'runs'}", "name=r",
            f"search.strategy={strategy}"]
    assert main(argv) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()
    load_config(FASHION, ["search.strategy={name: mean_shift, samples: 1, bandwidth: 0}"])


def test_strategy_settings_the_space_allows_are_accepted():
    assert load_config(FASHION, ["search.strategy={name: few_shot, split_epoch: 2}",
                                 "search.epochs=3"]).search.epochs == 3
    load_config(FASHION, ["search.strategy={name: snas, cost_weight: 0.5}"])
    load_config(GNN, ["search.strategy={name: snas}"])


@pytest.mark.parametrize("overrides, match", [
    (["search.discretizer=argmax"], r"search\.discretizer: 'argmax' derives genotypes that "
     r"space 'darts_rnn' does not take \(cell 'recurrent': node 2 has 2 inputs, expected 1"),
    (["lm.test_batch_size=0"], r"lm\.test_batch_size must be >= 1, got 0"),
    (["lm.max_seq_len_delta=-40"], r"lm\.max_seq_len_delta must be >= 0"),
    (["lm.beta=-1"], r"lm\.beta must be finite and >= 0"),
    (["retrain.network.ninp=16"], r"retrain\.network\.ninp must be equal to nhid \(64"),
    (["search.space.ninp=16"], r"search\.space\.ninp must be equal to search\.space\.nhid"),
    (["search.space.nodes=0"], r"search\.space\.nodes must be >= 1"),
    (["search.space.ninp=0", "search.space.nhid=0"], r"search\.space\.ninp must be >= 1"),
    (["search.space.ops=[none]"], r"search\.space\.ops must be a list with an op other"),
    (["search.space.ops=[tanh, tanh]"], r"search\.space\.ops must be without repeats"),
    (["data.batch_size=1"], r"data\.batch_size must be >= 2 in a search"),
    (["lm.eval_batch_size=1"], r"lm\.eval_batch_size must be >= 2 in a search"),
    (["retrain.train_subset=100", "retrain.batch_size=64"], r"retrain\.train_subset=100 "
     r"tokens are too few for retrain\.batch_size=64"),
    (["seed=-1"], r"seed must be an integer in \[0, 2\*\*32\)"),
], ids=lambda v: v[0] if isinstance(v, list) else "")
def test_language_model_settings_that_used_to_fail_after_the_run_directory(tmp_path, capsys,
                                                                          overrides, match):
    """Each of these loaded and then failed once the run had started (some after the whole
    search), with a run directory --resume could not repair."""
    _refused(overrides, match, RNN)
    assert main(["search", "--config", str(RNN), f"out_dir={tmp_path / 'runs'}", *overrides]) \
        == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_settings_only_a_search_needs_do_not_refuse_a_retraining(tmp_path):
    """The fixed recurrent network has no batch normalization: diffnas train takes an
    evaluation batch of 1; a dotted retrain.network key on darts_rnn does not start from
    the darts_cnn network's C and layers (it used to name those unknown keys)."""
    cfg = load_config(RNN, ["lm.eval_batch_size=1"], search=False)
    assert cfg.lm["eval_batch_size"] == 1
    import yaml

    data = yaml.safe_load(RNN.read_text())
    del data["retrain"]["network"]
    (tmp_path / "rnn.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(tmp_path / "rnn.yaml", ["retrain.network.dropoute=0.1"])
    assert cfg.retrain.network == {"dropoute": 0.1}
    cfg = load_config(FASHION, ["retrain.network.C=8"])  # darts_cnn: the default's layers stay
    assert cfg.retrain.network["C"] == 8 and "layers" in cfg.retrain.network


# --- 7. the genotype of diffnas train, against the configured space ---------------------
@pytest.mark.parametrize("path, overrides, match", [
    (NB201, [], "genotype is for space 'darts_cnn', not 'nb201'"),
    (FASHION, ["search.space.nodes=5"], "the space has 5 (node 6 has no inputs)"),
], ids=["other-space", "fewer-nodes"])
def test_a_genotype_that_does_not_fit_the_space_writes_no_run_directory(
        tmp_path, capsys, path, overrides, match):
    argv = ["train", "--genotype", "DARTS_V2", "--config", str(path),
            f"out_dir={tmp_path / 'runs'}", "name=t", *overrides]
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "runs" / "t").exists()


def test_train_is_not_refused_for_settings_only_a_search_reads(tmp_path, capsys,
                                                               monkeypatch):
    """``diffnas train`` reads no search settings: a config whose search part would be
    refused (here a CUDA-graph step on a CPU) still retrains; ``search`` refuses it."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    common = ["--config", str(tmp_path / "tiny.yaml"), f"out_dir={tmp_path / 'runs'}",
              "search.cuda_graph=true", "device=cpu"]
    assert main(["search", *common, "name=s"]) == 2
    assert "search.cuda_graph needs a CUDA device" in capsys.readouterr().err
    assert main(["train", "--genotype", "DARTS_V2", "--dry-run", "--config", str(FASHION),
                 "search.cuda_graph=true", "device=cpu"]) == 0
    import diffnas.engine.retrain as retrain

    reached = []
    monkeypatch.setattr(retrain, "run_retrain",
                        lambda cfg, *a, **k: reached.append(cfg.search.cuda_graph) or {
                            "params": 1, "macs": 1, "test_acc": 0.0, "epochs_done": 0})
    main(["train", "--genotype", "DARTS_V2", "--config", str(FASHION),
          f"out_dir={tmp_path / 'runs'}", "name=t", "search.cuda_graph=true", "device=cpu"])
    assert reached == [True]  # the real train path loaded the config and went on


def test_train_checks_the_network_even_with_retraining_off_for_search(tmp_path, capsys):
    """``retrain.enabled=false`` skips the network check of a search config; ``diffnas
    train`` retrains anyway, so it checks the network before its run directory."""
    argv = ["train", "--genotype", "DARTS_V2", "--config", str(FASHION),
            f"out_dir={tmp_path / 'runs'}", "name=t", "retrain.enabled=false",
            "retrain.network.Cx=8"]
    assert main(argv) == 2
    assert "retrain.network.Cx" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "t").exists()


# --- 8. saving the config -----------------------------------------------------------------
def test_save_config_leaves_the_old_file_whole_when_a_write_fails(tmp_path, monkeypatch):
    """config.yaml is written atomically: a write that fails (here in the fsync before the
    rename) leaves the previous file as it was and no temporary file behind."""
    import os

    from diffnas.config import save_config

    path = tmp_path / "config.yaml"
    cfg = load_config(FASHION)
    save_config(cfg, path)
    before = path.read_text()

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_config(dataclasses.replace(cfg, seed=cfg.seed + 1), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    monkeypatch.undo()
    save_config(dataclasses.replace(cfg, seed=cfg.seed + 1), path)
    assert load_config(path).seed == cfg.seed + 1


@pytest.mark.parametrize("path, override, engine", [
    (RNN, "retrain.lr_min=0.001", "language-model"),
    (RNN, "retrain.cutout=8", "language-model"),
    (GNN, "retrain.lr_min=0.001", "graph"),
    (GNN, "retrain.batch_size=32", "graph"),
    (GNN, "retrain.momentum=0.5", "graph"),
    (NB201, "retrain.drop_path=0.3 retrain.enabled=true", "nb201 network's"),
], ids=["rnn-lr_min", "rnn-cutout", "gnn-lr_min", "gnn-batch", "gnn-momentum",
        "nb201-drop_path"])
def test_retrain_settings_an_engine_never_reads_are_refused(path, override, engine):
    """Changed from their defaults they would be silently ignored (lr_min promising a
    decay the Adam/SGD retraining of these engines does not do)."""
    key = override.split("=")[0]
    _refused(override.split(), rf"{re.escape(key)}: the {engine} .* does not read this", path)
    load_config(path, ["retrain.lr=0.02"])  # settings the engine reads are accepted
    if key in ("retrain.drop_path", "retrain.cutout"):  # 0 says "off", what they do
        load_config(path, [f"{key}=0", *override.split()[1:]])


@pytest.mark.parametrize("path, override", [
    (RNN, "data.download=true"), (RNN, "data.resolution=32"),
    (GNN, "data.download=true"), (GNN, "data.resolution=32"), (GNN, "data.train_subset=100"),
    (GNN, "data.test_subset=100"), (GNN, "data.search_split=0.8"), (GNN, "data.batch_size=8"),
    (FASHION, "data.download=true"), (FASHION, "data.name=npz data.download=true"),
    (FASHION, "data.name=digits data.root=/x.npz"), (GNN, "data.name=karate data.root=/x"),
], ids=["rnn-download", "rnn-resolution", "gnn-download", "gnn-resolution", "gnn-subset",
        "gnn-test_subset", "gnn-split", "gnn-batch", "fashion-download", "npz-download",
        "digits-root", "karate-root"])
def test_data_settings_the_run_never_reads_are_refused_at_load(path, override):
    """They were accepted and ignored (``download`` for cora also skipped the data.root
    check, so the error came after the run directory existed)."""
    key = override.split()[-1].split("=")[0]
    _refused(override.split(), rf"config.data: {re.escape(key)} is not used by", path)


def test_a_saved_run_holding_a_setting_refused_since_still_loads(tmp_path):
    """A run saved before these settings were refused (a graph run with its own batch
    size) must still be resumable, reportable and exportable from its config.yaml; the
    same file as a new run's config is refused."""
    import dataclasses

    from diffnas.config import save_config
    from diffnas.engine.rundir import load_run_config

    cfg = load_config(GNN)
    old = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=8))
    save_config(old, tmp_path / "config.yaml")
    assert load_run_config(tmp_path).data.batch_size == 8
    assert load_run_config(tmp_path, device=False, search=False).data.batch_size == 8
    with pytest.raises(ConfigError, match="data.batch_size is not used by a graph run"):
        load_config(tmp_path / "config.yaml")


def test_cora_needs_its_root_even_with_download_asked():
    from diffnas.config import check_data_files

    cfg = load_config(GNN)
    cfg.data.download = True  # (refused at load; a config built in Python may still hold it)
    with pytest.raises(ConfigError, match="data.root is not set, and data.name=cora"):
        check_data_files(cfg)
    cfg.data.name = "cifar10"  # downloads, but into data.root
    with pytest.raises(ConfigError, match="the directory to download into"):
        check_data_files(cfg)


@pytest.mark.parametrize("strategy, key", [
    ("gcn", "growth"), ("gcn", "lr"), ("ctnas", "explore_ratio"), ("reinforce", "lr"),
    ("ctnas", "reward_baseline_decay"),
])
def test_infinite_query_strategy_settings_are_refused(strategy, key):
    """inf passed every range check of the NB-201 query strategies: growth and
    explore_ratio crashed mid-search (OverflowError), reinforce's lr ended in "Probabilities
    contain NaN" and gcn's lr ran to the end on a NaN predictor. Refused for every float
    setting at conversion, naming the setting (an optional one too)."""
    from diffnas.nasbench.strategies import create_query_strategy

    with pytest.raises(ConfigError, match=rf"strategy\[{strategy}\]\.{key}: expected a "
                                          r"finite number, got -?inf"):
        create_query_strategy(strategy, {key: float("inf") if key != "lr" else -float("inf")})


def test_an_auxiliary_key_the_user_never_wrote_is_explained(tmp_path):
    """A plugin space whose network takes no auxiliary head: the key comes from
    retrain.auxiliary_weight (default 0.4), and the error says so."""
    from dataclasses import dataclass

    from diffnas.spaces import SPACES
    from diffnas.spaces.darts_cnn import DartsCnnSpace

    @dataclass
    class Net:
        C: int = 4

    class NoAux(DartsCnnSpace):
        NetworkConfig = Net

    SPACES.register("no_aux_space")(NoAux)
    try:
        with pytest.raises(ConfigError, match=r"retrain\.auxiliary_weight=0\.4 asks the "
                           r"'no_aux_space' network for an auxiliary head .* set "
                           r"retrain\.auxiliary_weight=0"):
            load_config(None, ["search.space={name: no_aux_space}", "retrain.network={C: 4}"])
        load_config(None, ["search.space={name: no_aux_space}", "retrain.network={C: 4}",
                           "retrain.auxiliary_weight=0"])
    finally:
        SPACES._items.pop("no_aux_space")


def test_a_dataset_read_from_data_root_alone_names_the_page_that_describes_it(capsys):
    """The message pointed every such dataset at docs/data.md, which describes neither
    CIFAR-10 nor Cora."""
    from diffnas.config import ROOT_REQUIRED

    for name, page in ROOT_REQUIRED.items():
        text = (ROOT / page.split()[0]).read_text()
        assert "data.root" in text and name.replace("10", "-10") in text.lower(), page
    assert main(["search", "--config", str(ROOT / "configs/gnn_cora.yaml")]) == 2
    assert "data.name=cora is read from local files: give data.root=PATH; docs/graph.md " \
           "says what it holds" in capsys.readouterr().err
