"""Language-model search and retraining (DARTS recurrent cells on Penn Treebank), on the
shared :class:`~diffnas.engine.loop.Loop`.

What differs from image search is only the data flow: batches are BPTT windows of a
batchified text, and each stream (weights, alphas) carries its hidden state from window
to window. A batch holds a :class:`HiddenState`; the objective reads ``state.h`` and
leaves the new last state in ``state.pending``; the task commits it after the step. So
every loss evaluation within one strategy step (virtual step, finite differences) starts
from the same state, and the last evaluation on a stream (the weight step, as in the
paper's code) decides what the next window starts from. Dropout masks are seeded per
window (``LmBatch.seed``) for the same reason.

Settings: ``data`` (``name: ptb``, ``root``, ``batch_size`` = search batch,
``train_subset`` / ``test_subset`` = first N tokens of train / of valid and test,
``search_split``), ``search`` (space ``darts_rnn``, strategy), ``retrain`` (``epochs``,
``batch_size``, ``lr``, ``weight_decay``, ``grad_clip``, ``momentum``, ``train_subset``,
``network``: the evaluation network) and the ``lm`` section (:class:`LmConfig`). The
image-only retrain keys (auxiliary head, drop path, cutout, crop, flip, ``lr_min``) are
not read here (refused when set: ``the engine's ``unread_retrain``), and the image-search
settings (``search.amp``, ``search.compile``, ``search.cuda_graph``,
``search.cudnn_benchmark``, ``search.diagnostics``) are refused.
``logger: tensorboard`` writes ``RUN_DIR/tensorboard/{search,retrain}`` as for images.
Every text a run batchifies is checked against the batch size that lays it out
(:func:`lm_texts`): from the config where a ``*_subset`` decides it (``check_lm_search``,
``check_lm_retrain``, before a run directory exists), else once the corpus is read and
before the search's first epoch, the retraining's texts included (:func:`check_lm_batches`).

Data parallel (torchrun, ``engine/distributed.py``): the columns of a batchified text are
independent streams, so each rank takes ``B / world_size`` contiguous columns of every
training text (``data.batch_size`` / ``retrain.batch_size`` are global and must divide by
the number of processes) and carries the hidden states of its own columns. Every rank
has the same number of tokens per window, so the mean of the ranks' token-mean losses
and of their gradients is the global one: the strategies average their gradients (and
whatever they compare) as in image search, the retraining averages the weight gradients
before clipping. With ``distributed.sync_bn`` the search cell normalises its nodes by the
statistics of the global batch, and N ranks compute what one process computes with the
global batch. Evaluation (validation and test perplexity) runs on rank 0 alone over the
whole text and is broadcast, so it is that of one process and every rank takes the same
ASGD decision. Dropout masks are seeded per window alike on every rank, and each rank
draws them in the global batch's shape and keeps its columns' slice
(``LmBatch.columns``, see ``supernet.rnn.Masks``): with dropout on, N ranks apply exactly
the masks of one process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffnas.arch import ArchParams
from diffnas.config import ConfigError, DataConfig, RunConfig, from_dict, require
from diffnas.data.text import (
    MIN_STEPS,
    TEXT_DATASETS,
    Corpus,
    batch_fits,
    batchify,
    bptt_windows,
    get_batch,
    load_corpus,
    shard_columns,
)
from diffnas.engine import distributed as dp
from diffnas.engine.callbacks import Checkpoint, MetricsLines, ProgressBar, counted
from diffnas.engine.checkpoint import (
    atomic_save,
    atomic_write_text,
    seed_everything,
)
from diffnas.engine.engines import (
    PERPLEXITY,
    Engine,
    refuse_image_search_settings,
    register_engine,
)
from diffnas.engine.loop import Callback, Loop, resumed_text
from diffnas.engine.rundir import (
    check_same_data,
    pin_genotype,
    resolve_device,
    retrain_command,
)
from diffnas.engine.search import (
    StrategyTask,
    run_search_loop,
    search_callbacks,
    search_then_retrain,
)
from diffnas.engine.tensorboard import logger_callbacks
from diffnas.genotype import Genotype
from diffnas.spaces import DataShape, SearchSpace, create_space, space_config
from diffnas.strategies import SearchStrategy, create_strategy, require_data_parallel
from diffnas.supernet.rnn import LmInput, LmOutput

log = logging.getLogger("diffnas")
ARCH_DATA = ("valid", "split")


@dataclass
class LmConfig:
    """The ``lm`` config section: BPTT, evaluation, regularization, ASGD."""

    bptt: int = 35
    variable_bptt: bool = True  # random window lengths around bptt (AWD-LSTM), lr scaled
    max_seq_len_delta: int = 20
    eval_batch_size: int = 10
    test_batch_size: int = 1
    alpha: float = 0.0  # activation regularization (AR) on the dropped outputs
    beta: float = 1e-3  # temporal activation regularization (TAR) on the raw outputs
    arch_data: str = "valid"  # alphas learn on: "valid" (the paper) or "split" (of train)
    asgd: bool = True  # retrain: switch to averaged SGD when validation stalls
    nonmono: int = 5  # ... i.e. is worse than the best of all but the last nonmono epochs

    def __post_init__(self) -> None:
        if self.arch_data not in ARCH_DATA:
            raise ValueError(f"lm.arch_data must be one of {ARCH_DATA}, got {self.arch_data!r}")
        if self.bptt < 2:
            raise ValueError(f"lm.bptt must be >= 2, got {self.bptt}")
        if self.nonmono < 1:
            raise ValueError(f"lm.nonmono must be >= 1 (epochs the ASGD switch looks back), "
                             f"got {self.nonmono}")
        for key in ("eval_batch_size", "test_batch_size"):  # (>= 2 in search: check_lm_search)
            require(getattr(self, key) >= 1, f"lm.{key}", ">= 1", getattr(self, key))
        require(self.max_seq_len_delta >= 0, "lm.max_seq_len_delta", ">= 0",
                self.max_seq_len_delta)
        for key in ("alpha", "beta"):
            v = getattr(self, key)
            require(math.isfinite(v) and v >= 0, f"lm.{key}", "finite and >= 0", v)


def lm_config(cfg: RunConfig) -> LmConfig:
    return from_dict(LmConfig, getattr(cfg, "lm", None) or {}, "lm")


# --- batches and the objective ----------------------------------------------------------
@dataclass
class HiddenState:
    """The state one stream carries across BPTT windows."""

    h: torch.Tensor
    pending: torch.Tensor | None = None

    def commit(self) -> None:
        if self.pending is not None:
            self.h, self.pending = self.pending, None


@dataclass
class LmBatch:
    data: torch.Tensor  # (L, B) inputs
    targets: torch.Tensor  # (L, B) next tokens
    state: HiddenState
    seed: int | None = None  # dropout-mask seed of this window (the same on every rank)
    columns: tuple[int, int] = (0, 1)  # (rank, world size): which block of the global batch

    @property
    def seq_len(self) -> int:
        return self.data.shape[0]


#: the largest mean loss (nats) whose perplexity is reported as it is: exp(50) ~ 5e21
PPL_CAP_LOSS = 50.0


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped at ``exp(PPL_CAP_LOSS)`` so that a diverged model's figure is a
    finite JSON number (``exp`` overflows past 709 nats); the loss logged beside it is
    exact, so nothing is hidden."""
    return math.exp(min(loss, PPL_CAP_LOSS))


class TokenMeanLoss:
    """The training cross-entropy of an epoch weighted by tokens (windows vary in length)
    and its perplexity, ``exp`` of that mean (not a mean of per-window perplexities),
    capped at ``exp(50)`` (:func:`perplexity`)."""

    def __init__(self) -> None:
        self.total, self.tokens = 0.0, 0

    def add(self, mean_nll: float, tokens: int) -> None:
        self.total += float(mean_nll) * tokens
        self.tokens += tokens

    def pop(self) -> dict[str, float]:
        """``{"loss", "ppl"}`` of the epoch so far, then start a new one."""
        loss = self.total / max(self.tokens, 1)
        self.total, self.tokens = 0.0, 0
        return {"loss": loss, "ppl": perplexity(loss)}


class LanguageModelObjective:
    """Cross-entropy of the next token, plus AR (``alpha``) and TAR (``beta``) as in
    AWD-LSTM/DARTS; reports the plain cross-entropy as ``loss``. AR and TAR regularize the
    weights: as in DARTS, a search adds them in the weight step only, and the architecture
    passes use the plain cross-entropy (``regularize=False``, see SearchStrategy.loss)."""

    has_regularizers = True

    def __init__(self, alpha: float = 0.0, beta: float = 1e-3) -> None:
        self.alpha, self.beta = alpha, beta

    def inputs(self, batch: LmBatch) -> LmInput:
        return LmInput(batch.data, batch.state.h, batch.seed, batch.columns)

    def __call__(self, output: LmOutput, batch: LmBatch,
                 regularize: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        logits = output.logits
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1))
        if not torch.isfinite(nll):
            raise FloatingPointError(f"loss is {nll.item()} (NaN/inf): lower the learning rate?")
        loss = nll
        if regularize and self.alpha:
            loss = loss + self.alpha * output.dropped.pow(2).mean()
        if regularize and self.beta and output.raw.shape[0] > 1:
            loss = loss + self.beta * (output.raw[1:] - output.raw[:-1]).pow(2).mean()
        batch.state.pending = output.hidden.detach()
        # per window; a task reports the epoch's perplexity from its token-weighted mean
        return loss, {"loss": nll.item()}


def _seed(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**62)
    return s


class _TrainWindows:
    """The BPTT windows an epoch walks over the training text ``self.train`` (``lm``
    settings, ``seed``): the search's and the retraining's epochs, alike."""

    train: torch.Tensor
    lm: LmConfig
    seed: int

    def windows(self, epoch: int) -> Iterator[tuple[int, int]]:
        """``(start, length)`` of each window of ``epoch``."""
        lm = self.lm  # variable lengths: drawn from a generator of (seed, epoch)
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, 7)) if lm.variable_bptt \
            else None
        return bptt_windows(self.train.shape[0], lm.bptt, g, lm.max_seq_len_delta)

    def num_batches(self) -> int:
        return math.ceil((self.train.shape[0] - 1) / self.lm.bptt)

    def epoch_batches(self, epoch: int) -> int:
        """The windows of ``epoch``: with variable lengths their count differs from
        :meth:`num_batches` (the progress bar's total)."""
        return sum(1 for _ in self.windows(epoch))


class _ScaledLr:
    """Scale the learning rates by ``seq_len / bptt`` for one step (AWD-LSTM), restoring
    them: every optimizer given (a strategy's :meth:`weight_optimizers`)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], factor: float) -> None:
        self.groups = [g for opt in optimizers for g in opt.param_groups]
        self.factor = factor

    def __enter__(self) -> None:
        self.saved = [g["lr"] for g in self.groups]
        for g in self.groups:
            g["lr"] = g["lr"] * self.factor

    def __exit__(self, *exc: Any) -> None:
        for g, lr in zip(self.groups, self.saved, strict=True):
            g["lr"] = lr


@torch.no_grad()
def evaluate_lm(model: nn.Module, source: torch.Tensor, bptt: int,
                arch_weights: Any = None) -> dict[str, float]:
    """Mean next-token cross-entropy and perplexity over a batchified text, eval mode,
    hidden state carried across windows (``arch_weights`` for a supernet)."""
    was_training = model.training
    model.eval()
    h = model.init_hidden(source.shape[1])
    total, count = 0.0, 0
    for i in range(0, source.shape[0] - 1, bptt):
        data, targets = get_batch(source, i, bptt)
        inp = LmInput(data, h)
        out = model(inp) if arch_weights is None else model(inp, arch_weights)
        total += F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                 targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
        h = out.hidden
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": perplexity(loss)}


# --- search --------------------------------------------------------------------------------
class GrowthSchedule(Callback):
    """``grow_prune``: add a node at the start of each epoch in ``grow_epochs`` and fade
    new nodes in over ``fade_steps`` steps. The supernet keeps the growth state (buffers),
    so a resumed run continues where it stopped. ``supernets``: one supernet, or a function
    giving every supernet the strategy trains now (``SearchStrategy.supernets``: a few-shot
    search's sub-supernets too), which all grow and fade in alike."""

    def __init__(self, supernets: nn.Module | Callable[[], list[nn.Module]],
                 space: SearchSpace) -> None:
        if isinstance(supernets, nn.Module):
            self.supernets = lambda: [supernets]
        else:
            self.supernets = supernets
        g = space.config.growth
        self.enabled = g.mode == "grow_prune"
        self.init_nodes, self.epochs, self.fade = g.init_nodes, list(g.grow_epochs), g.fade_steps

    def on_epoch_start(self, loop: Loop, epoch: int) -> None:
        if not self.enabled:
            return
        due = self.init_nodes + sum(e <= epoch for e in self.epochs)
        for i, net in enumerate(self.supernets()):
            while int(net.cell.active_nodes) < due:
                n = net.cell.grow()
                if i == 0:
                    log.info("growth: search epoch %d (grow_epochs counts it as %d) starts "
                             "with a new node, %d in all", epoch + 1, epoch, n)

    def on_step_end(self, loop: Loop, step: int, metrics: dict[str, float]) -> None:
        if self.enabled:
            for net in self.supernets():
                net.cell.fade_in(1.0 / self.fade)


class LmSearchTask(_TrainWindows, StrategyTask):
    """Search over BPTT windows: weights on ``train``, alphas on ``arch`` (bilevel
    strategies), or both on ``train`` (single-level ones, ``arch`` None).

    Under torchrun ``train`` and ``arch`` hold this rank's columns; ``valid`` is the whole
    validation text, evaluated on rank 0."""

    batch_setting = "data.batch_size"  # named when the data holds no full batch

    def __init__(self, strategy: SearchStrategy, space: SearchSpace, train: torch.Tensor,
                 arch: torch.Tensor | None, valid: torch.Tensor, lm: LmConfig, seed: int,
                 rule: str | None = None, rank: int = 0, world_size: int = 1) -> None:
        self.strategy, self.space, self.lm, self.seed, self.rule = strategy, space, lm, seed, rule
        self.train, self.arch, self.valid = train, arch, valid
        self.rank, self.world_size = rank, world_size
        self.train_nll = TokenMeanLoss()

    @property
    def supernet(self) -> nn.Module:
        return self.strategy.supernet

    def batches(self, epoch: int) -> Iterable[Any]:
        self.supernet.train()
        ht = HiddenState(self.supernet.init_hidden(self.train.shape[1]))
        cols = (self.rank, self.world_size)
        arch = self.arch  # None: single-level, one stream
        ha = None if arch is None else HiddenState(self.supernet.init_hidden(arch.shape[1]))
        for n, (i, L) in enumerate(self.windows(epoch)):
            x, y = get_batch(self.train, i, L)
            train = LmBatch(x, y, ht, _seed(self.seed, epoch, n, 0), cols)
            if arch is None:
                yield train, None
                continue
            xa, ya = get_batch(arch, i % (arch.shape[0] - 1), L)
            yield train, LmBatch(xa, ya, ha, _seed(self.seed, epoch, n, 1), cols)

    def step(self, batch: tuple[LmBatch, LmBatch | None]) -> dict[str, float]:
        train, arch = batch
        with _ScaledLr(self.strategy.weight_optimizers(), train.seq_len / self.lm.bptt):
            stats = dp.all_reduce_metrics(self.strategy.step(train, arch))  # mean over ranks
        train.state.commit()
        if arch is not None:
            arch.state.commit()
        # every rank has as many tokens: the mean over ranks is the global token mean
        self.train_nll.add(stats["loss"], train.targets.numel() * self.world_size)
        return stats

    def end_epoch(self, epoch: int) -> dict[str, float]:
        dp.assert_replicated({"architecture parameters": self.strategy.alphas(),
                              "supernet weights": self.supernet.parameters()})
        lr, aw = self.end_strategy_epoch()  # on every rank (the same forked draw)
        v = dp.main_process_result(evaluate_lm, self.supernet, self.valid, self.lm.bptt, aw)
        return {"lr": lr, **self.train_nll.pop(), "valid_loss": v["loss"],
                "valid_ppl": v["ppl"]}


def _subset(t: torch.Tensor, n: int | None) -> torch.Tensor:
    return t if n is None else t[:n]


def lm_space(cfg: RunConfig, corpus: Corpus) -> SearchSpace:
    return create_space(cfg.search.space, DataShape(in_channels=1, resolution=1,
                                                    num_classes=corpus.vocab_size))


# --- the texts a run batchifies, against their batch sizes ----------------------------------
@dataclass(frozen=True)
class LmText:
    """One text a phase of an LM run lays out in columns (:func:`batchify`) and the batch
    size that does it: what :func:`lm_texts` lists, for the checks that find a batch size
    the text cannot fill before the run (or its search) starts."""

    what: str  # which split, and what the phase does with it
    tokens: int  # the tokens it holds (at most, where only the config is known)
    count: str  # those tokens, as the message says them ("data.test_subset=1000 tokens")
    setting: str  # the dotted key of the batch size
    batch_size: int
    least: int  # the smallest value ``setting`` takes here
    more: str  # how to give the text more tokens
    more_override: str | None = None  # the override that does it, where one does

    def fits(self) -> bool:
        return batch_fits(self.tokens, self.batch_size)

    def largest(self) -> int | None:
        """The largest batch size that fits the text, None where none allowed does."""
        n = self.tokens // MIN_STEPS
        return n if n >= self.least else None

    def fix(self) -> str | None:
        """The override that makes the text fit: a smaller batch, else a larger subset."""
        n = self.largest()
        return f"{self.setting}={n}" if n is not None else self.more_override

    def problem(self) -> str:
        n = self.largest()
        lower = f"lower {self.setting} to {n} or less, or " if n is not None else ""
        return (f"{self.count} are too few for {self.setting}={self.batch_size} "
                f"columns ({MIN_STEPS} tokens each at least: {MIN_STEPS * self.batch_size}) "
                f"of {self.what}; {lower}{self.more}")


def lm_texts(cfg: RunConfig, corpus: Corpus | None = None, search: bool = True,
             retrain: bool = True) -> list[LmText]:
    """The texts an LM run batchifies, each with the batch size that does it (as
    :func:`build_lm_search` and :func:`run_lm_retrain` do): with ``search``, the search's
    weight and architecture texts (``data.batch_size``, the split per ``lm.arch_data``
    and the strategy) and its validation text (``lm.eval_batch_size``); with
    ``retrain``, the retraining's training text (``retrain.batch_size``), validation and
    test texts (``lm.eval_batch_size``, ``lm.test_batch_size``). Token counts come from
    ``corpus`` and the ``*_subset`` settings; without a corpus (the config alone) a text
    is listed only where a subset bounds it (it holds that many tokens at most, so a
    batch that does not fit them fits no corpus) and left out otherwise. The batch sizes
    are global under torchrun (each rank takes a share of the columns), so the tokens a
    text needs do not depend on the number of processes. A text both phases batchify
    alike (the validation text) is listed once."""
    from diffnas.strategies.registry import strategy_class

    lm, d, r = lm_config(cfg), cfg.data, cfg.retrain
    texts: list[LmText] = []

    def whole(split: str) -> int | None:
        return None if corpus is None else len(getattr(corpus, split))

    def count(split: str, key: str, subset: int | None) -> tuple[int, str, bool] | None:
        """(tokens, how the message says them, whether ``key`` bounds them)."""
        n = whole(split)
        if subset is not None and (n is None or subset <= n):
            return subset, f"{key}={subset} tokens", True
        if n is None:
            return None
        asks = f"; {key}={subset} asks for more" if subset is not None else ""
        return n, f"the {n} tokens of the corpus's {split} split (all of it{asks})", False

    def more(split: str, key: str, bounded: bool, needed: int) -> tuple[str, str | None]:
        """How to give a text the ``needed`` tokens of ``split`` it lacks."""
        n = whole(split)
        if bounded and (n is None or needed <= n):
            return f"raise {key} to {needed} or more", f"{key}={needed}"
        return f"give the corpus a longer {split} split ({needed} tokens at least)", None

    def add(split: str, key: str, subset: int | None, what: str, setting: str, bs: int,
            least: int) -> None:
        c = count(split, key, subset)
        if c is None:
            return
        tokens, said, bounded = c
        if any(t.setting == setting and t.tokens == tokens for t in texts):
            return  # (the validation text at lm.eval_batch_size: the search's and the retraining's)
        texts.append(LmText(what, tokens, said, setting, bs, least,
                            *more(split, key, bounded, MIN_STEPS * bs)))

    if search:
        bs = d.batch_size
        cls = strategy_class(cfg.search.strategy)
        if cls.uses_validation and lm.arch_data == "split":
            c = count("train", "data.train_subset", d.train_subset)
            if c is not None:
                tokens, said, bounded = c
                s, need = d.search_split, MIN_STEPS * bs
                parts = (("weight", lambda n: int(n * s), f"the first data.search_split={s}",
                          lambda n: n * s),
                         ("architecture", lambda n: n - int(n * s),
                          f"the last {1 - s:g} (1 - data.search_split={s})",
                          lambda n: n * (1 - s)))
                for name, part, which, share in parts:
                    least_n = max(tokens, math.ceil(need / share(1)))
                    while part(least_n) < need:  # (float rounding of int(n * s))
                        least_n += 1
                    hint, override = more("train", "data.train_subset", bounded, least_n)
                    texts.append(LmText(
                        f"the {name} part of the training split, which the search's "
                        f"{'weights' if name == 'weight' else 'alphas'} learn on "
                        "(lm.arch_data=split)", part(tokens),
                        f"{part(tokens)} tokens ({which} of {said})", "data.batch_size", bs, 2,
                        f"{hint}, or move data.search_split={s} "
                        f"{'up' if name == 'weight' else 'down'}", override))
        else:
            add("train", "data.train_subset", d.train_subset,
                "the training split, which the search's weights learn on", "data.batch_size",
                bs, 2)
            if cls.uses_validation:
                add("valid", "data.test_subset", d.test_subset, "the validation split, which "
                    "the search's alphas learn on (lm.arch_data=valid)", "data.batch_size", bs, 2)
        add("valid", "data.test_subset", d.test_subset,
            "the validation split, which the search evaluates the supernet on",
            "lm.eval_batch_size", lm.eval_batch_size, 2)
    if retrain:
        add("train", "retrain.train_subset", r.train_subset,
            "the training split, which the retraining learns on", "retrain.batch_size",
            r.batch_size, 1)
        add("valid", "data.test_subset", d.test_subset,
            "the validation split, which the retraining evaluates on", "lm.eval_batch_size",
            lm.eval_batch_size, 1)
        add("test", "data.test_subset", d.test_subset,
            "the test split, which the retraining tests on", "lm.test_batch_size",
            lm.test_batch_size, 1)
    return texts


def unfit_texts(texts: list[LmText]) -> tuple[str, list[str]] | None:
    """What is wrong with the texts their batch sizes do not fit (one sentence each) and
    the overrides that fix it, or None when every text fits."""
    bad = [t for t in texts if not t.fits()]
    if not bad:
        return None
    fixes = [f for f in (t.fix() for t in bad) if f is not None]
    return "; and ".join(t.problem() for t in bad), list(dict.fromkeys(fixes))


def refuse_unfit_texts(texts: list[LmText]) -> None:
    """A :class:`ConfigError` naming every text its batch size does not fit."""
    unfit = unfit_texts(texts)
    if unfit is not None:
        raise ConfigError(unfit[0])


def _new_run(run_dir: str | Path, fixes: list[str], when: str) -> str:
    with_ = " ".join(fixes) if fixes else "other settings"
    return (f". Found {when}. The run {run_dir} keeps the settings it started with (a "
            f"--resume cannot change them): start a new run with {with_}")


def check_lm_batches(cfg: RunConfig, corpus: Corpus, run_dir: str | Path, search: bool,
                     retrain: bool) -> None:
    """Every text the run will batchify (:func:`lm_texts`) against its batch size, once
    the corpus is read: the search's (``search``) and the retraining's (``retrain``), so
    that a batch the data cannot fill is found before the search's first epoch, not
    after the search. A search that is done keeps its genotype: then the error gives the
    ``diffnas train`` command that retrains it as a new run beside this one
    (``rundir.retrain_command``). (Batches that do not split over torchrun's processes
    are refused when the config is read: :func:`_check_shares`.)"""
    unfit = unfit_texts(lm_texts(cfg, corpus, search, retrain))
    if unfit is None:
        return
    problems, fixes = unfit
    if search:
        raise ConfigError(problems + _new_run(run_dir, fixes, "once the corpus was read, "
                                              "before the search's first epoch"))
    command = dp.main_process_result(retrain_command, run_dir)  # None: no search genotype
    if command is None:
        raise ConfigError(problems + _new_run(run_dir, fixes, "once the corpus was read, "
                                              "before the retraining's first epoch"))
    with_ = " ".join(fixes) if fixes else "data.root=DIR"  # (no override helps: more text)
    raise ConfigError(f"{problems}. The run {run_dir} keeps the settings it started with (a "
                      "--resume cannot change them); the search's genotype is kept: retrain "
                      f"it {'' if fixes else 'on a longer text '}as a new run beside this one: "
                      f"{command} {with_}")


def check_lm_search(cfg: RunConfig, retrain: bool = False) -> None:
    """What an LM search needs that its config shows (also checked at config loading):
    at least 2 sequences per search and validation batch (the search cell normalizes with
    batch statistics); a strategy that does not relabel the training targets (RLNAS's
    random labels are defined for classes); for a single-level one (it learns alphas on
    the training text) no ``lm.arch_data: split``, which it would ignore; and enough
    tokens for the batch sizes in every search text the ``*_subset`` settings bound
    (:func:`lm_texts`: ``data.train_subset`` and ``data.search_split`` against
    ``data.batch_size``, ``data.test_subset`` against it and ``lm.eval_batch_size``);
    with ``retrain`` the retraining's texts too, so that one message names every text of
    the run that its batch size does not fit, not one phase's at a time."""
    from diffnas.strategies.registry import strategy_class

    lm = lm_config(cfg)
    for key, value in (("data.batch_size", cfg.data.batch_size),
                       ("lm.eval_batch_size", lm.eval_batch_size)):
        require(value >= 2, key, ">= 2 in a search (the search cell normalizes with batch "
                "statistics)", value)
    cls = strategy_class(cfg.search.strategy)
    if cls.relabel is not SearchStrategy.relabel:
        raise ConfigError(f"search.strategy.name: {cls.name!r} trains on relabelled targets; "
                          "the language-model engine (engine/lm.py) does not relabel a text: "
                          "use it on image or graph spaces")
    if not cls.uses_validation and lm.arch_data != "valid":
        raise ConfigError(f"lm.arch_data: {cls.name!r} is single-level and learns the alphas on "
                          "the training text, so it keeps no split of it for them: remove "
                          "lm.arch_data")
    split = cfg.data.search_split
    if split != DataConfig().search_split and (lm.arch_data != "split" or not cls.uses_validation):
        why = ("the single-level strategy learns the alphas on the whole training text"
               if not cls.uses_validation else "with lm.arch_data: valid the alphas learn on "
               "the validation text")
        raise ConfigError(f"data.search_split={split} is read with lm.arch_data: split alone "
                          f"(the share of the training text the weights learn on); {why}: "
                          "remove data.search_split")
    refuse_unfit_texts(lm_texts(cfg, search=True, retrain=retrain))


def check_growth(cfg: RunConfig) -> None:
    """Every epoch of ``search.space.growth.grow_epochs`` starts within the search (also
    checked at config loading)."""
    for e in space_config(cfg.search.space).growth.grow_epochs:
        if e >= cfg.search.epochs:
            raise ConfigError(f"search.space.growth.grow_epochs: growth epoch {e} is not before "
                              f"search.epochs={cfg.search.epochs}: every node must be grown "
                              "during the search")


def build_lm_search(cfg: RunConfig, corpus: Corpus, device: torch.device | str = "cpu",
                    rank: int = 0, world_size: int = 1) -> LmSearchTask:
    """Space, supernet, alphas, strategy and batchified texts for an LM search (under
    torchrun: this rank's columns of the training texts)."""
    lm, d = lm_config(cfg), cfg.data
    refuse_image_search_settings(cfg)
    check_lm_search(cfg)
    check_growth(cfg)
    bs = d.batch_size
    if world_size > 1:
        require_data_parallel(cfg.search.strategy, world_size)
        if bs // world_size < 2:  # (a batch that does not divide: shard_columns says so)
            raise ValueError(
                f"data.batch_size {bs} over {world_size} processes leaves {bs // world_size} "
                "column per rank: "
                "the recurrent search cell normalises its nodes by batch statistics and "
                "needs at least 2 sequences per rank")
    seed_everything(cfg.seed)
    space = lm_space(cfg, corpus)
    supernet = space.build_supernet().to(device)
    arch = ArchParams(space).to(device)
    dp.broadcast_([*supernet.state_dict().values(), *arch.parameters()])  # replicas of rank 0
    if world_size > 1 and cfg.distributed.sync_bn:
        supernet.cell.global_norm = dp.global_batch_norm  # nodes: global-batch statistics
    objective = LanguageModelObjective(lm.alpha, lm.beta)
    strategy = create_strategy(cfg.search.strategy, supernet, arch, objective, cfg.search.epochs)
    train = _subset(corpus.train, d.train_subset)
    arch_text: torch.Tensor | None = None  # single-level: alphas learn on the training text
    if strategy.uses_validation:
        if lm.arch_data == "valid":
            arch_text = _subset(corpus.valid, d.test_subset)
        else:
            cut = int(len(train) * d.search_split)
            train, arch_text = train[:cut], train[cut:]
    valid = _subset(corpus.valid, d.test_subset)

    def columns(text: torch.Tensor, split: str) -> torch.Tensor:
        return shard_columns(batchify(text, bs, split, "data.batch_size"), rank, world_size,
                             "data.batch_size").to(device)

    arch_split = "the search's architecture text (lm.arch_data=" + lm.arch_data + ")"
    return LmSearchTask(strategy, space, columns(train, "the search's training text"),
                        None if arch_text is None else columns(arch_text, arch_split),
                        batchify(valid, lm.eval_batch_size, "the search's validation text",
                                 "lm.eval_batch_size").to(device), lm, cfg.seed,
                        cfg.search.discretizer, rank, world_size)


@dataclass
class LmSearchResult:
    genotype: Genotype
    history: list[dict[str, float]]
    task: LmSearchTask


def run_lm_search(cfg: RunConfig, run_dir: str | Path, resume: bool = False,
                  stop_after: int | None = None, corpus: Corpus | None = None) -> LmSearchResult:
    """Search a recurrent cell as configured; writes ``run_dir/search`` like ``run_search``
    (under torchrun: rank 0 alone)."""
    refuse_image_search_settings(cfg)  # before the run directory is touched
    check_lm_search(cfg)
    out = Path(run_dir) / "search"
    rank = dp.env()
    if rank.is_main:
        out.mkdir(parents=True, exist_ok=True)
    device = dp.rank_device(resolve_device(cfg.device))
    corpus = corpus or load_corpus(cfg.data.name, cfg.data.root)
    dp.main_process_result(check_same_data, out, corpus, resume)  # a resume on other data
    check_search_batches(cfg, corpus, run_dir)
    task = build_lm_search(cfg, corpus, device, rank.rank, rank.world_size)
    callbacks = search_callbacks(
        task, out, cfg, first=[GrowthSchedule(task.strategy.supernets, task.space)])
    loop = Loop(task, cfg.search.epochs, callbacks)
    n_w = sum(p.numel() for p in task.supernet.parameters())
    history, genotype = run_search_loop(loop, task, out, resume, stop_after,
                                        f"LM search: supernet weights={n_w}", "windows")
    return LmSearchResult(genotype, history, task)


def check_search_batches(cfg: RunConfig, corpus: Corpus, run_dir: str | Path) -> None:
    """Before the search's first epoch (a search that has a checkpoint is past it): the
    texts of the search and, with ``retrain.enabled``, of the retraining against their
    batch sizes (:func:`check_lm_batches`; ``--seeds`` starts every seed as a resume, so
    this is the search's check, not ``run_lm``'s). A resumed search whose retraining
    would be refused goes on (its genotype is worth having), with a warning."""
    started = dp.main_process_result(lambda: (Path(run_dir) / "search" /
                                              "checkpoint.pt").exists())
    if not started:
        check_lm_batches(cfg, corpus, run_dir, True, cfg.retrain.enabled)
        return
    unfit = unfit_texts(lm_texts(cfg, corpus, False, True)) if cfg.retrain.enabled else None
    if unfit is not None and dp.is_main_process():
        log.warning("%s. The retraining after this search will be refused; the search goes "
                    "on, and its genotype can then be retrained as a new run with diffnas "
                    "train (the command is printed then)", unfit[0])


# --- retraining ------------------------------------------------------------------------------
class LmTrainTask(_TrainWindows):
    """Train a fixed LM: SGD with per-window lr scaling, switching to averaged SGD (ASGD)
    when validation stops improving (non-monotonic trigger, AWD-LSTM/DARTS); validation
    and test use the averaged weights once ASGD runs.

    Under torchrun ``train`` holds this rank's columns, the weight gradients are averaged
    over ranks before clipping (so SGD and ASGD, and ASGD's averages, stay replicated), and
    rank 0 evaluates ``valid`` (the whole text) for every rank, which then takes the same
    ASGD decision."""

    batch_setting = "retrain.batch_size"  # named when the data holds no full batch

    def __init__(self, model: nn.Module, train: torch.Tensor, valid: torch.Tensor,
                 cfg: RunConfig, lm: LmConfig, rank: int = 0, world_size: int = 1) -> None:
        self.model, self.train, self.valid, self.lm = model, train, valid, lm
        self.r, self.seed = cfg.retrain, cfg.seed
        self.rank, self.world_size = rank, world_size
        self.objective = LanguageModelObjective(lm.alpha, lm.beta)
        self.optimizer = self._sgd()
        self.asgd = False
        self.val_history: list[float] = []
        self.train_nll = TokenMeanLoss()
        # the weights evaluated at the best validation loss so far (ASGD averages once on),
        # which the result reports and model.pt holds, as DARTS's and AWD-LSTM's train.py
        self.best: dict[str, Any] | None = None

    def _sgd(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.r.lr, momentum=self.r.momentum,
                               weight_decay=self.r.weight_decay)

    def _asgd(self) -> torch.optim.Optimizer:
        return torch.optim.ASGD(self.model.parameters(), lr=self.r.lr, t0=0, lambd=0.0,
                                weight_decay=self.r.weight_decay)

    def batches(self, epoch: int) -> Iterable[Any]:
        self.model.train()
        h = HiddenState(self.model.init_hidden(self.train.shape[1]))
        for n, (i, L) in enumerate(self.windows(epoch)):
            x, y = get_batch(self.train, i, L)
            yield LmBatch(x, y, h, _seed(self.seed, epoch, n, 2), (self.rank, self.world_size))

    def step(self, batch: LmBatch) -> dict[str, float]:
        with _ScaledLr([self.optimizer], batch.seq_len / self.lm.bptt):
            self.optimizer.zero_grad(set_to_none=True)
            loss, stats = self.objective(self.model(self.objective.inputs(batch)), batch)
            loss.backward()
            dp.average_grads_(self.model.parameters())  # the global batch's gradient
            nn.utils.clip_grad_norm_(self.model.parameters(), self.r.grad_clip)
            self.optimizer.step()
        batch.state.commit()
        stats = dp.all_reduce_metrics(stats)  # equal tokens per rank: the global mean
        self.train_nll.add(stats["loss"], batch.targets.numel() * self.world_size)
        return stats

    def averaged(self) -> _Averaged:
        return _Averaged(self.model, self.optimizer if self.asgd else None)

    def evaluate(self, source: torch.Tensor) -> dict[str, float]:
        """:func:`evaluate_lm` of the (ASGD-averaged) weights on rank 0, for every rank."""
        def run() -> dict[str, float]:
            with self.averaged():
                return evaluate_lm(self.model, source, self.lm.bptt)
        return dp.main_process_result(run)

    def end_epoch(self, epoch: int) -> dict[str, float]:
        dp.assert_replicated({"weights": self.model.parameters()})
        v = self.evaluate(self.valid)
        # (on every rank alike; a NaN best, e.g. a diverged first epoch, is replaced)
        if self.best is None or v["loss"] < self.best["valid_loss"] \
                or math.isnan(self.best["valid_loss"]):
            with self.averaged(), torch.no_grad():
                state = {k: t.detach().clone() for k, t in self.model.state_dict().items()}
            self.best = {"epoch": epoch, "valid_loss": v["loss"], "state": state}
        hist = self.val_history
        if (self.lm.asgd and not self.asgd and len(hist) > self.lm.nonmono
                and v["loss"] > min(hist[: -self.lm.nonmono])):
            log.info("retrain: validation stalled, switching to ASGD at epoch %d", epoch + 1)
            self.optimizer, self.asgd = self._asgd(), True
        hist.append(v["loss"])
        return {"lr": self.r.lr, **self.train_nll.pop(), "valid_loss": v["loss"],
                "valid_ppl": v["ppl"], "asgd": float(self.asgd)}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "asgd": self.asgd, "val_history": list(self.val_history), "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.asgd = bool(state["asgd"])
        self.optimizer = self._asgd() if self.asgd else self._sgd()
        self.optimizer.load_state_dict(state["optimizer"])
        self.val_history = list(state["val_history"])
        self.best = state.get("best")  # (checkpoints before it was kept: from here on)

    def evaluate_best(self, source: torch.Tensor) -> dict[str, float]:
        """:func:`evaluate_lm` of the best weights (the last ones when no epoch has ended)
        on rank 0, for every rank; leaves the model holding them."""
        if self.best is None:
            return self.evaluate(source)
        self.model.load_state_dict(self.best["state"])
        return dp.main_process_result(evaluate_lm, self.model, source, self.lm.bptt)


class _Averaged:
    """Context: the ASGD averages in place of the weights (nothing without ASGD)."""

    def __init__(self, model: nn.Module, asgd: torch.optim.Optimizer | None) -> None:
        self.model, self.asgd, self.saved = model, asgd, []

    def __enter__(self) -> None:
        if self.asgd is None:
            return
        with torch.no_grad():
            for p in self.model.parameters():
                ax = self.asgd.state.get(p, {}).get("ax")
                if ax is not None:
                    self.saved.append((p, p.detach().clone()))
                    p.copy_(ax)

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for p, w in self.saved:
                p.copy_(w)
        self.saved = []


def count_lm_parameters(model: nn.Module) -> int:
    """Parameters of a language model, the tied embedding/decoder matrix counted once."""
    return sum(p.numel() for p in model.parameters())


def run_lm_retrain(cfg: RunConfig, genotype: Genotype, run_dir: str | Path,
                   resume: bool = False, stop_after: int | None = None,
                   corpus: Corpus | None = None) -> dict[str, Any]:
    """Train ``genotype``'s language model from scratch; writes ``run_dir/retrain`` with the
    validation history and the final test perplexity."""
    out = Path(run_dir) / "retrain"
    rank = dp.env()

    def open_dir() -> None:  # rank 0 alone touches the run directory
        out.mkdir(parents=True, exist_ok=True)
        pin_genotype(out, genotype, resume)

    dp.main_process_result(open_dir)
    lm, r, d = lm_config(cfg), cfg.retrain, cfg.data
    device = dp.rank_device(resolve_device(cfg.device))
    corpus = corpus or load_corpus(d.name, d.root)
    dp.main_process_result(check_same_data, out, corpus, resume)  # a resume on other data
    if not dp.main_process_result(lambda: (out / "checkpoint.pt").exists()):
        check_lm_batches(cfg, corpus, run_dir, False, True)  # (started: they fit)
    train = shard_columns(batchify(_subset(corpus.train, r.train_subset), r.batch_size,
                                   "the retraining's training text", "retrain.batch_size"),
                          rank.rank, rank.world_size, "retrain.batch_size").to(device)
    seed_everything(cfg.seed)
    model = lm_space(cfg, corpus).build_network(genotype, **r.network).to(device)
    dp.broadcast_(model.state_dict().values())  # replicas of rank 0
    params = count_lm_parameters(model)
    log.info("LM retrain: %s params", f"{params:,}")
    valid = batchify(_subset(corpus.valid, d.test_subset), lm.eval_batch_size,
                     "the retraining's validation text", "lm.eval_batch_size").to(device)
    test = batchify(_subset(corpus.test, d.test_subset), lm.test_batch_size,
                    "the retraining's test text", "lm.test_batch_size").to(device)
    task = LmTrainTask(model, train, valid, cfg, lm, rank.rank, rank.world_size)
    loop = Loop(task, r.epochs, [*dp.main_process_only([ProgressBar("retrain", cfg.progress),
                                                       MetricsLines(out / "metrics.jsonl")]),
                                 *logger_callbacks(cfg, out),  # writes on rank 0 alone
                                 dp.MainProcessOnly(Checkpoint(out / "checkpoint.pt"))])
    if dp.resume_loop(loop, out / "checkpoint.pt", resume):
        log.info(resumed_text("LM retraining", loop))
    history = loop.run(stop_after=stop_after)
    # the best epoch's weights by validation, as DARTS's train.py reloads before testing
    final_valid, final_test = task.evaluate_best(valid), task.evaluate_best(test)
    best = task.best
    result = {"genotype": genotype.to_dict(), "params": params, "epochs_done": loop.epoch,
              "asgd": task.asgd, "best_epoch": None if best is None else best["epoch"],
              "valid_ppl": final_valid["ppl"], "test_ppl": final_test["ppl"],
              "test_loss": final_test["loss"], "history": history}
    if rank.is_main:
        with task.averaged() if best is None else contextlib.nullcontext():
            atomic_save(model.state_dict(), out / "model.pt")
        atomic_write_text(json.dumps(result, indent=1) + "\n", out / "result.json")
    dp.barrier()
    return result


def run_lm(cfg: RunConfig, run_dir: Path, resume: bool = False) -> int:
    """``diffnas search`` for the recurrent space: search, then retrain if enabled (under
    torchrun on every rank; rank 0 reads and writes the run directory and prints)."""
    refuse_image_search_settings(cfg)  # before the corpus is read or the search starts
    check_lm_search(cfg)
    corpus = load_corpus(cfg.data.name, cfg.data.root)
    return search_then_retrain(
        cfg, run_dir, lambda: run_lm_search(cfg, run_dir, resume=resume, corpus=corpus).genotype,
        lambda g: run_lm_retrain(cfg, g, run_dir, resume=resume, corpus=corpus),
        print_lm_result)


def print_lm_result(genotype: Genotype, result: dict[str, Any] | None) -> None:
    """The genotype and, after a retrain, its parameters and perplexities."""
    print("\n== genotype ==")
    print(genotype)
    if result is not None:
        print(f"params: {result['params']:,}")
        print(f"valid perplexity: {result['valid_ppl']:.2f}, test perplexity: "
              f"{result['test_ppl']:.2f} after {counted(result['epochs_done'], 'epoch')}"
              + (f" (weights of the best validation epoch, {result['best_epoch'] + 1})"
                 if result.get("best_epoch") is not None else ""))


def lm_network_summary(cfg: RunConfig, genotype: Genotype) -> dict[str, Any]:
    """What ``diffnas train --dry-run`` reports for a language model: the retrain
    network's parameters (the tied embedding/decoder matrix counted once) and the corpus
    vocabulary that sizes it. Reads the corpus, builds the model, trains nothing."""
    corpus = load_corpus(cfg.data.name, cfg.data.root)
    model = lm_space(cfg, corpus).build_network(genotype, **cfg.retrain.network)
    return {"vocab": corpus.vocab_size, "params": count_lm_parameters(model)}


def train_lm(cfg: RunConfig, genotype: Genotype, run_dir: Path, resume: bool = False) -> None:
    """``diffnas train`` for a language model: retrain ``genotype``, print on rank 0."""
    result = run_lm_retrain(cfg, genotype, run_dir, resume=resume)
    if dp.is_main_process():
        print_lm_result(genotype, result)


def check_lm_section(cfg: RunConfig) -> None:
    """The ``lm`` section's settings (:class:`LmConfig`), for every run of this engine."""
    lm_config(cfg)


def check_lm_retrain(cfg: RunConfig) -> None:
    """Enough tokens for the retraining's batch sizes (2 per column at least) in every
    text a ``*_subset`` setting bounds (:func:`lm_texts`): ``retrain.train_subset``
    against ``retrain.batch_size``, ``data.test_subset`` against ``lm.eval_batch_size``
    and ``lm.test_batch_size``. (The whole corpus is checked once it is read:
    :func:`check_lm_batches`.)"""
    refuse_unfit_texts(lm_texts(cfg, search=False, retrain=True))
    _check_shares("retrain.batch_size", cfg.retrain.batch_size, least=1)


def _check_shares(key: str, batch_size: int, least: int) -> None:
    """Under torchrun each rank takes ``batch_size / world_size`` columns of a text: a
    batch that does not divide, or leaves a rank fewer than ``least`` columns, is refused
    when the config is read (rank 0 alone says so; before a run directory exists)."""
    world_size = dp.planned_world_size()
    if world_size == 1:
        return
    if batch_size % world_size:
        raise ConfigError(f"{key}={batch_size} does not divide by the {world_size} "
                          "data-parallel processes (each rank takes an equal share of the "
                          "text's columns); use a multiple of the number of processes")
    if batch_size // world_size < least:
        raise ConfigError(f"{key}={batch_size} over {world_size} processes leaves "
                          f"{batch_size // world_size} column per rank: the recurrent search "
                          f"cell normalises its nodes by batch statistics and needs at least "
                          f"{least} sequences per rank")


def check_lm_config(cfg: RunConfig, device: bool = True) -> None:
    """What the language-model search refuses that its config shows (at config loading,
    before a run directory exists): image-search settings, its batches and strategy, and
    growth epochs past the search."""
    refuse_image_search_settings(cfg)
    check_lm_search(cfg, retrain=cfg.retrain.enabled)
    check_growth(cfg)
    _check_shares("data.batch_size", cfg.data.batch_size, least=2)


ENGINE = register_engine(Engine(
    name="language_model", label="language-model (engine/lm.py)", a_run="a language-model run",
    data_kind="text", datasets=lambda: TEXT_DATASETS, search=run_lm, train=train_lm,
    run_search=run_lm_search, run_retrain=run_lm_retrain, summary=lm_network_summary,
    check_config=check_lm_section, check_search=check_lm_config,
    check_retrain=check_lm_retrain, metric=PERPLEXITY, unused_data=("download", "resolution"),
    unread_retrain=("lr_min", "auxiliary_weight", "drop_path", "cutout", "crop_padding",
                    "flip"),
    sections=("lm",), data_parallel=True))
