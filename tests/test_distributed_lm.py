"""Data-parallel language-model search and retraining (the darts_rnn space): 2 CPU
processes (gloo) against one process with the global batch.

Each rank takes half of the columns (independent streams) of the batchified texts. The
search cell normalises its nodes by batch statistics, so the distributed runs use
``distributed.sync_bn=true`` (the global batch's statistics). Dropout masks are drawn in
the global batch's shape from the window's seed on every rank and sliced to the rank's
columns, so runs with every dropout on match one process too (docs/distributed.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ranks import (
    assert_rank0_only,
    audited_env,
    join_ranks,
    load_rank,
    run_torchrun,
    save_rank,
    spawn_ranks,
)

from diffnas.config import load_config
from diffnas.data.text import Corpus, batchify
from diffnas.engine import distributed as dp
from diffnas.genotype import Genotype

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 12
SPACE = ("{name: darts_rnn, ninp: 8, nhid: 8, nodes: 2, dropout: 0, dropouth: 0, "
         "dropoutx: 0, dropouti: 0, dropoute: 0}")
# a large alpha learning rate makes the few steps visible
SEARCHES = {
    "darts1": "{name: darts, order: 1, a_optim: {lr: 0.03}}",
    "darts2": "{name: darts, order: 2, a_optim: {lr: 0.03}}",
    # double backward through the cell's global batch normalisation
    "darts2_exact": "{name: darts, order: 2, hessian: exact, a_optim: {lr: 0.03}}",
    # hard Gumbel samples: synchronised RNG (a low temperature: larger alpha gradients)
    "gdas": "{name: gdas, relaxation: {name: hard_gumbel, tau: 1.0, tau_min: 0.5}, "
            "a_optim: {lr: 0.03}}",
    # single-level: weights and alphas on the training columns alone (no arch stream)
    "snas": "{name: snas, a_optim: {lr: 0.03}}",
}
NET = "{ninp: 8, nhid: 8, dropout: 0, dropouth: 0, dropoutx: 0, dropouti: 0, dropoute: 0}"
# every dropout of the DARTS/AWD-LSTM recipe on, weight drop included
DROPOUTS = ("dropout: 0.3, dropouth: 0.2, dropoutx: 0.25, dropouti: 0.15, dropoute: 0.1, "
            "weight_drop: 0.2")
SPACE_DROPOUT = "{name: darts_rnn, ninp: 8, nhid: 8, nodes: 2, " + DROPOUTS + "}"
NET_DROPOUT = "{ninp: 8, nhid: 8, " + DROPOUTS + "}"


def tiny_corpus() -> Corpus:
    g = torch.Generator().manual_seed(0)

    def text(n: int) -> torch.Tensor:  # some structure: a token often follows its predecessor
        t = torch.randint(0, VOCAB, (n,), generator=g)
        follow = torch.rand(n, generator=g) < 0.5
        for i in range(1, n):
            if follow[i]:
                t[i] = (t[i - 1] + 1) % VOCAB
        return t

    return Corpus("ptb", [f"w{i}" for i in range(VOCAB)], text(160), text(96), text(64))


def overrides(strategy: str = SEARCHES["darts1"], sync_bn: bool = True, epochs: int = 1,
              batch: int = 4, dropout: bool = False) -> list[str]:
    """Global batch 4 (2 columns per rank), BPTT windows of about 8 tokens (variable)."""
    space, net = (SPACE_DROPOUT, NET_DROPOUT) if dropout else (SPACE, NET)
    return ["data.name=ptb", "data.train_subset=null", "data.test_subset=null",
            f"data.batch_size={batch}", "progress=false", f"search.epochs={epochs}",
            f"search.space={space}", f"search.strategy={strategy}",
            f"distributed.sync_bn={'true' if sync_bn else 'false'}",
            "retrain.epochs=2", f"retrain.batch_size={batch}", "retrain.lr=2.0",
            "retrain.momentum=0.0", "retrain.train_subset=null", f"retrain.network={net}",
            "lm={bptt: 8, max_seq_len_delta: 4, eval_batch_size: 2, test_batch_size: 2, "
            "beta: 0.001, alpha: 0.001}"]


def _alphas(res) -> dict[str, torch.Tensor]:
    return {g: a.detach().clone() for g, a in res.task.strategy.arch_params.as_dict().items()}


def _asgd_case(out: str) -> dict:
    """A retrain task switched to ASGD (forced), one epoch on it: the ASGD averages and
    the evaluation of the averaged weights."""
    from diffnas.engine.lm import LmConfig, LmTrainTask, lm_space

    cfg = load_config(None, overrides())
    corpus = tiny_corpus()
    env = dp.env()
    torch.manual_seed(0)
    model = lm_space(cfg, corpus).build_network(Genotype.load(f"{out}/genotype.json"),
                                                **cfg.retrain.network)
    train = batchify(corpus.train, 4)[:, 2 * env.rank : 2 * env.rank + 4 // env.world_size]
    lm = LmConfig(bptt=8, max_seq_len_delta=4, eval_batch_size=2, nonmono=2)
    task = LmTrainTask(model, train, batchify(corpus.valid, 2), cfg, lm, env.rank,
                       env.world_size)
    task.val_history = [0.1, 9.0, 9.0]  # the best is older than nonmono epochs: switch
    switched = task.end_epoch(0)["asgd"]
    for batch in task.batches(1):
        task.step(batch)
    ax = [task.optimizer.state[p]["ax"].clone() for p in model.parameters()]
    return {"switched": switched, "ax": ax, "valid": task.end_epoch(1)["valid_loss"]}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    join_ranks(rank, world, port)
    from diffnas.engine.lm import run_lm_retrain, run_lm_search

    corpus = tiny_corpus()
    try:
        found: dict = {"local_columns": {}}
        for name, strategy in SEARCHES.items():
            epochs = 2 if name == "darts1" else 1
            cfg = load_config(None, overrides(strategy, epochs=epochs))
            if name == "darts1":  # stopped after its first epoch (as if killed), resumed
                run_lm_search(cfg, f"{out}/runs/{name}", corpus=corpus, stop_after=1)
            res = run_lm_search(cfg, f"{out}/runs/{name}", resume=True, corpus=corpus)
            found[name] = _alphas(res)
            arch = res.task.arch
            found["local_columns"][name] = (res.task.train.shape[1],
                                            None if arch is None else arch.shape[1])
            if name == "darts1":
                found["columns"] = (res.task.train.clone(), res.task.arch.clone())
                found["genotype"] = res.genotype.to_json()
                found["retrain"] = run_lm_retrain(cfg, res.genotype, f"{out}/runs/{name}",
                                                  corpus=corpus)
        found["asgd"] = _asgd_case(f"{out}/runs/darts1/retrain")
        # every dropout on: each rank applies its columns' slice of one process's masks
        cfg = load_config(None, overrides(dropout=True))
        res = run_lm_search(cfg, f"{out}/runs/dropout", corpus=corpus)
        found["dropout"] = {"alphas": _alphas(res), "genotype": res.genotype.to_json(),
                            "retrain": run_lm_retrain(cfg, Genotype.from_json(found["genotype"]),
                                                      f"{out}/runs/dropout", corpus=corpus)}
        found["refused"] = {}
        for key in ("data.batch_size", "retrain.batch_size"):
            try:  # (refused when the config is read, before a run directory exists)
                cfg = load_config(None, [*overrides(), f"{key}=5"])
                if key == "data.batch_size":
                    run_lm_search(cfg, f"{out}/runs/refused", corpus=corpus)
                else:
                    run_lm_retrain(cfg, Genotype.from_json(found["genotype"]),
                                   f"{out}/runs/refused", corpus=corpus)
            except ValueError as exc:
                found["refused"][key] = str(exc)
        save_rank(found, out, rank)
        dp.shutdown(together=True)  # as a command ends (torch 2.4-2.6 can hang without it)
    finally:
        dp.shutdown()  # (after an error: not together, a peer may never reach the barrier)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("ddp_lm"))


def test_each_rank_holds_its_columns_of_the_batchified_text(spawned):
    corpus = tiny_corpus()
    train, arch = batchify(corpus.train, 4), batchify(corpus.valid, 4)
    for rank in (0, 1):
        got_train, got_arch = load_rank(spawned, rank)["columns"]
        cols = slice(2 * rank, 2 * rank + 2)
        assert torch.equal(got_train, train[:, cols]) and torch.equal(got_arch, arch[:, cols])


@pytest.mark.parametrize("name", list(SEARCHES))
def test_two_ranks_match_one_process_lm_search(spawned, tmp_path, name):
    """Global batch 4 split 2 + 2 columns over two ranks vs one process with batch 4."""
    from diffnas.engine.lm import run_lm_search

    cfg = load_config(None, overrides(SEARCHES[name], sync_bn=False,
                                      epochs=2 if name == "darts1" else 1))
    ref = run_lm_search(cfg, tmp_path, corpus=tiny_corpus())
    # gdas: rounding of the split batch reaches its alphas more (measured 3e-6 on torch 2.13,
    # 7.3e-5 on 2.3 and 2.6); still far below one alpha step (Adam, lr 0.03)
    tol = 5e-4 if name == "gdas" else 1e-5
    for rank in (0, 1):
        got = load_rank(spawned, rank)[name]
        # each rank learned on 2 of the 4 columns, and together they match one process
        assert load_rank(spawned, rank)["local_columns"][name] == (
            (2, None) if name == "snas" else (2, 2))
        for g, a in _alphas(ref).items():
            # alphas start at N(0, 1e-3): they moved, so matching them proves something
            assert a.abs().max().item() > 1e-2, f"{name}: alphas barely moved"
            err = (got[g] - a).abs().max().item()
            assert err < tol, f"{name} rank {rank} group {g}: max |alpha diff| {err:.2e}"
    if name == "darts1":  # the 2-rank run was stopped after epoch 1 and resumed
        assert Genotype.from_json(load_rank(spawned, 0)["genotype"]) == ref.genotype
        hist = [json.loads(ln) for ln in
                (spawned / "runs/darts1/search/metrics.jsonl").read_text().splitlines()]
        assert len(hist) == 2
        for h, want in zip(hist, ref.history, strict=True):
            for k in ("loss", "valid_loss"):  # train loss: mean over ranks; valid: rank 0
                assert abs(h[k] - want[k]) < 1e-5, (k, h[k], want[k])


def test_two_ranks_match_one_process_lm_retrain(spawned, tmp_path):
    from diffnas.engine.lm import run_lm_retrain

    cfg = load_config(None, overrides(sync_bn=False, epochs=2))
    genotype = Genotype.from_json(load_rank(spawned, 0)["genotype"])
    ref = run_lm_retrain(cfg, genotype, tmp_path, corpus=tiny_corpus())
    got = torch.load(spawned / "runs/darts1/retrain/model.pt")
    want = torch.load(tmp_path / "retrain/model.pt")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=k)
    for rank in (0, 1):
        res = load_rank(spawned, rank)["retrain"]
        for h, w in zip(res["history"], ref["history"], strict=True):
            for k in ("loss", "valid_loss"):
                assert abs(h[k] - w[k]) < 1e-5, (rank, k, h[k], w[k])
        assert abs(res["test_ppl"] - ref["test_ppl"]) < 1e-4 * ref["test_ppl"]
        assert abs(res["valid_ppl"] - ref["valid_ppl"]) < 1e-4 * ref["valid_ppl"]


def test_asgd_stays_consistent_over_ranks(spawned, tmp_path):
    (tmp_path / "genotype.json").write_bytes(
        (spawned / "runs/darts1/retrain/genotype.json").read_bytes())
    ref = _asgd_case(str(tmp_path))
    assert ref["switched"] == 1.0
    for rank in (0, 1):
        got = load_rank(spawned, rank)["asgd"]
        assert got["switched"] == 1.0
        for a, b in zip(got["ax"], ref["ax"], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert abs(got["valid"] - ref["valid"]) < 1e-5


def test_rank_masks_are_the_column_slices_of_one_process_masks():
    """The mask helper: a rank's masks with a batch dimension are its block of the global
    batch's masks, the others (embedding, weight drop) the global ones; one process draws
    what a plain ``bernoulli_`` from the seed draws (unchanged single-process results)."""
    from diffnas.supernet.rnn import Masks

    # (shape with 2 columns per rank, batch dimension): in the order the LM draws them
    shapes = [((7, 1), None), ((1, 2, 3), 1), ((2, 3), 0), ((3, 6), None), ((1, 2, 3), 1)]

    def widen(shape: tuple[int, ...], d: int | None, ranks: int) -> tuple[int, ...]:
        return shape if d is None else (*shape[:d], shape[d] * ranks, *shape[d + 1 :])

    def draws(rank: int, ranks: int, blocks: int = 1) -> list[torch.Tensor]:
        m = Masks(True, 5, columns=(rank, ranks))
        return [m(widen(shape, d, blocks), 0.4, torch.empty(0), d) for shape, d in shapes]

    one = draws(0, 1, blocks=3)  # one process, global batch 6
    g = torch.Generator().manual_seed(5)
    for (shape, d), mask in zip(shapes, one, strict=True):
        assert torch.equal(mask, torch.empty(widen(shape, d, 3)).bernoulli_(0.6, generator=g)
                           / 0.6)
    per_rank = [draws(r, 3) for r in range(3)]  # 3 ranks of 2 columns
    for k, (_, d) in enumerate(shapes):
        got = [masks[k] for masks in per_rank]
        if d is None:
            assert all(torch.equal(m, one[k]) for m in got)
        else:
            assert torch.equal(torch.cat(got, d), one[k])
    with pytest.raises(ValueError, match="columns must be"):
        Masks(True, 5, columns=(2, 2))


def test_rank_columns_reproduce_the_global_batch_forward_with_dropout():
    """The retrain network, every dropout on, training mode, float64: three ranks' blocks of
    2 columns (``LmInput.columns``) give the global batch's logits, their slices."""
    from diffnas.arch import ArchParams
    from diffnas.engine.lm import lm_space
    from diffnas.genotype.discretize import discretize
    from diffnas.supernet.rnn import LmInput

    cfg = load_config(None, overrides(dropout=True))
    space = lm_space(cfg, tiny_corpus())
    torch.manual_seed(0)
    genotype = discretize(ArchParams(space).as_dict(), space)
    net = space.build_network(genotype, **cfg.retrain.network).double().train()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (5, 6), generator=g)
    h = 0.1 * torch.randn(6, 8, generator=g, dtype=torch.float64)
    want = net(LmInput(x, h, 123))
    assert not torch.allclose(want.logits, net.eval()(LmInput(x, h, 123)).logits)
    net.train()
    for r in range(3):
        cols = slice(2 * r, 2 * r + 2)
        got = net(LmInput(x[:, cols], h[cols], 123, (r, 3)))
        torch.testing.assert_close(got.logits, want.logits[:, cols], atol=1e-12, rtol=0)
        torch.testing.assert_close(got.hidden, want.hidden[cols], atol=1e-12, rtol=0)


def test_two_ranks_match_one_process_with_dropout(spawned, tmp_path):
    """Every dropout on (sync_bn for the search): DARTS first order and the retraining of
    two ranks match one process with the global batch, the dropout masks included."""
    from diffnas.engine.lm import run_lm_retrain, run_lm_search

    cfg = load_config(None, overrides(dropout=True, sync_bn=False))
    ref = run_lm_search(cfg, tmp_path / "search", corpus=tiny_corpus())
    plain = run_lm_search(load_config(None, overrides(sync_bn=False)), tmp_path / "plain",
                          corpus=tiny_corpus())
    genotype = Genotype.from_json(load_rank(spawned, 0)["genotype"])
    ref_retrain = run_lm_retrain(cfg, genotype, tmp_path / "retrain", corpus=tiny_corpus())
    for rank in (0, 1):
        got = load_rank(spawned, rank)["dropout"]
        assert Genotype.from_json(got["genotype"]) == ref.genotype
        for g, a in _alphas(ref).items():
            # the masks matter: dropout moved the alphas away from the dropout-free run
            assert (a - _alphas(plain)[g]).abs().max().item() > 1e-3
            err = (got["alphas"][g] - a).abs().max().item()
            assert err < 1e-5, f"rank {rank} group {g}: max |alpha diff| {err:.2e}"
        res = got["retrain"]
        for h, w in zip(res["history"], ref_retrain["history"], strict=True):
            for k in ("loss", "valid_loss"):
                assert abs(h[k] - w[k]) < 1e-5, (rank, k, h[k], w[k])
        assert abs(res["test_ppl"] - ref_retrain["test_ppl"]) < 1e-5 * ref_retrain["test_ppl"]
    got = torch.load(spawned / "runs/dropout/retrain/model.pt")
    want = torch.load(tmp_path / "retrain/retrain/model.pt")
    without = torch.load(spawned / "runs/darts1/retrain/model.pt")  # same genotype, no dropout
    assert got.keys() == want.keys()
    assert any(not torch.allclose(want[k], without[k], atol=1e-3) for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=k)


def test_batch_not_divisible_by_the_world_size_is_refused(spawned):
    for rank in (0, 1):  # search and retraining, under two ranks, on every rank
        refused = load_rank(spawned, rank)["refused"]
        assert set(refused) == {"data.batch_size", "retrain.batch_size"}
        for key, msg in refused.items():
            assert f"{key}=5 does not divide by the 2 data-parallel processes" in msg, msg
    from diffnas.engine.lm import build_lm_search

    with pytest.raises(ValueError, match="data.batch_size 5 does not divide by the 2 data"):
        build_lm_search(load_config(None, overrides(batch=5)), tiny_corpus(), world_size=2)
    with pytest.raises(ValueError, match="leaves 1 column per rank"):
        build_lm_search(load_config(None, overrides(batch=2)), tiny_corpus(), world_size=2)


# --- torchrun end to end: `diffnas search` on a darts_rnn config writes the run dir once ----


def _write_ptb(d: Path) -> Path:
    c = tiny_corpus()
    for split in ("train", "valid", "test"):
        ids = getattr(c, split).tolist()
        lines = [" ".join(f"w{i}" for i in ids[j : j + 8]) for j in range(0, len(ids), 8)]
        (d / f"ptb.{split}.txt").write_text("".join(f" {ln} \n" for ln in lines))
    return d


def test_torchrun_lm_search_and_retrain_rank0_writes(tmp_path):
    runs = tmp_path / "runs"
    env = audited_env(tmp_path, runs)
    args = ["--config", str(ROOT / "configs/darts_rnn_ptb.yaml"),
            f"data.root={_write_ptb(tmp_path)}", f"out_dir={runs}", "name=lm",
            *[o for o in overrides(sync_bn=True) if not o.startswith("data.name")],
            "retrain.epochs=1"]
    proc = run_torchrun(args, env)  # 600 s: slow on a loaded machine
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert proc.stdout.count("test perplexity") == 1  # rank 0 prints
    run = runs / "lm"
    assert (run / "search/DONE").exists()
    result = json.loads((run / "retrain/result.json").read_text())
    assert result["epochs_done"] == 1 and result["test_ppl"] > 1
    written = assert_rank0_only(tmp_path / "audit")  # rank 1 neither read nor wrote there
    assert {"config.yaml", "log.txt", "checkpoint.pt", "metrics.jsonl", "genotype.json",
            "model.pt", "result.json"} <= written


def test_lm_batches_torchrun_cannot_split_are_refused_when_the_config_is_read(monkeypatch):
    """They were found when the search or retraining was built, on every rank, after the
    run directory was written (a new run of the same name was then refused, and --resume
    cannot change a batch); the image engine refused them from the config."""
    from diffnas.config import ConfigError

    for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(var, value)  # torchrun's environment, no group joined
    load_config(None, overrides())
    for extra, problem in (("data.batch_size=5", "data.batch_size=5 does not divide by the 2"),
                           ("data.batch_size=2", "data.batch_size=2 over 2 processes leaves 1 "
                                                 "column per rank"),
                           ("retrain.batch_size=5", "retrain.batch_size=5 does not divide")):
        with pytest.raises(ConfigError, match=problem):
            load_config(None, [*overrides(), extra])
