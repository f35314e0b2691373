"""Rules of few-shot NAS and RLNAS that a third mutation audit found unchecked (after
test_strategy_sampling_second_rules.py and test_few_shot_rlnas_rules.py).

Few-shot: a sub-supernet's relaxation holds the Gumbel noise inside ``fixed_noise`` as
the relaxation it wraps does (every pass of one architecture step sees one sampled
architecture, the fixed rows one-hot); a language model's validation stream, whose
hidden state cannot be replayed, is never held for scoring, so its sub-supernets are
ranked by their own turns' mean loss; and a run resumed after the split keeps each
sub-supernet's turn losses of the epoch, so it ranks them as the uninterrupted run.

RLNAS: tracing the edges refuses, naming the module, a mixed op that receives no view of
a weight row (it used to fail with a bare ``pop from an empty set``); and a space without
``none`` need not list ``none`` in ``exclude_ops`` under the ``darts`` rule, since no path
can sample it there (one with ``none`` still must; a plugin's two-argument
``check_discretizer`` is still called)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_batch, tiny_space, tiny_strategy
from test_rnn_lm import _tiny_lm_config

from diffnas.arch import ArchParams
from diffnas.config import ConfigError, load_config
from diffnas.data.text import load_corpus
from diffnas.strategies import ClassificationObjective, create_strategy

ROOT = Path(__file__).resolve().parents[1]
GUMBEL = {"name": "gumbel", "tau": 1.0}
OPS = ["skip_connect", "sep_conv_3x3", "max_pool_3x3"]  # three sub-supernets: quick


def _split_few_shot(section: dict | None = None):
    s = tiny_strategy({"name": "few_shot", "split_edges": ["normal/n3/e1"], "split_epoch": 1,
                       **(section or {})}, space=tiny_space(ops=OPS))
    s.step(tiny_batch(4, 1), tiny_batch(4, 2))
    s.end_epoch()  # split_epoch=1: the split happens here
    assert len(s.subnets) > 1
    return s


# --- few shot: the noise a sub-supernet's step holds ---------------------------------------
def test_a_sub_supernets_relaxation_holds_its_gumbel_noise_inside_fixed_noise():
    """Relaxation.fixed_noise: "within this block a stochastic relaxation draws its noise
    once per group and reuses it". A sub-supernet's relaxation (its split rows fixed)
    must do so too: its DARTS step computes the alpha gradient and the weight step inside
    that block, on one sampled architecture. Outside the block each pass draws anew."""
    s = _split_few_shot({"relaxation": GUMBEL})
    sub = s.subnets[1]
    (g, rows), = s.fixed[1].items()
    (row, op), = rows.items()
    torch.manual_seed(3)
    with sub.relaxation.fixed_noise():
        a, b = sub.arch_weights(), sub.arch_weights()
    for name in a.weights:
        assert torch.equal(a.weights[name], b.weights[name]), name
    assert torch.equal(a.weights[g][row],
                       torch.nn.functional.one_hot(torch.tensor(op), a.weights[g].shape[-1])
                       .to(a.weights[g]))
    c, d = sub.arch_weights(), sub.arch_weights()  # no block: fresh noise each pass
    assert not torch.equal(c.weights["normal"], d.weights["normal"])


# --- few shot: a language model's stream -----------------------------------------------
def test_a_language_models_stream_is_not_held_so_its_turns_rank_the_sub_supernets(tmp_path):
    """FewShotStrategy.scores: without held batches each sub-supernet is ranked by the
    mean loss of its own turns. A language model's validation windows carry the hidden
    state of the stream ("a stream's state is not reusable"), so none is held: after the
    split every sub-supernet's score is the mean of the validation losses its turns saw
    (held, they were replayed on a state the stream had moved past)."""
    from diffnas.engine.lm import build_lm_search

    cfg = load_config(str(_tiny_lm_config(tmp_path)), [
        "search.strategy={name: few_shot, split_epoch: 1}",
        "search.space.nodes=2", "search.epochs=2"])
    task = build_lm_search(cfg, load_corpus(cfg.data.name, cfg.data.root))
    s = task.strategy
    s.split()
    losses: list[list[float]] = [[] for _ in s.subnets]
    for n, batch in enumerate(task.batches(0)):
        stats = task.step(batch)
        losses[n % len(s.subnets)].append(stats["val_loss"])
    assert sum(map(len, losses)) > len(s.subnets)  # every sub-supernet had a turn
    expected = [sum(v) / len(v) for v in losses]
    assert s.scores() == pytest.approx(expected, rel=1e-12)
    assert s.best() == min(range(len(expected)), key=lambda i: (expected[i], i))


# --- few shot: resume after the split ----------------------------------------------------
def test_a_resumed_few_shot_run_keeps_each_sub_supernets_turn_losses():
    """state_dict saves the turn losses of the epoch so far ("val_loss"); a run resumed
    from it ranks the sub-supernets on them as the uninterrupted run does (no held batch
    survives a resume: the turn losses are the ranking)."""
    s = _split_few_shot()
    n = len(s.subnets)
    for i in range(n + 1):  # sub-supernet 0 gets two turns
        s.step(tiny_batch(4, 20 + i), tiny_batch(4, 40 + i))
    recorded = [list(v) for v in s.val_loss]
    assert [len(v) for v in recorded] == [2] + [1] * (n - 1)
    state = copy.deepcopy(s.state_dict())
    torch.manual_seed(1)
    space = tiny_space(ops=OPS)
    b = create_strategy({"name": "few_shot", "split_edges": ["normal/n3/e1"],
                         "split_epoch": 1}, space.build_supernet(), ArchParams(space),
                        ClassificationObjective(), epochs=2)
    b.load_state_dict(state)
    assert b.val_loss == recorded
    expected = [sum(v) / len(v) for v in recorded]
    assert b.scores() == expected  # nothing held after a resume: the turns' mean losses
    assert all(math.isfinite(x) for x in b.scores())
    assert b.best() == min(range(n), key=lambda i: (expected[i], i))


# --- random labels: tracing the edges ----------------------------------------------------
def test_tracing_refuses_a_mixed_op_that_receives_no_weight_row_naming_it():
    """map_edges identifies each mixed op's edge by the weight-row view it receives and
    "needs exactly one": a mixed op given a copy of its row (no view of the arch weights)
    cannot be mapped and is refused by name, as one given two views is."""
    s = tiny_strategy({"name": "random_labels", "population": 4, "iterations": 1,
                       "parents": 2})
    name, mixed = next((n, m) for n, m in s.supernet.named_modules()
                       if hasattr(m, "candidates")
                       and isinstance(getattr(m, "ops", None), torch.nn.ModuleList))

    def copy_rows(module, args):  # the space hands the op a copy, not a view
        return tuple(a.clone() if isinstance(a, torch.Tensor) and a.dim() == 1 else a
                     for a in args)

    handle = mixed.register_forward_pre_hook(copy_rows)
    try:
        with pytest.raises(RuntimeError, match=rf"random_labels: mixed op '{name}' received "
                                               r"0 views of weight rows of the arch weights "
                                               r"\(needs exactly one\)"):
            s.map_edges(tiny_batch(2, 0)[0])
    finally:
        handle.remove()
    assert s.edge_params is None


def test_a_space_without_none_needs_no_none_in_exclude_ops_under_the_darts_rule():
    """check_discretizer: "a path may sample ``none`` only if excluded". In a space whose
    ops lack ``none`` no path can sample it (test_the_default_exclusion_of_none_fits_a_
    space_without_none: 'none' excludes nothing there), so excluding another op alone
    leaves nothing the darts rule could drop, and the config is one to accept."""
    ops = ["skip_connect", "sep_conv_3x3", "avg_pool_3x3"]
    cfg = load_config(ROOT / "configs/darts_fashion_mnist.yaml", [
        "search.strategy={name: random_labels, exclude_ops: [avg_pool_3x3]}",
        f"search.space.ops=[{', '.join(ops)}]"])
    assert cfg.search.strategy["exclude_ops"] == ["avg_pool_3x3"]
    assert "none" not in cfg.search.space["ops"]


def test_a_space_with_none_still_needs_none_in_exclude_ops_under_the_darts_rule():
    """The same settings in the default space (which has ``none``) are refused, naming the
    key: there a path could sample ``none`` and the darts rule would drop it."""
    with pytest.raises(ConfigError, match=r"exclude_ops \['avg_pool_3x3'\] lets paths sample"):
        load_config(ROOT / "configs/darts_fashion_mnist.yaml", [
            "search.strategy={name: random_labels, exclude_ops: [avg_pool_3x3]}"])


def test_a_plugin_s_two_argument_check_discretizer_is_still_called(monkeypatch):
    """The hook's documented two-argument form (config, rule) keeps working: the config
    check calls it, without the space's alphas, and its refusal reaches the user."""
    from diffnas.strategies.darts import DartsStrategy

    seen = []

    def check(cls, config, rule):
        seen.append(rule)
        raise ValueError("audit: refused by a two-argument hook")

    monkeypatch.setattr(DartsStrategy, "check_discretizer", classmethod(check))
    with pytest.raises(ConfigError, match="search.strategy: audit: refused by a two-argument"):
        load_config(ROOT / "configs/darts_fashion_mnist.yaml", [])
    assert seen == ["darts"]
