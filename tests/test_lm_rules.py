"""Rules of the language-model engine (engine/lm.py) and the text batching that feeds it
(data/text.py) that a mutation audit could break: each test replays a rule by hand on a
tiny recurrent model in float64 (a retraining epoch as clipped momentum SGD with the lr
scaled by seq_len / bptt and the hidden state carried and detached; ASGD after the
non-monotone switch and evaluation on the mean of the weights; perplexity of the token
mean; the DARTS/AWD-LSTM window-length draw; the texts a search and a retraining read)
rather than comparing with numbers the code once printed."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from test_rnn_lm import _tiny_lm_config

from diffnas.arch import ArchParams
from diffnas.config import load_config
from diffnas.data.base import DataFormatError
from diffnas.data.text import (
    batchify,
    bptt_windows,
    get_batch,
    load_corpus,
    shard_columns,
    tokenize,
)
from diffnas.engine.lm import (
    HiddenState,
    LanguageModelObjective,
    LmBatch,
    LmConfig,
    LmSearchTask,
    LmTrainTask,
    TokenMeanLoss,
    build_lm_search,
    evaluate_lm,
    print_lm_result,
    run_lm_retrain,
)
from diffnas.genotype import Genotype, published_genotype
from diffnas.spaces import DataShape, create_space
from diffnas.strategies import create_strategy
from diffnas.supernet.rnn import LmInput, LmOutput

V = 9  # tiny vocabulary
F64 = torch.float64
CELL = Genotype.from_dict({"space": "darts_rnn", "cells": {"recurrent": {
    "edges": [["relu", 0, 1], ["tanh", 1, 2], ["sigmoid", 0, 3]], "concat": [1, 2, 3]}}})
NO_DROPOUT = {k: 0.0 for k in ("dropout", "dropouth", "dropoutx", "dropouti", "dropoute")}


# --- helpers ---------------------------------------------------------------------------
def _space(**kw):
    return create_space({"name": "darts_rnn", "ninp": 6, "nhid": 6, "nodes": 3, **kw},
                        DataShape(num_classes=V))


def _lm(seed: int = 0, **network):
    """A tiny fixed language model in float64 (the paper's dropouts unless overridden)."""
    torch.manual_seed(seed)
    return _space().build_network(CELL, **network).to(F64)


def _text(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return batchify(torch.randint(0, V, (rows * cols,), generator=g), cols)


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


def _clip_(params: list[torch.Tensor], max_norm: float) -> None:
    """Scale the gradients so that their joint norm is at most ``max_norm`` (the rule of
    torch.nn.utils.clip_grad_norm_, eps 1e-6)."""
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params))
    scale = min(1.0, max_norm / (norm + 1e-6))
    for p in params:
        p.grad.mul_(scale)


def _objective_by_hand(out: LmOutput, targets, alpha: float, beta: float):
    ce = F.cross_entropy(out.logits.reshape(-1, V), targets.reshape(-1))
    loss = ce + alpha * out.dropped.pow(2).mean()
    if out.raw.shape[0] > 1:
        loss = loss + beta * (out.raw[1:] - out.raw[:-1]).pow(2).mean()
    return loss, ce


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_params(model, want: list[torch.Tensor]) -> None:
    for got, w in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(got.detach(), w, rtol=1e-10, atol=1e-12)


# --- LmConfig ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"bptt": 1}, r"lm\.bptt must be >= 2, got 1"),
    ({"nonmono": 0}, r"lm\.nonmono must be >= 1"),
    ({"max_seq_len_delta": -1}, r"lm\.max_seq_len_delta must be >= 0, got -1"),
    ({"alpha": math.inf}, r"lm\.alpha must be finite and >= 0, got inf"),
    ({"beta": math.nan}, r"lm\.beta must be finite and >= 0, got nan"),
    ({"beta": -1e-3}, r"lm\.beta must be finite and >= 0"),
    ({"eval_batch_size": 0}, r"lm\.eval_batch_size must be >= 1, got 0"),
    ({"test_batch_size": 0}, r"lm\.test_batch_size must be >= 1, got 0"),
    ({"arch_data": "test"}, r"lm\.arch_data must be one of \('valid', 'split'\)"),
])
def test_lm_settings_out_of_range_are_refused_naming_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        LmConfig(**kw)


def test_the_lm_defaults_are_those_of_the_darts_rnn_code():
    lm = LmConfig()
    assert (lm.bptt, lm.max_seq_len_delta, lm.eval_batch_size, lm.test_batch_size) == \
        (35, 20, 10, 1)
    assert (lm.alpha, lm.beta, lm.nonmono, lm.asgd, lm.variable_bptt) == \
        (0.0, 1e-3, 5, True, True)


# --- the objective and the token mean --------------------------------------------------------
@pytest.mark.parametrize("regularize", [True, False])
@pytest.mark.parametrize("T", [1, 2, 4])
def test_objective_is_cross_entropy_plus_ar_on_dropped_and_tar_on_raw_outputs(T, regularize):
    """loss = CE + alpha * mean(dropped^2) + beta * mean((raw[t+1] - raw[t])^2) (TAR only
    where a window has 2 steps or more); the architecture passes (``regularize=False``)
    and the reported ``loss`` are the plain CE; the new state is left pending, detached."""
    g = torch.Generator().manual_seed(T)
    B, H = 3, 4
    logits = torch.randn(T, B, V, generator=g, dtype=F64)
    raw, dropped = (torch.randn(T, B, H, generator=g, dtype=F64) for _ in range(2))
    w = torch.ones((), dtype=F64, requires_grad=True)
    hidden = raw[-1] * w  # part of a graph, as a forward pass leaves it
    targets = torch.randint(0, V, (T, B), generator=g)
    h0 = torch.zeros(B, H, dtype=F64)
    batch = LmBatch(targets, targets, HiddenState(h0))
    alpha, beta = 0.7, 0.3
    loss, stats = LanguageModelObjective(alpha, beta)(LmOutput(logits, hidden, raw, dropped),
                                                       batch, regularize=regularize)
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])
    ce = -logp.mean()
    ar = dropped.pow(2).sum() / dropped.numel()
    tar = sum(float((raw[t + 1] - raw[t]).pow(2).sum()) for t in range(T - 1)) / \
        max((T - 1) * B * H, 1)
    want = float(ce) + (alpha * float(ar) + beta * tar if regularize else 0.0)
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert stats["loss"] == pytest.approx(float(ce), rel=1e-12)
    assert torch.equal(batch.state.pending, hidden.detach())
    assert not batch.state.pending.requires_grad
    assert batch.state.h is h0  # committed by the task after the step, not here
    batch.state.commit()
    assert torch.equal(batch.state.h, hidden.detach()) and batch.state.pending is None


def test_the_epoch_loss_weights_each_window_by_its_tokens_and_starts_afresh():
    m = TokenMeanLoss()
    m.add(1.0, 10)
    m.add(3.0, 30)  # a token mean, not the mean (2.0) of the window means
    got = m.pop()
    assert got["loss"] == pytest.approx(2.5) and got["ppl"] == pytest.approx(math.exp(2.5))
    m.add(4.0, 5)
    assert m.pop()["loss"] == pytest.approx(4.0)  # the last epoch's windows are gone


# --- evaluation ------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, bptt", [(14, 4), (13, 4), (9, 8)])
@pytest.mark.parametrize("training", [True, False])
def test_evaluation_is_the_token_mean_cross_entropy_in_eval_mode_over_every_target(
        rows, bptt, training):
    """Over all rows - 1 targets (a last window of one token included), dropout off, the
    model's mode restored; equal to one pass over the whole text."""
    model = _lm()  # the paper's dropouts: training mode would change the loss
    src = _text(rows, 3)
    model.train(training)
    got = evaluate_lm(model, src, bptt)
    assert model.training is training
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        out = ref(LmInput(src[:-1], ref.init_hidden(3)))
        nll = F.cross_entropy(out.logits.reshape(-1, V), src[1:].reshape(-1), reduction="sum")
    loss = float(nll) / ((rows - 1) * 3)
    assert got["loss"] == pytest.approx(loss, rel=1e-10)
    assert got["ppl"] == pytest.approx(math.exp(loss), rel=1e-10)


# --- BPTT windows --------------------------------------------------------------------------
def _windows_by_hand(steps: int, bptt: int, seed: int, max_delta: int) -> list[tuple[int, int]]:
    """AWD-LSTM/DARTS: bptt with probability 0.95 else bptt / 2, then N(that, 5) rounded,
    clipped to [5, bptt + max_delta], the last window cut at the text's end."""
    g = torch.Generator().manual_seed(seed)
    out, i = [], 0
    while i < steps - 1:
        u = torch.rand((), generator=g).item()
        base = bptt if u < 0.95 else bptt / 2
        L = round(base + 5.0 * torch.randn((), generator=g).item())
        L = min(max(L, 5), bptt + max_delta, steps - 1 - i)
        out.append((i, L))
        i += L
    return out


@pytest.mark.parametrize("bptt, max_delta, clipped", [(12, 4, True), (30, 20, False),
                                                      (7, 0, True)])
def test_window_lengths_follow_the_awd_lstm_draw(bptt, max_delta, clipped):
    wins = list(bptt_windows(4000, bptt, torch.Generator().manual_seed(3), max_delta))
    assert wins == _windows_by_hand(4000, bptt, 3, max_delta)
    lengths = [L for _, L in wins[:-1]]
    assert 5 <= min(lengths) and max(lengths) <= bptt + max_delta
    if clipped:  # both clips reached
        assert min(lengths) == 5 and max(lengths) == bptt + max_delta


def test_fixed_windows_cover_the_text_and_the_last_target_is_the_last_row():
    for steps in (2, 3, 11, 12, 13):
        wins = list(bptt_windows(steps, 5))
        assert [i for i, _ in wins] == list(range(0, steps - 1, 5))
        assert wins[-1][0] + wins[-1][1] == steps - 1
        x, y = get_batch(torch.arange(steps)[:, None], *wins[-1])
        assert y[-1, 0] == steps - 1 and torch.equal(y, x + 1)


def test_training_windows_vary_by_epoch_reproducibly_and_honour_the_settings():
    src = _text(200, 2)
    cfg = _cfg("seed=4")

    def task(**lm):
        return LmTrainTask(_lm(), src, src, cfg, LmConfig(bptt=10, **lm))

    t = task()
    epochs = [list(t.windows(e)) for e in range(4)]
    assert epochs[0] == list(t.windows(0))  # the same epoch, the same windows (a resume)
    assert len({tuple(w) for w in epochs}) == 4  # each epoch draws its own
    assert any(L > 10 for w in epochs for _, L in w)
    assert all(L <= 10 for e in range(4) for _, L in task(max_seq_len_delta=0).windows(e))
    fixed = task(variable_bptt=False)
    assert [L for _, L in fixed.windows(2)] == [10] * 19 + [9]
    for rows in (11, 12, 21, 200):
        t = LmTrainTask(_lm(), src[:rows], src, cfg, LmConfig(bptt=10, variable_bptt=False))
        assert t.num_batches() == t.epoch_batches(0) == math.ceil((rows - 1) / 10)


# --- retraining ------------------------------------------------------------------------------
def test_a_retraining_epoch_is_clipped_momentum_sgd_per_window_with_scaled_lr_and_carried_state():
    """Every window: loss = CE + AR + TAR from the hidden state the last window left
    (detached), gradients clipped to grad_clip, SGD with weight decay and momentum at
    lr * seq_len / bptt; the windows walk the text in order; the epoch's loss is the token
    mean of the windows' CE."""
    lm = LmConfig(bptt=6, alpha=0.5, beta=0.3, max_seq_len_delta=4)
    cfg = _cfg("retrain.lr=0.7", "retrain.momentum=0.5", "retrain.weight_decay=0.01",
               "retrain.grad_clip=0.05", "seed=1")
    model = _lm()
    twin = copy.deepcopy(model).train()
    src = _text(40, 3)
    task = LmTrainTask(model, src, src[:9], cfg, lm)
    h, bufs, end, total, tokens = twin.init_hidden(3), None, 0, 0.0, 0
    lengths = []
    for batch in task.batches(0):
        L = batch.seq_len
        lengths.append(L)
        assert torch.equal(batch.data, src[end:end + L])
        assert torch.equal(batch.targets, src[end + 1:end + 1 + L])
        end += L
        stats = task.step(batch)
        twin.zero_grad()
        out = twin(LmInput(batch.data, h, batch.seed, batch.columns))
        loss, ce = _objective_by_hand(out, batch.targets, lm.alpha, lm.beta)
        loss.backward()
        h = out.hidden.detach()
        params = list(twin.parameters())
        _clip_(params, 0.05)
        lr = 0.7 * L / lm.bptt
        with torch.no_grad():
            d = [p.grad + 0.01 * p for p in params]
            bufs = d if bufs is None else [0.5 * b + x for b, x in zip(bufs, d, strict=True)]
            for p, b in zip(params, bufs, strict=True):
                p.sub_(lr * b)
        _assert_params(model, _params(twin))
        assert stats["loss"] == pytest.approx(ce.item(), rel=1e-10)
        total, tokens = total + ce.item() * batch.targets.numel(), tokens + batch.targets.numel()
        assert all(g["lr"] == 0.7 for g in task.optimizer.param_groups)  # restored
    assert end == 39 and len(set(lengths)) > 1
    m = task.end_epoch(0)
    assert m["loss"] == pytest.approx(total / tokens, rel=1e-10)
    assert m["ppl"] == pytest.approx(math.exp(total / tokens), rel=1e-10)


def _switched_task(cfg, src, valid, lm):
    """A retraining whose first end_epoch switches to ASGD (the history says it stalled)."""
    task = LmTrainTask(_lm(**NO_DROPOUT), src, valid, cfg, lm)
    task.val_history = [-1.0] * (lm.nonmono + 1)  # unbeatable, older than nonmono epochs
    task.end_epoch(0)
    assert task.asgd and isinstance(task.optimizer, torch.optim.ASGD)
    return task


def test_asgd_steps_plain_sgd_and_evaluates_on_the_mean_of_the_weights_since_the_switch():
    """After the switch (AWD-LSTM: ASGD with t0=0, lambd=0, the retraining's weight decay),
    each window is p -= lr * (clipped g + wd p); validation and the best state use the
    running mean of the weights since (from the second step on, as torch's ASGD counts),
    and the model holds the last weights again after an evaluation."""
    lm = LmConfig(bptt=4, variable_bptt=False, nonmono=1)
    # (lr exact in float32: ASGD keeps its step size eta as a float32 tensor)
    cfg = _cfg("retrain.lr=0.75", "retrain.momentum=0.9", "retrain.weight_decay=0.05",
               "retrain.grad_clip=0.1")
    src, valid = _text(21, 2), _text(9, 2, seed=5)  # 20 targets: 5 windows of bptt
    task = _switched_task(cfg, src, valid, lm)
    twin = copy.deepcopy(task.model).train()
    h, after = twin.init_hidden(2), []
    for batch in task.batches(1):
        assert batch.seq_len == 4
        task.step(batch)
        twin.zero_grad()
        out = twin(LmInput(batch.data, h, batch.seed, batch.columns))
        _objective_by_hand(out, batch.targets, lm.alpha, lm.beta)[0].backward()
        h = out.hidden.detach()
        params = list(twin.parameters())
        _clip_(params, 0.1)
        with torch.no_grad():
            for p in params:
                p.sub_(0.75 * (p.grad + 0.05 * p))
        after.append(_params(twin))
        _assert_params(task.model, after[-1])
    assert len(after) == 5
    # torch's ASGD (AWD-LSTM's, t0=0) sets its average to the weights of the first two
    # steps in turn (mu = 1 / max(1, step - 1 - t0)), then averages: the mean of steps 2..n
    mean = [torch.stack(ws).mean(0) for ws in zip(*after[1:], strict=True)]
    averaged = copy.deepcopy(twin)
    with torch.no_grad():
        for p, m in zip(averaged.parameters(), mean, strict=True):
            p.copy_(m)
    want = evaluate_lm(averaged, valid, lm.bptt)  # (ASGD's mu is float32: 1/3 rounded)
    assert task.evaluate(valid)["loss"] == pytest.approx(want["loss"], rel=1e-7)
    _assert_params(task.model, after[-1])  # the last weights back after the evaluation
    task.best = None  # the next end_epoch keeps its state as the best
    assert task.end_epoch(1)["valid_loss"] == pytest.approx(want["loss"], rel=1e-7)
    best = task.best["state"]
    for name, p in averaged.named_parameters():
        torch.testing.assert_close(best[name], p.detach(), rtol=1e-7, atol=1e-9)
    _assert_params(task.model, after[-1])


@pytest.mark.parametrize("nonmono, losses, switch_at, asgd", [
    (2, [3.0, 2.0, 1.0, 0.5, 0.4], None, True),  # improving: never
    (2, [1.0, 2.0, 3.0, 4.0], 3, True),  # epoch 2 has no epoch older than nonmono
    (2, [5.0, 1.0, 2.0, 3.0], None, True),  # worse than the recent best, not the old one
    (2, [1.0, 5.0, 5.0, 1.0, 1.0], None, True),  # equal to the old best is no stall
    (1, [1.0, 2.0, 1.5], 2, True),  # better than the last epoch, worse than the one before
    (2, [1.0, 2.0, 3.0, 4.0, 5.0], None, False),  # lm.asgd: false
])
def test_the_asgd_switch_is_the_non_monotone_trigger(nonmono, losses, switch_at, asgd):
    """AWD-LSTM/DARTS: at epoch t switch when t > nonmono and the validation loss is worse
    than the best of all but the last nonmono epochs (strictly); once, and never with
    ``lm.asgd: false``."""
    src = _text(12, 2)
    task = LmTrainTask(_lm(), src, src, _cfg(), LmConfig(bptt=5, nonmono=nonmono, asgd=asgd))
    it = iter(losses)
    task.evaluate = lambda source: {"loss": next(it), "ppl": 0.0}
    switched = []
    for e in range(len(losses)):
        m = task.end_epoch(e)
        switched.append(m["asgd"])
    want = [float(switch_at is not None and e >= switch_at) for e in range(len(losses))]
    assert switched == want
    assert task.val_history == losses


@pytest.mark.parametrize("losses, best", [([2.0, 1.0, 1.0], 1), ([math.nan, 2.0, 3.0], 1),
                                          ([1.0, 3.0, 0.5], 2)])
def test_the_best_epoch_is_the_first_with_the_lowest_validation_loss(losses, best):
    """DARTS's train.py keeps a new best on a strictly lower loss; a NaN best (a diverged
    first epoch) is replaced by the next epoch."""
    src = _text(12, 2)
    task = LmTrainTask(_lm(), src, src, _cfg(), LmConfig(bptt=5))
    it = iter(losses)
    task.evaluate = lambda source: {"loss": next(it), "ppl": 0.0}
    for e in range(len(losses)):
        task.end_epoch(e)
    assert task.best["epoch"] == best


def test_a_resumed_retraining_continues_asgd_its_averages_history_and_best():
    """Cut after the switch and an ASGD epoch, saved and loaded through bytes: the next
    epoch gives the same weights, averages, validation, history and best as the run that
    went on."""
    lm = LmConfig(bptt=4, nonmono=1)
    cfg = _cfg("retrain.lr=0.5", "retrain.momentum=0.0", "retrain.weight_decay=0.01")
    src, valid = _text(30, 2), _text(9, 2, seed=5)
    a = _switched_task(cfg, src, valid, lm)
    for batch in a.batches(1):
        a.step(batch)
    a.end_epoch(1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = LmTrainTask(_lm(seed=7, **NO_DROPOUT), src, valid, cfg, lm)
    b.load_state_dict(torch.load(buf, weights_only=False))
    assert b.asgd and isinstance(b.optimizer, torch.optim.ASGD)
    assert b.val_history == a.val_history and b.best["epoch"] == a.best["epoch"]
    for k, t in a.best["state"].items():
        assert torch.equal(b.best["state"][k], t)
    for task in (a, b):
        for batch in task.batches(2):
            task.step(batch)
    _assert_params(b.model, _params(a.model))
    ma, mb = a.end_epoch(2), b.end_epoch(2)
    assert ma == mb and a.val_history == b.val_history and a.best["epoch"] == b.best["epoch"]


def test_the_retraining_reads_each_text_at_its_own_subset_and_batch_size(tmp_path, monkeypatch):
    """retrain.train_subset / retrain.batch_size for training, data.test_subset with
    lm.eval_batch_size for validation and lm.test_batch_size for test, as DARTS's
    train.py batchifies them."""
    cfg = load_config(str(_tiny_lm_config(tmp_path)), [
        "retrain.epochs=1", "retrain.train_subset=200", "retrain.batch_size=4",
        "data.test_subset=70", "lm.eval_batch_size=3", "lm.test_batch_size=2"])
    corpus = load_corpus(cfg.data.name, cfg.data.root)
    seen = {}
    init, best = LmTrainTask.__init__, LmTrainTask.evaluate_best

    def spy_init(self, model, train, valid, *a, **kw):
        seen["train"], seen["valid"] = train, valid
        init(self, model, train, valid, *a, **kw)

    def spy_best(self, source):
        seen.setdefault("evaluated", []).append(source)
        return best(self, source)

    monkeypatch.setattr(LmTrainTask, "__init__", spy_init)
    monkeypatch.setattr(LmTrainTask, "evaluate_best", spy_best)
    result = run_lm_retrain(cfg, published_genotype("DARTS_RNN_V2"), tmp_path / "r")
    assert torch.equal(seen["train"], batchify(corpus.train[:200], 4))
    assert torch.equal(seen["valid"], batchify(corpus.valid[:70], 3))
    valid, test = seen["evaluated"]
    assert torch.equal(valid, seen["valid"]) and torch.equal(test, batchify(corpus.test[:70], 2))
    assert math.isfinite(result["test_ppl"])


def test_the_printed_result_names_the_best_epoch_counting_from_one(capsys):
    g = published_genotype("DARTS_RNN_V2")
    for best in (0, 3):
        print_lm_result(g, {"params": 10, "valid_ppl": 2.0, "test_ppl": 3.0, "epochs_done": 4,
                            "best_epoch": best})
        assert f"(weights of the best validation epoch, {best + 1})" in capsys.readouterr().out


# --- search --------------------------------------------------------------------------------
def _search_task(train_cols=4, arch_cols=2, arch_rows=8, lm=None, w_optim=None):
    space = _space()
    torch.manual_seed(0)
    net, arch = space.build_supernet(), ArchParams(space)
    section = {"name": "darts", "w_optim": w_optim or {"lr": 1.0, "lr_min": 1.0}}
    strategy = create_strategy(section, net, arch, LanguageModelObjective(), epochs=2)
    train = _text(31, train_cols)
    arch_text = None if arch_rows is None else _text(arch_rows, arch_cols, seed=1)
    return LmSearchTask(strategy, space, train, arch_text, _text(6, 2, seed=2),
                        lm or LmConfig(bptt=5, variable_bptt=False), seed=0)


def test_each_search_stream_carries_its_own_state_and_the_arch_stream_wraps_its_text():
    """The training and architecture windows start from the states their stream's last
    step left (each its own, of its own batch size); the architecture text, shorter,
    is read from start i mod (rows - 1), never an empty window; dropout seeds differ per
    stream and window."""
    task = _search_task(arch_rows=8)
    pend = []
    step = task.strategy.step

    def spy(train, arch):
        out = step(train, arch)
        pend.append((train.state.pending.clone(), arch.state.pending.clone()))
        return out

    task.strategy.step = spy
    arch_text, seeds, last = task.arch, set(), None
    for n, (train, arch) in enumerate(task.batches(0)):
        i = 5 * n
        j = i % (arch_text.shape[0] - 1)
        assert arch.seq_len >= 1 and torch.equal(arch.data, arch_text[j:j + arch.seq_len])
        assert torch.equal(arch.targets, arch_text[j + 1:j + 1 + arch.seq_len])
        assert arch.seq_len == min(train.seq_len, arch_text.shape[0] - 1 - j)
        assert train.state.h.shape[0] == 4 and arch.state.h.shape[0] == 2
        if last is None:
            assert not train.state.h.any() and not arch.state.h.any()
        else:
            assert torch.equal(train.state.h, last[0]) and torch.equal(arch.state.h, last[1])
        seeds |= {train.seed, arch.seed}
        task.step((train, arch))
        last = pend[-1]
    assert n == 5 and len(seeds) == 2 * (n + 1)


def test_the_search_epoch_reports_its_lr_and_the_token_mean_of_the_windows():
    """The epoch's lr is the one it trained at (before the scheduler steps), and its
    training loss the token-weighted mean of the windows' losses (lengths vary)."""
    task = _search_task(lm=LmConfig(bptt=5, max_seq_len_delta=5),
                        w_optim={"lr": 1.0, "lr_min": 0.1})
    total, tokens, lengths = 0.0, 0, set()
    for batch in task.batches(0):
        stats = task.step(batch)
        n = batch[0].targets.numel()
        total, tokens = total + stats["loss"] * n, tokens + n
        lengths.add(batch[0].seq_len)
    m = task.end_epoch(0)
    assert len(lengths) > 1
    assert m["lr"] == 1.0 and task.strategy.lr < 1.0
    assert m["loss"] == pytest.approx(total / tokens, rel=1e-9)


@pytest.mark.parametrize("arch_data", ["valid", "split"])
def test_the_search_reads_the_texts_the_settings_name(tmp_path, arch_data):
    """Weights learn on data.train_subset tokens (the first data.search_split of them with
    lm.arch_data=split), alphas on the rest or on the first data.test_subset validation
    tokens at data.batch_size; the validation perplexity on those at lm.eval_batch_size."""
    cfg = load_config(str(_tiny_lm_config(tmp_path)), [
        "data.train_subset=300", "data.test_subset=60", "data.batch_size=4",
        "lm.eval_batch_size=3", f"lm.arch_data={arch_data}", "search.space.nodes=2",
        *(["data.search_split=0.75"] if arch_data == "split" else [])])
    corpus = load_corpus(cfg.data.name, cfg.data.root)
    task = build_lm_search(cfg, corpus)
    if arch_data == "split":
        assert torch.equal(task.train, batchify(corpus.train[:225], 4))
        assert torch.equal(task.arch, batchify(corpus.train[225:300], 4))
    else:
        assert torch.equal(task.train, batchify(corpus.train[:300], 4))
        assert torch.equal(task.arch, batchify(corpus.valid[:60], 4))
    assert torch.equal(task.valid, batchify(corpus.valid[:60], 3))


# --- text ------------------------------------------------------------------------------------
def test_shards_are_contiguous_blocks_of_columns_and_must_divide():
    src = torch.arange(24).view(4, 6)
    parts = [shard_columns(src, r, 3) for r in range(3)]
    assert [p[0].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert torch.equal(torch.cat(parts, 1), src)
    with pytest.raises(ValueError, match=r"data\.batch_size 6 does not divide by the 4 "):
        shard_columns(src, 0, 4, "data.batch_size")


def test_batchify_refuses_a_batch_size_below_one_naming_the_setting():
    with pytest.raises(ValueError, match=r"lm\.eval_batch_size must be positive, got 0"):
        batchify(torch.arange(10), 0, "valid", "lm.eval_batch_size")


def test_unknown_words_are_counted_and_the_first_five_named():
    words = [f"u{k}" for k in range(7)]
    texts = {"train": "a b\n", "valid": " ".join(words) + "\n", "test": "a\n"}
    with pytest.raises(DataFormatError) as err:
        tokenize(texts, "toy", {"valid": "v.txt"})
    msg = str(err.value)
    assert msg.startswith("v.txt: 7 word(s) never seen")
    assert "'u0', 'u1', 'u2', 'u3', 'u4')" in msg and "'u5'" not in msg
