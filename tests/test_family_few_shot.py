"""Few-shot NAS: sub-supernets start from the trained one-shot supernet and each fixes
its split edge's op."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, tiny_batch, tiny_strategy

from diffnas.genotype.discretize import discretize


def _one_shot_epoch(s):
    s.step(tiny_batch(4, 1), tiny_batch(4, 2))
    trained = {k: v.clone() for k, v in s.supernet.state_dict().items()}
    s.end_epoch()  # split_epoch=1: the split happens here
    return trained


def test_each_sub_supernet_fixes_its_edge_op(caplog):
    s = tiny_strategy({"name": "few_shot", "split_edges": ["normal/n3/e1"], "split_epoch": 1})
    g, row = s.split_rows[0]
    ops = s.arch_params.candidates(g)
    trained = _one_shot_epoch(s)
    assert len(s.subnets) == len(ops)
    for sub in s.subnets:
        # initialised from the trained one-shot supernet, as separate copies
        for k, v in sub.supernet.state_dict().items():
            assert torch.equal(v, trained[k])
        assert sub.supernet is not s.supernet
    for _ in range(2 * len(ops)):  # round robin: every sub-supernet steps twice
        s.step(tiny_batch(4, 3), tiny_batch(4, 4))
    for i, sub in enumerate(s.subnets):
        w = sub.arch_weights()[g][row]
        assert torch.equal(w, torch.nn.functional.one_hot(torch.tensor(i), len(ops)).to(w))
        assert len(s.val_loss[i]) == 2
        # the other rows are still relaxed (trainable)
        assert not torch.equal(sub.arch_weights()[g][row - 1].max(), torch.tensor(1.0))
    # the fixed row is exported with the run's genotype
    best = s.best()
    with caplog.at_level("INFO", logger="diffnas"):
        s.end_epoch()
    assert (f"few_shot: sub-supernet {best + 1} of {len(ops)} (normal/n3/e1={ops[best]}) had "
            "the lowest validation loss") in caplog.text  # the one exported, said
    geno = discretize(s.arch_params.as_dict(), _space())
    edge = [e for e in geno.cell(g).edges if (e.src, e.dst) == (1, 3)]
    if ops[best] != "none":  # a 'none' winner: test_a_winning_none_sub_supernet_...
        assert edge and edge[0].op == ops[best]


@pytest.mark.parametrize("label,dst_inputs", [("normal/n2/e0", 2), ("normal/n3/e1", 3)])
def test_a_winning_none_sub_supernet_exports_a_meaningful_genotype(label, dst_inputs):
    """The DARTS rule never picks ``none``. When the ``none`` sub-supernet wins, a node
    with only k=2 inputs must still keep the edge: it gets the op its logits rank first
    (not the first-listed op); a node with more inputs drops the edge."""
    s = tiny_strategy({"name": "few_shot", "split_edges": [label], "split_epoch": 1})
    g, row = s.split_rows[0]
    ops = s.arch_params.candidates(g)
    _one_shot_epoch(s)
    i_none = next(i for i, f in enumerate(s.fixed) if f[g][row] == ops.index("none"))
    favourite = ops.index("sep_conv_5x5")  # not the first non-'none' op listed
    assert favourite != next(i for i, o in enumerate(ops) if o != "none")
    with torch.no_grad():
        s.subnets[i_none].arch_params[g][row, favourite] += 1.0
    s.export(i_none)  # as end_epoch does when best() is the 'none' sub-supernet
    w = torch.softmax(s.arch_params[g][row], -1)
    assert w[ops.index("none")] > 0.999  # the fixed op dominates its row
    e = s.arch_params.edges[g][row]
    geno = discretize(s.arch_params.as_dict(), _space(), None, s.arch_params.edge_weights())
    kept = [x for x in geno.cell(g).edges if (x.src, x.dst) == (e.src, e.dst)]
    if dst_inputs == 2:
        assert [x.op for x in kept] == ["sep_conv_5x5"]
    else:
        assert kept == []


def test_a_winning_op_sub_supernet_exports_its_op():
    s = tiny_strategy({"name": "few_shot", "split_edges": ["normal/n2/e0"], "split_epoch": 1})
    g, row = s.split_rows[0]
    ops = s.arch_params.candidates(g)
    _one_shot_epoch(s)
    i = next(i for i, f in enumerate(s.fixed) if ops[f[g][row]] == "avg_pool_3x3")
    with torch.no_grad():  # even against a one-shot ranking that favours another op
        s.subnets[i].arch_params[g][row, ops.index("sep_conv_5x5")] += 3.0
        s.subnets[i].arch_params[g][row, ops.index("avg_pool_3x3")] = -20.0  # far below
    s.export(i)
    weights = torch.softmax(s.arch_params[g][row], -1)
    assert weights[ops.index("avg_pool_3x3")] > 0.999  # 10 above the row's largest logit
    geno = discretize(s.arch_params.as_dict(), _space())
    assert [x.op for x in geno.cell(g).inputs_of(2) if x.src == 0] == ["avg_pool_3x3"]


def _space():
    from conftest import tiny_space

    return tiny_space()


def test_best_is_lowest_mean_validation_loss():
    s = tiny_strategy({"name": "few_shot", "split_epoch": 1})
    _one_shot_epoch(s)
    s.val_loss = [[3.0, 1.0], [1.5, 1.4], [9.0]] + [[5.0]] * (len(s.subnets) - 3)
    assert s.best() == 1


def test_every_sub_supernet_is_scored_on_the_same_last_batches():
    """With fewer batches than sub-supernets in an epoch, the winner was picked among the
    few that had a turn (the others scored inf), each on its own batch. Now each is
    scored on the epoch's last validation batches, turn or not, without drawing random
    numbers."""
    from diffnas.strategies.few_shot import SCORE_BATCHES

    s = tiny_strategy({"name": "few_shot", "split_edges": ["normal/n3/e1"], "split_epoch": 1})
    _one_shot_epoch(s)
    n = len(s.subnets)
    batches = [tiny_batch(4, 10 + i) for i in range(SCORE_BATCHES + 1)]
    for b in batches[:2]:  # two turns of n: most sub-supernets never step this epoch
        s.step(tiny_batch(4, 3), b)
    with torch.no_grad():
        expected = [sum(float(sub.loss(b, sub.arch_weights())[0]) for b in batches[:2]) / 2
                    for sub in s.subnets]
    state = torch.get_rng_state()
    buffers = [{n: b.clone() for n, b in sub.supernet.named_buffers()} for sub in s.subnets]
    assert s.scores() == pytest.approx(expected)
    assert torch.equal(torch.get_rng_state(), state)
    for sub, saved in zip(s.subnets, buffers, strict=True):  # stem BN statistics kept
        assert all(torch.equal(b, saved[n]) for n, b in sub.supernet.named_buffers())
    assert all(v < float("inf") for v in s.scores()) and n > 2
    assert s.best() == min(range(n), key=lambda i: (expected[i], i))
    for b in batches[2:]:  # only the last SCORE_BATCHES are held
        s.step(tiny_batch(4, 3), b)
    assert len(s.held) == SCORE_BATCHES and s.held[0] is batches[1]
    s.end_epoch()
    assert len(s.held) == 0


def test_split_edge_must_exist():
    with pytest.raises(ValueError, match="split_edges"):
        tiny_strategy({"name": "few_shot", "split_edges": ["normal/n9/e0"]})


def test_sub_supernets_continue_the_one_shot_schedules():
    """The learning rate and the Gumbel temperature follow one schedule over the whole
    run, as in a DARTS run of the same length, instead of restarting at the split."""
    from conftest import tiny_space

    from diffnas.arch import ArchParams
    from diffnas.strategies import ClassificationObjective, create_strategy

    relax = {"name": "gumbel", "tau": 1.0, "tau_min": 0.1}
    seen = {}
    for name in ("few_shot", "darts"):
        torch.manual_seed(0)
        space = tiny_space()
        section = {"name": name, "relaxation": relax} | (
            {"split_epoch": 2} if name == "few_shot" else {})
        s = create_strategy(section, space.build_supernet(), ArchParams(space),
                            ClassificationObjective(), epochs=4)
        trace = []
        for _ in range(4):
            s.step(tiny_batch(4, 1), tiny_batch(4, 2))
            sub = s.subnets[0] if getattr(s, "subnets", None) else s
            relaxation = getattr(sub.relaxation, "inner", sub.relaxation)
            trace.append((round(sub.lr, 8), round(relaxation.tau, 8)))
            s.end_epoch()
        seen[name] = trace
    assert seen["few_shot"] == seen["darts"]


def test_sub_supernets_are_scored_under_the_same_gumbel_noise():
    """Under a stochastic relaxation every sub-supernet is scored from the same random
    state: two identical sub-supernets score alike (with a stream running on from one
    to the next, each drew its own Gumbel noise and the comparison was noise)."""
    s = tiny_strategy({"name": "few_shot", "split_edges": ["normal/n3/e1"], "split_epoch": 1,
                       "relaxation": {"name": "gumbel", "tau": 1.0}})
    _one_shot_epoch(s)
    for b in [tiny_batch(4, 10 + i) for i in range(2)]:
        s.step(tiny_batch(4, 3), b)
    twin = s.subnets[1]
    twin.supernet.load_state_dict(s.subnets[0].supernet.state_dict())
    twin.arch_params.load_state_dict(s.subnets[0].arch_params.state_dict())
    twin.relaxation.fixed = s.subnets[0].relaxation.fixed
    scores = s.scores()
    assert scores[0] == scores[1]
    assert scores == s.scores()  # and the same again: the RNG is left as it was


def test_the_one_shot_phase_is_a_darts_first_order_step():
    section = {"split_edges": ["normal/n3/e1"], "split_epoch": 1}
    s = tiny_strategy({"name": "few_shot", **section})
    ref = tiny_strategy({"name": "darts", "order": 1})
    s.step(tiny_batch(4, 1), tiny_batch(4, 2))
    ref.step(tiny_batch(4, 1), tiny_batch(4, 2))
    assert_same_state(s, ref, exact=True)


def test_a_hard_relaxation_samples_the_fixed_op_of_a_sub_supernet():
    """GDAS's sub-supernets compute the fixed op on the split edge (``active``), not the
    one the sample would pick."""
    from diffnas.arch.relax import create_relaxation
    from diffnas.strategies.few_shot import FixedOpRelaxation

    logits = {"normal": torch.randn(5, 4, generator=torch.Generator().manual_seed(0))}
    logits["normal"][2] = torch.tensor([9.0, 0.0, 0.0, 0.0])  # the sample takes op 0
    relax = FixedOpRelaxation(create_relaxation("hard_gumbel", tau=1.0), {"normal": {2: 3}})
    aw = relax(logits)
    assert int(aw.active["normal"][2]) == 3
    assert torch.equal(aw["normal"][2], torch.tensor([0.0, 0.0, 0.0, 1.0]))


def test_sub_supernets_keep_the_penalties_edge_norm_and_turns_of_the_run():
    """A sub-supernet searches as the run was configured (edge normalisation, penalties),
    the export takes the winner's weights, and a resumed run continues the round robin
    where it stopped."""
    from test_hypergrad import _linear_penalty

    section = {"name": "few_shot", "split_edges": ["normal/n3/e1"], "split_epoch": 1,
               "edge_norm": True, "penalties": [_linear_penalty()]}
    s = tiny_strategy(section)
    _one_shot_epoch(s)
    for sub in s.subnets:
        assert sub.arch_params.betas and sub.config.edge_norm
        assert [name for name, _ in sub.penalties] == ["t_linear"]
    for _ in range(3):
        s.step(tiny_batch(4, 3), tiny_batch(4, 4))
    resumed = tiny_strategy(section)
    resumed.load_state_dict(s.state_dict())
    assert resumed.turn == s.turn == 3
    assert resumed.val_loss == s.val_loss
    s.export(2)
    for k, v in s.supernet.state_dict().items():
        assert torch.equal(v, s.subnets[2].supernet.state_dict()[k])


def test_a_split_before_any_one_shot_epoch_is_refused():
    with pytest.raises(ValueError, match=r"split_epoch must be in \[1, epochs\), got 0"):
        tiny_strategy({"name": "few_shot", "split_epoch": 0})
