"""Language-model batch sizes the text cannot fill (``batchify`` needs 2 tokens per column)
are refused before they cost a run: from the config alone where a ``*_subset`` decides it
(no run directory), else once the corpus is read and before the search's first epoch
(retraining texts included), and, for a search that is done, with the ``diffnas train``
command that retrains its genotype. They used to be found by ``batchify`` itself, possibly
after the whole search, as "1000 tokens are too few for batch size 600"."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from diffnas.cli import main
from diffnas.config import ConfigError, load_config, save_config
from diffnas.data.text import Corpus, batchify
from diffnas.engine.lm import (
    build_lm_search,
    lm_texts,
    run_lm_search,
    unfit_texts,
)

ROOT = Path(__file__).resolve().parents[1]
RNN = ROOT / "configs/darts_rnn_ptb.yaml"
TINY = ["search.space={name: darts_rnn, ninp: 8, nhid: 8, nodes: 2}", "search.epochs=1",
        "retrain.network={ninp: 8, nhid: 8}", "retrain.epochs=1", "progress=false",
        "lm.bptt=10"]


def write_corpus(d: Path, lines: tuple[int, int, int] = (60, 20, 20)) -> Path:
    """A PTB-format corpus of 6 words + <eos> per line: 7 tokens a line."""
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for split, n in zip(("train", "valid", "test"), lines, strict=True):
        text = "".join(" " + " ".join(f"w{int(i)}" for i in torch.randint(0, 20, (6,),
                                                                           generator=g)) + " \n"
                       for _ in range(n))
        (d / f"ptb.{split}.txt").write_text(text)
    return d


def own(tmp_path: Path, *extra: str) -> list[str]:
    """Overrides for a tiny search on a corpus of 420 / 140 / 140 tokens."""
    root = tmp_path / "corpus"
    if not root.exists():
        write_corpus(root)
    return [f"out_dir={tmp_path / 'runs'}", "data.name=ptb", "device=cpu", f"data.root={root}",
            "data.train_subset=null", "data.test_subset=null", "data.batch_size=4",
            "retrain.train_subset=null", "retrain.batch_size=4", "lm.eval_batch_size=2",
            "lm.test_batch_size=2", *TINY, *extra]


# --- (c) batchify names the text and the setting when given them -------------------------
def test_batchify_names_the_text_and_the_setting():
    with pytest.raises(ValueError, match=r"^1000 tokens are too few for batch size 600 "):
        batchify(torch.zeros(1000, dtype=torch.long), 600)
    with pytest.raises(ValueError, match=r"^the retraining's test text: 1000 tokens are too "
                       r"few for lm\.test_batch_size=600 \(600 columns of 2 tokens at least: "
                       r"1200 tokens\); lower lm\.test_batch_size to 500 or less"):
        batchify(torch.zeros(1000, dtype=torch.long), 600, "the retraining's test text",
                 "lm.test_batch_size")
    assert batchify(torch.arange(1200), 600).shape == (2, 600)  # exactly 2 per column


# --- (a) refused from the config alone, before a run directory ---------------------------
@pytest.mark.parametrize("overrides, match", [
    # the auditor's case: found after the whole search, anonymously
    (["search.epochs=2", "data.train_subset=3000", "data.test_subset=1000",
      "lm.test_batch_size=600"],
     r"data\.test_subset=1000 tokens are too few for lm\.test_batch_size=600 columns \(2 "
     r"tokens each at least: 1200\) of the test split, which the retraining tests on; lower "
     r"lm\.test_batch_size to 500 or less, or raise data\.test_subset to 1200 or more"),
    # the validation text both phases batchify at lm.eval_batch_size is named once
    (["data.test_subset=5"], r"data\.test_subset=5 tokens are too few for "
     r"lm\.eval_batch_size=10 columns .* of the validation split, which the search "
     r"evaluates the supernet on; .*data\.test_subset=5 tokens are too few for "
     r"lm\.test_batch_size=10 columns .* of the test split, which the retraining tests on"),
    # the search alone: its alphas learn on the validation text at data.batch_size
    (["data.test_subset=5", "retrain.enabled=false"], r"data\.test_subset=5 tokens are too "
     r"few for data\.batch_size=16 columns \(2 tokens each at least: 32\) of the validation "
     r"split, which the search's alphas learn on \(lm\.arch_data=valid\); lower "
     r"data\.batch_size to 2 or less, or raise data\.test_subset to 32 or more"),
    (["data.test_subset=30", "lm.eval_batch_size=16", "retrain.enabled=false"],
     r"data\.test_subset=30 tokens are too few for lm\.eval_batch_size=16 columns .* of the "
     r"validation split, which the search evaluates the supernet on"),
    (["data.search_split=0.999", "lm.arch_data=split"],
     r"20 tokens \(the last 0\.001 \(1 - data\.search_split=0\.999\) of data\.train_subset="
     r"20000 tokens\) are too few for data\.batch_size=16 columns \(2 tokens each at least: "
     r"32\) of the architecture part of the training split, which the search's alphas learn "
     r"on \(lm\.arch_data=split\); lower data\.batch_size to 10 or less, or raise "
     r"data\.train_subset to 32000 or more, or move data\.search_split=0\.999 down"),
    (["data.search_split=0.001", "lm.arch_data=split", "data.train_subset=3000"],
     r"3 tokens \(the first data\.search_split=0\.001 of data\.train_subset=3000 tokens\) are "
     r"too few for data\.batch_size=16 columns .* of the weight part of the training split, "
     r"which the search's weights learn on .*raise data\.train_subset to 32000 or more, or "
     r"move data\.search_split=0\.001 up"),
    (["retrain.train_subset=100", "retrain.batch_size=64"],
     r"retrain\.train_subset=100 tokens are too few for retrain\.batch_size=64 columns \(2 "
     r"tokens each at least: 128\) of the training split, which the retraining learns on; "
     r"lower retrain\.batch_size to 50 or less, or raise retrain\.train_subset to 128"),
    # one message names both phases' texts, not the retraining's alone until it is fixed
    (["data.train_subset=30", "retrain.train_subset=20", "retrain.batch_size=16"],
     r"^data\.train_subset=30 tokens are too few for data\.batch_size=16 columns .* of the "
     r"training split, which the search's weights learn on; .*; and retrain\.train_subset=20 "
     r"tokens are too few for retrain\.batch_size=16 columns .* which the retraining learns on"),
], ids=["test-batch", "test-subset-retrain", "test-subset-search", "eval-batch",
        "arch-split", "weight-split", "retrain-subset", "both-phases"])
def test_batch_sizes_the_subsets_cannot_fill_are_refused_before_the_run(tmp_path, capsys,
                                                                        overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RNN, overrides)
    argv = ["search", "--config", str(RNN), f"out_dir={tmp_path / 'runs'}", "name=r",
            *overrides]
    assert main(argv) == 2
    assert re.search(match.replace("^", "^diffnas: error: ", 1), capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_each_text_is_checked_against_the_batch_size_that_batchifies_it(tmp_path, capsys):
    # a single-level search learns its alphas on the training text: the validation text
    # is batchified at lm.eval_batch_size alone (20 tokens fill 10 columns), not at 16
    base = ["data.test_subset=20", "retrain.enabled=false"]
    with pytest.raises(ConfigError, match=r"data\.batch_size=16 columns"):
        load_config(RNN, base)
    load_config(RNN, [*base, "search.strategy={name: snas}"])
    # exactly 2 tokens per column fits
    load_config(RNN, ["data.test_subset=1200", "lm.test_batch_size=600"])
    load_config(RNN, ["data.train_subset=64", "lm.arch_data=split", "data.batch_size=16"])
    # diffnas train reads no search batch, only the retraining's
    load_config(RNN, ["data.test_subset=20", "lm.eval_batch_size=1", "lm.test_batch_size=1"],
                search=False)
    argv = ["train", "--genotype", "DARTS_RNN_V2", "--config", str(RNN),
            f"out_dir={tmp_path / 'runs'}", "name=t", "lm.test_batch_size=6000"]
    assert main(argv) == 2
    assert re.search(r"data\.test_subset=10000 tokens are too few for lm\.test_batch_size=6000 "
                     r"columns", capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_the_check_agrees_with_the_search_it_checks():
    """Around each boundary, the texts the check lists fit exactly where the search
    builds (weights and alphas on a split of the training text, or the validation text)."""
    g = torch.Generator().manual_seed(0)
    corpus = Corpus("ptb", [f"w{i}" for i in range(12)], torch.randint(0, 12, (101,),
                    generator=g), torch.randint(0, 12, (41,), generator=g),
                    torch.randint(0, 12, (30,), generator=g))
    space = ["data.name=ptb", "search.space={name: darts_rnn, ninp: 8, nhid: 8, nodes: 2}",
             "lm.bptt=5",
             "data.train_subset=null", "data.test_subset=null", "lm.eval_batch_size=2"]
    seen = set()
    for arch in ("valid", "split"):
        for split in ((0.1, 0.5, 0.83) if arch == "split" else (0.5,)):  # (read with split)
            for bs in (2, 5, 8, 10, 11, 20, 21, 26):
                cfg = load_config(None, [*space, f"lm.arch_data={arch}",
                                         f"data.search_split={split}", f"data.batch_size={bs}"])
                fits = unfit_texts(lm_texts(cfg, corpus, search=True, retrain=False)) is None
                try:
                    build_lm_search(cfg, corpus)
                    built = True
                except ValueError as exc:
                    assert "tokens are too few" in str(exc)
                    built = False
                assert fits == built, (arch, split, bs)
                seen.add(fits)
    assert seen == {True, False}


# --- (b) found once the corpus is read, before the search's first epoch ------------------
def test_a_retrain_batch_the_corpus_cannot_fill_is_found_before_the_search(tmp_path, capsys):
    """With the whole training text (retrain.train_subset=null) only the corpus knows: it
    failed after the search, with DONE written."""
    argv = ["search", *own(tmp_path, "name=r", "retrain.batch_size=40000")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    run = tmp_path / "runs" / "r"
    assert (f"the 420 tokens of the corpus's train split (all of it) are too few for "
            f"retrain.batch_size=40000 columns (2 tokens each at least: 80000) of the training "
            f"split, which the retraining learns on; lower retrain.batch_size to 210 or less, "
            f"or give the corpus a longer train split (80000 tokens at least). Found once the "
            f"corpus was read, before the search's first epoch. The run {run} keeps the "
            f"settings it started with (a --resume cannot change them): start a new run with "
            f"retrain.batch_size=210") in err
    assert not (run / "search" / "checkpoint.pt").exists()
    assert not (run / "search" / "metrics.jsonl").exists()
    # the resume says the same, and so does --seeds (each seed starts as a resume)
    assert main(["search", "--resume", str(run)]) == 2
    assert "retrain.batch_size=40000 columns" in capsys.readouterr().err
    cfg = load_config(None, own(tmp_path, "retrain.batch_size=40000"))
    with pytest.raises(ConfigError, match="before the search's first epoch"):
        run_lm_search(cfg, tmp_path / "s", resume=True)
    # the setting it names works
    assert main(["search", *own(tmp_path, "name=ok", "retrain.batch_size=210")]) == 0
    assert (tmp_path / "runs/ok/retrain/result.json").is_file()


def test_a_validation_file_of_blank_lines_is_found_before_the_search(tmp_path, capsys):
    root = write_corpus(tmp_path / "corpus")
    (root / "ptb.valid.txt").write_text("\n" * 5)  # 5 <eos> tokens
    assert main(["search", *own(tmp_path, "name=b", "lm.eval_batch_size=3")]) == 2
    err = capsys.readouterr().err
    assert ("the 5 tokens of the corpus's valid split (all of it) are too few for "
            "data.batch_size=4 columns (2 tokens each at least: 8) of the validation split, "
            "which the search's alphas learn on (lm.arch_data=valid); lower data.batch_size to "
            "2 or less, or give the corpus a longer valid split (8 tokens at least); and the 5 "
            "tokens of the corpus's valid split (all of it) are too few for "
            "lm.eval_batch_size=3 columns") in err
    assert "start a new run with data.batch_size=2 lm.eval_batch_size=2" in err
    assert not (tmp_path / "runs/b/search/checkpoint.pt").exists()


def test_a_subset_larger_than_the_corpus_is_counted_by_the_corpus(tmp_path, capsys):
    """data.test_subset bounds the config check; the corpus has fewer tokens (140)."""
    assert main(["search", *own(tmp_path, "name=s", "data.test_subset=500",
                                "lm.test_batch_size=100")]) == 2
    err = capsys.readouterr().err
    assert ("the 140 tokens of the corpus's test split (all of it; data.test_subset=500 asks "
            "for more) are too few for lm.test_batch_size=100 columns (2 tokens each at "
            "least: 200) of the test split, which the retraining tests on; lower "
            "lm.test_batch_size to 70 or less, or give the corpus a longer test split") in err


def test_diffnas_train_checks_the_corpus_before_its_first_epoch(tmp_path, capsys):
    argv = ["train", "--genotype", "DARTS_RNN_V2", *own(tmp_path, "name=t",
                                                       "lm.test_batch_size=100"),
            "search.space={name: darts_rnn, ninp: 8, nhid: 8, nodes: 8}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    run = tmp_path / "runs" / "t"
    assert ("lm.test_batch_size=100 columns (2 tokens each at least: 200) of the test split"
            in err)
    assert (f"Found once the corpus was read, before the retraining's first epoch. The run "
            f"{run} keeps the settings it started with (a --resume cannot change them): start "
            "a new run with lm.test_batch_size=70") in err
    assert not (run / "retrain" / "checkpoint.pt").exists()


def _enable_retraining(run: Path, *overrides: str) -> None:
    """The run's config with retraining on (as a run made before this check was, or one
    whose config was edited): saved as the command line writes it."""
    cfg = load_config(run / "config.yaml", ["retrain.enabled=true", *overrides])
    save_config(cfg, run / "config.yaml")


def test_a_finished_search_gives_the_command_that_retrains_its_genotype(tmp_path, capsys):
    assert main(["search", *own(tmp_path, "name=d", "retrain.enabled=false")]) == 0
    run = tmp_path / "runs" / "d"
    _enable_retraining(run, "retrain.batch_size=40000")
    capsys.readouterr()
    assert main(["search", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "retrain.batch_size=40000 columns" in err and "search's first epoch" not in err
    assert not (run / "retrain" / "checkpoint.pt").exists()
    # as printed, the command retrains the kept genotype as a new run beside this one
    command = err.strip().split("as a new run beside this one: ")[1]
    assert command.endswith(" retrain.batch_size=210")
    argv = shlex.split(command)
    assert argv[:2] == ["diffnas", "train"] and main(argv[1:]) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "runs/d-retrain/retrain/result.json").read_text())
    assert result["genotype"] == json.loads((run / "search/genotype.json").read_text())


def test_a_resumed_search_past_its_first_epoch_goes_on_and_warns(tmp_path, capsys):
    """A resume does not refuse a search already under way: its genotype is worth having;
    the retraining is refused after it, with the command that retrains the genotype."""
    cfg = load_config(None, own(tmp_path, "name=m", "retrain.enabled=false",
                                "search.epochs=2"))
    run = tmp_path / "runs" / "m"
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    run_lm_search(cfg, run, stop_after=1)
    assert (run / "search/checkpoint.pt").exists() and not (run / "search/DONE").exists()
    _enable_retraining(run, "retrain.batch_size=40000")
    assert main(["search", "--resume", str(run)]) == 2
    err = capsys.readouterr().err  # (the log goes to stderr)
    warned = err.index("The retraining after this search will be refused; the search goes on")
    assert warned < err.index("search epoch 2/2") < err.index("genotype is kept")
    assert (run / "search/DONE").exists()
    assert "retrain.batch_size=40000 columns" in err and "the search's genotype is kept" in err
    assert yaml.safe_load((run / "config.yaml").read_text().split("\n", 1)[1])["retrain"][
        "batch_size"] == 40000
