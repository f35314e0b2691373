"""Plugins that break a component's contract are refused before a run directory is
written, with an error naming the component and the problem: ops at an even side or
another channel count, a relaxation's output and settings, a strategy's ``Config`` and
``step``, a space's ``Config``, a discretizer's return value, and where a plugin's import
failed inside library code."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import pytest

from diffnas.arch import create_relaxation
from diffnas.cli import main
from diffnas.config import load_config
from diffnas.ops import check_op_contract

TINY = [
    "data.name=digits", "data.train_subset=48", "data.test_subset=32", "data.batch_size=16",
    "search.epochs=1", "progress=false", "retrain.epochs=1", "retrain.batch_size=16",
    "retrain.train_subset=48", "retrain.cutout=4",
]
SPACE = ("search.space={{name: darts_cnn, C: {C}, layers: 3, nodes: 2, stem_multiplier: 1, "
         "ops: [skip_connect, {op}]}}")


def _plugin(tmp_path: Path, body: str) -> tuple[Path, str]:
    """A plugin file whose ``{name}`` placeholders are a name no other test registers."""
    name = f"p_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body).format(name=name))
    return path, name


def _refused(tmp_path: Path, capsys: pytest.CaptureFixture, plugin: Path, *args: str) -> str:
    """The error of a search that must stop at its config checks, before any run
    directory."""
    runs = tmp_path / "runs"
    rc = main(["search", f"plugins=[{plugin}]", *TINY, *args, "retrain.network={C: 4}",
               f"out_dir={runs}", "name=r"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not runs.exists()
    return err


# --- 1. ops: an even side, another channel count -----------------------------------------
OPS = {  # (the op, its C in the search, what the error says)
    # 2x2 patches, padded so that 7 -> 4: but 8 -> 5
    "even_side": ("nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, 1, 1, bias=False) if "
                  "stride == 1 else nn.Conv2d(C, C, 2, 2, 1, bias=False))", 4,
                  "maps a (2, 4, 8, 8) batch to (2, 4, 5, 5), expected (2, 4, 4, 4)"),
    # fails for channel counts that 4 does not divide
    "group_norm": ("nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, stride, 1, bias=False), "
                   "nn.GroupNorm(4, C, affine=affine))", 6,
                   "built for C=6 at stride 1 (affine=False), on a (2, 6, 7, 7) batch: "
                   "ValueError: "
                   "num_channels"),  # (torch's wording after that varies with its version)
}


@pytest.mark.parametrize("kind", OPS)
def test_an_op_that_breaks_at_an_even_side_or_another_width_is_refused(tmp_path, capsys,
                                                                        kind):
    body, C, says = OPS[kind]
    plugin, name = _plugin(tmp_path, f"""
        from torch import nn
        from diffnas.ops import register_op

        @register_op("{{name}}")
        def op(C, stride, affine):
            return {body}
        """)
    err = _refused(tmp_path, capsys, plugin, SPACE.format(C=C, op=name))
    assert f"op {name!r} (registered in {plugin})" in err and says in err, err


def test_a_space_checks_an_op_at_the_channel_counts_its_search_builds(tmp_path):
    """darts_cnn and nb201 build ops for C, 2C and 4C channels (a k-th of them with partial
    channels): an op that needs 4 to divide its channels fits C=16, not C=6."""
    from diffnas.plugins import import_plugins
    from diffnas.supernet.modifiers import op_channels

    assert op_channels({}, 16) == (16, 32, 64)
    assert op_channels({"name": "partial_channel", "k": 4}, 16) == (4, 8, 16)
    assert op_channels({"name": "partial_channel"}, 8) == (2, 4, 8)  # k's default: 4

    plugin, name = _plugin(tmp_path, """
        from torch import nn
        from diffnas.ops import register_op

        @register_op("{name}")
        def op(C, stride, affine):
            return nn.Sequential(nn.Conv2d(C, C, 3, stride, 1), nn.GroupNorm(4, C))
        """)
    import_plugins([str(plugin)])
    check_op_contract(name, channels=(8, 16))
    with pytest.raises(ValueError, match=r"built for C=6"):
        check_op_contract(name, channels=(6,))
    for space in ("darts_cnn", "nb201"):
        load_config(None, [f"search.space={{name: {space}, C: 4, ops: [skip_connect, {name}]}}",
                           "retrain.auxiliary_weight=0"])
        with pytest.raises(ValueError, match=r"built for C=3 at stride 1"):  # PC, k=2: 3
            load_config(None, [f"search.space={{name: {space}, C: 6, ops: [skip_connect, "
                               f"{name}], mixed_op: {{name: partial_channel, k: 2}}}}"])


@pytest.mark.parametrize("space", ["darts_cnn", "nb201"])
def test_an_op_that_fits_the_search_but_not_the_retrained_network_is_refused(tmp_path,
                                                                             space):
    """The retrained network builds the ops at its own C (darts_cnn's default: 36) and
    affine: an op needing 8 to divide its channels fits a search at C=16, not C=36; one
    broken only when affine is refused whatever the C. Both before the search, unless
    retraining is off."""
    from diffnas.plugins import import_plugins

    plugin, name = _plugin(tmp_path, """
        from torch import nn
        from diffnas.ops import register_op

        @register_op("{name}")
        def op(C, stride, affine):
            return nn.Sequential(nn.Conv2d(C, C, 3, stride, 1), nn.GroupNorm(8, C))

        @register_op("{name}_affine")
        def op_affine(C, stride, affine):
            return nn.Conv2d(C, 2 * C if affine else C, 3, stride, 1)
        """)
    import_plugins([str(plugin)])
    searched = f"search.space={{name: {space}, C: 16, ops: [skip_connect, {name}]}}"
    base = ["retrain.auxiliary_weight=0"]
    load_config(None, [searched, *base, "retrain.network={C: 32}"])
    load_config(None, [searched, *base, "retrain.network={C: 36}", "retrain.enabled=false"])
    with pytest.raises(ValueError, match=r"retrain.network \(C=36, .*built for C=36 at "
                                         r"stride 1 \(affine=True\)"):
        load_config(None, [searched, *base, "retrain.network={C: 36}"])
    if space == "darts_cnn":  # its default retraining network: C=36
        with pytest.raises(ValueError, match=r"built for C=36"):
            load_config(None, [searched])
    affine_only = f"search.space={{name: {space}, C: 16, ops: [skip_connect, {name}_affine]}}"
    load_config(None, [affine_only, *base, "retrain.enabled=false"])
    with pytest.raises(ValueError, match=r"for C=16 at stride 1 \(affine=True\) maps a "
                                         r"\(2, 16, 7, 7\) batch to \(2, 32, 7, 7\)"):
        load_config(None, [affine_only, *base, "retrain.network={C: 16}"])


# --- 2. a relaxation's output and settings -----------------------------------------------
RELAXATIONS = '''
import torch
from diffnas.arch import ArchWeights, Relaxation, register_relaxation

@register_relaxation("{name}_shape")
class WrongShape(Relaxation):
    def __call__(self, logits):
        return ArchWeights({{g: torch.softmax(a, -1)[:, :-1] for g, a in logits.items()}})

@register_relaxation("{name}_dict")
class PlainDict(Relaxation):
    def __call__(self, logits):
        return {{g: torch.softmax(a, -1) for g, a in logits.items()}}

@register_relaxation("{name}_active")
class BadActive(Relaxation):
    hard = True
    def __call__(self, logits):
        return ArchWeights({{g: torch.softmax(a, -1) for g, a in logits.items()}},
                           {{g: torch.softmax(a, -1) for g, a in logits.items()}})

@register_relaxation("{name}_range")
class ActiveOutOfRange(Relaxation):
    hard = True
    def __call__(self, logits):  # one past the last op
        return ArchWeights({{g: torch.softmax(a, -1) for g, a in logits.items()}},
                           {{g: torch.full(a.shape[:1], a.shape[1]) for g, a in logits.items()}})

@register_relaxation("{name}_power")
class PowerSoftmax(Relaxation):
    def __init__(self, power: float = 2.0, eps: float = 1e-6):
        self.power, self.eps = power, eps

    def __call__(self, logits):
        out = {{}}
        for g, a in logits.items():
            p = torch.softmax(a, dim=-1) ** self.power + self.eps
            out[g] = p / p.sum(-1, keepdim=True)
        return ArchWeights(out)
'''


@pytest.mark.parametrize("relaxation, says", [
    ("shape", "gave group 'normal' weights (5, 1), expected the logits' shape (5, 2)"),
    ("dict", "returned dict, not ArchWeights"),
    ("active", "gave group 'normal' active"),
    ("range", "gave group 'normal' active tensor([2, 2, 2, 2, 2]), expected one op index in "
              "[0, 2)"),
    ("power, eps: 1e-6x", "setting 'eps': expected a number, got '1e-6x'"),
])
def test_a_relaxation_with_a_wrong_output_or_setting_is_refused(tmp_path, capsys, relaxation,
                                                                 says):
    plugin, name = _plugin(tmp_path, RELAXATIONS)
    err = _refused(tmp_path, capsys, plugin, SPACE.format(C=4, op="sep_conv_3x3"),
                   f"search.strategy={{name: darts, relaxation: {{name: {name}_{relaxation}}}}}")
    assert f"relaxation '{name}_{relaxation.split(',')[0]}'" in err and says in err, err


def test_a_relaxation_s_settings_are_converted_to_their_annotations(tmp_path):
    from diffnas.plugins import import_plugins

    plugin, name = _plugin(tmp_path, RELAXATIONS)
    import_plugins([str(plugin)])
    relaxation = create_relaxation(f"{name}_power", eps="1e-6", power=3)  # YAML's 1e-6
    assert relaxation.eps == 1e-6 and isinstance(relaxation.power, float)


# --- 3. a strategy's Config and step, a space's Config -----------------------------------
@pytest.mark.parametrize("strategy, says", [
    ("""
     @dataclass
     class PlainConfig:
         foo: float = 1.0

     @register_strategy("{name}")
     class Plain(SearchStrategy):
         Config = PlainConfig

         def step(self, t, v):
             return self.weight_step(t, self.arch_weights())
     """, "its Config 'PlainConfig' does not subclass StrategyConfig"),
    ("""
     @register_strategy("{name}")
     class NoStep(SearchStrategy):
         Config = StrategyConfig
     """, "does not define step(train_batch, val_batch)"),
])
def test_a_strategy_without_a_strategy_config_or_a_step_is_refused_at_import(
        tmp_path, capsys, strategy, says):
    plugin, name = _plugin(tmp_path, "from dataclasses import dataclass\nfrom diffnas."
                           "strategies import SearchStrategy, StrategyConfig, "
                           "register_strategy\n" + textwrap.dedent(strategy))
    err = _refused(tmp_path, capsys, plugin, f"search.strategy.name={name}")
    assert f"strategy {name!r}" in err and says in err, err
    assert f"(at {plugin}:" in err, err


def test_a_strategy_or_space_config_that_is_not_a_dataclass_is_refused(tmp_path, capsys):
    plugin, name = _plugin(tmp_path, """
        from diffnas.spaces import SearchSpace, register_space
        from diffnas.strategies import SearchStrategy, StrategyConfig, register_strategy

        class NotDataclass(StrategyConfig):  # (its settings would be no fields)
            foo = 1.0

        @register_strategy("{name}")
        class Strategy(SearchStrategy):
            Config = NotDataclass

            def step(self, t, v):
                return self.weight_step(t, self.arch_weights())

        class SpaceConfig:
            C: int = 8

        @register_space("{name}")
        class Space(SearchSpace):
            Config = SpaceConfig
        """)
    err = _refused(tmp_path, capsys, plugin, SPACE.format(C=4, op="sep_conv_3x3"),
                   f"search.strategy.name={name}")
    assert f"search.strategy[{name}]: 'NotDataclass', the class its settings are read " \
           "into, is not a dataclass" in err, err
    err = _refused(tmp_path, capsys, plugin, f"search.space.name={name}")
    assert f"search.space[{name}]: 'SpaceConfig'" in err and "not a dataclass" in err, err


# --- 4. a discretizer that returns no Genotype -------------------------------------------
def test_a_discretizer_that_returns_a_dict_is_refused(tmp_path, capsys):
    plugin, name = _plugin(tmp_path, """
        from diffnas.genotype import register_discretizer
        from diffnas.genotype.discretize import darts_discretize

        @register_discretizer("{name}")
        def as_dict(logits, space):
            return darts_discretize(logits, space).to_dict()
        """)
    err = _refused(tmp_path, capsys, plugin, SPACE.format(C=4, op="sep_conv_3x3"),
                   f"search.discretizer={name}")
    assert f"discretizer {name!r} returned dict, not a Genotype" in err, err


# --- 5. where an import failed inside library code ---------------------------------------
@pytest.mark.parametrize("body, lines", [
    ("from dataclasses import dataclass\n\n@dataclass\nclass C:\n    a: int = 1\n    b: int\n",
     (3, 4)),  # the @dataclass line (Python 3.11) or the class's (3.10); fails in dataclasses.py
    ("from torch import nn\n\nPROBE = nn.Conv2d(4, 4, 3, groups=3)\n", (3,)),  # in torch
])
def test_a_plugin_failing_inside_library_code_is_placed_at_its_own_line(tmp_path, capsys,
                                                                        body, lines):
    plugin, _ = _plugin(tmp_path, body.replace("{", "{{").replace("}", "}}"))
    err = _refused(tmp_path, capsys, plugin)
    assert any(f"(at {plugin}:{line})" in err for line in lines), err
