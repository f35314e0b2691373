"""Data-parallel search and retraining: 2 CPU processes (gloo) against one process.

The search supernet's BatchNorm normalises by the batch (no running statistics), so the
two ranks only compute what one process computes on the global batch when BatchNorm
sees the global batch too: the distributed runs here use ``distributed.sync_bn=true``
(:class:`~diffnas.engine.distributed.SyncBatchNorm`), the one-process references plain
BatchNorm, everything in float32.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from ranks import (
    assert_rank0_only,
    audited_env,
    join_ranks,
    load_rank,
    save_rank,
    spawn_ranks,
    torchrun_search,
)
from torch import nn

from diffnas.config import load_config
from diffnas.engine import distributed as dp
from diffnas.genotype import Genotype
from diffnas.genotype.published import published_genotype

SPACE = ("{name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1, "
         "ops: [none, max_pool_3x3, skip_connect, sep_conv_3x3]}")
# name -> strategy section; a large alpha learning rate makes the few steps visible
SEARCHES = {
    "darts1": "{name: darts, order: 1, a_optim: {lr: 0.03}}",
    "darts2": "{name: darts, order: 2, a_optim: {lr: 0.03}}",
    # double backward through SyncBatchNorm's all-reduce
    "darts2_exact": "{name: darts, order: 2, hessian: exact, a_optim: {lr: 0.03}}",
    # the reused virtual-step pass gives this rank's share of grad_alpha L_train(w); a
    # wider radius than the paper's: a forward difference turns rounding differences (split
    # vs whole batch) into 1/eps-sized ones, and Adam's first steps turn near-zero gradient
    # components into +-lr moves (at r=0.01 the match held at 2 threads, not at 1)
    "darts2_forward": "{name: darts, order: 2, hessian: fd_forward, fd_radius: 0.1, "
                      "a_optim: {lr: 0.03}}",
    "single_level": "{name: single_level, a_optim: {lr: 0.03}}",
    "gdas": "{name: gdas, a_optim: {lr: 0.03}}",  # hard Gumbel samples: same on every rank
    "snas": "{name: snas, a_optim: {lr: 0.03}}",  # Gumbel-softmax, single level
    # Neumann-series Hessian products, each averaged (double backward through SyncBN)
    "implicit": "{name: implicit, K: 3, a_optim: {lr: 0.03}}",
    # losses (and the unrolled weight gradients) averaged before they are compared
    "zero_order_mgs": "{name: zero_order, estimator: mgs, unroll: true, a_optim: {lr: 0.03}}",
    "zero_order_gld": "{name: zero_order, estimator: gld, samples: 3}",
    "zero_order_rs": "{name: zero_order, estimator: rs, samples: 3}",
    "mean_shift": "{name: mean_shift, samples: 3, a_optim: {lr: 0.03}}",
    # one-shot epoch, then sub-supernets; the best is chosen by averaged validation losses
    "few_shot": "{name: few_shot, split_epoch: 1, a_optim: {lr: 0.03}}",
    "random_labels": "{name: random_labels, population: 4, iterations: 2, parents: 2}",
}
EPOCHS = {"few_shot": 2}  # searches that need more than one epoch
RETRAIN = ["retrain.epochs=1", "retrain.batch_size=8", "retrain.train_subset=32",
           "retrain.auxiliary_weight=0", "retrain.drop_path=0", "retrain.cutout=0",
           "retrain.crop_padding=0", "retrain.flip=false", "retrain.network={C: 4, layers: 3}"]


def overrides(strategy: str, sync_bn: bool, epochs: int = 1, retrain: bool = False) -> list[str]:
    """digits (8x8), 48 images: 3 search steps per epoch at a global batch of 8."""
    return ["data.name=digits", "data.train_subset=48", "data.test_subset=32",
            "data.batch_size=8", "progress=false", f"search.epochs={epochs}",
            f"search.space={SPACE}", f"search.strategy={strategy}",
            f"distributed.sync_bn={'true' if sync_bn else 'false'}",
            f"retrain.enabled={'true' if retrain else 'false'}", *RETRAIN]


def search_overrides(name: str, sync_bn: bool) -> list[str]:
    """darts1 is also the torchrun run of the kill/resume test (2 epochs, then retrain)."""
    if name == "darts1":
        return overrides(SEARCHES[name], sync_bn, epochs=2, retrain=True)
    return overrides(SEARCHES[name], sync_bn, epochs=EPOCHS.get(name, 1))



# --- 2 processes spawned once; they save what they computed, the tests compare it ----------
def _bn_case(rank: int, world: int) -> dict:
    """SyncBatchNorm on this rank's half of a float64 batch: outputs, input gradients,
    the parameter gradients summed over ranks, running statistics."""
    g = torch.Generator().manual_seed(0)
    x_full = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 1
    w_full = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    half = slice(rank * 8 // world, (rank + 1) * 8 // world)
    bn = dp.convert_sync_batchnorm(nn.BatchNorm2d(3).double())
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    x = x_full[half].clone().requires_grad_(True)
    out = bn(x)
    (out * w_full[half]).sum().backward()
    pgrads = [bn.weight.grad.clone(), bn.bias.grad.clone()]
    torch.distributed.all_reduce(pgrads[0])
    torch.distributed.all_reduce(pgrads[1])
    return {"out": out.detach(), "x_grad": x.grad, "weight_grad": pgrads[0],
            "bias_grad": pgrads[1], "running_mean": bn.running_mean.clone(),
            "running_var": bn.running_var.clone(), "is_sync": isinstance(bn, dp.SyncBatchNorm)}


def _fetch_case(rank: int, out: str) -> dict:
    """dp.fetch_in_turn on one node (local ranks 0, 1: one shared disk), then as if each
    rank were a node of its own (local rank 0 each, a disk each): who fetched, and what
    each found when it did."""
    def fetcher(path: Path, seen: list) -> Callable[[], None]:
        def fetch() -> None:
            seen.append({"mine": path.exists(), "node0": (Path(out) / "node0.txt").exists()})
            if not path.exists():
                path.write_text(str(rank))
        return fetch

    shared: list = []
    dp.fetch_in_turn(fetcher(Path(out) / "shared.txt", shared))
    content = (Path(out) / "shared.txt").read_text()
    own: list = []
    os.environ["LOCAL_RANK"] = "0"
    try:
        dp.fetch_in_turn(fetcher(Path(out) / f"node{rank}.txt", own))
    finally:
        os.environ["LOCAL_RANK"] = str(rank)
    def failing() -> None:
        raise ConnectionError("mirror down")

    try:  # rank 0's turn fails: every rank hears it at once, none waits out a timeout
        dp.fetch_in_turn(failing)
        failed = ""
    except Exception as exc:
        failed = f"{type(exc).__name__}: {exc}"
    return {"shared": shared, "content": content, "own": own, "failed": failed}


def _ddp_layout_case() -> dict:
    """One DDP step of an NHWC retraining network (3x32x32): which weights' incoming
    gradients differ from the weights in the order of their non-size-1 dimensions (DDP
    copies those into its buckets), and whether torch warned about the strides."""
    import warnings

    from diffnas.engine.retrain import build_network
    from diffnas.spaces import DataShape

    cfg = load_config(None, ["retrain.network={C: 4, layers: 3}"], search=False)
    _, model = build_network(cfg, published_genotype("DARTS_V2"), DataShape(3, 32, 10))
    seen: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        ddp = dp.wrap_ddp(model, torch.device("cpu"))
        for name, p in ddp.module.named_parameters():
            p.register_hook(lambda g, name=name: seen.__setitem__(name, g.stride()))
        logits, aux = ddp(torch.randn(2, 3, 32, 32))  # training: with the auxiliary head's
        (logits.sum() + aux.sum()).backward()

    def order(shape, strides) -> tuple:
        return tuple(s for n, s in zip(shape, strides) if n > 1)

    return {"stepped": len(seen), "warned": [str(w.message)[:60] for w in caught],
            "mismatched": [name for name, p in ddp.module.named_parameters()
                           if order(p.shape, p.stride()) != order(p.shape, seen[name])]}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    join_ranks(rank, world, port, audit_out=out)
    from diffnas.engine.retrain import run_retrain
    from diffnas.engine.search import run_search

    try:
        found: dict = {"bn": _bn_case(rank, world)}
        torch.manual_seed(100 + rank)  # different streams until synchronised
        dp.sync_rng()
        found["rng"] = torch.rand(5)
        same = [torch.ones(3)]
        dp.assert_replicated({"same": same})
        try:
            dp.assert_replicated({"drifted": [torch.ones(3) + 1e-7 * rank]})
            found["drift_caught"] = False
        except RuntimeError:
            found["drift_caught"] = True
        try:  # identical NaN weights: a diverged run, not a sync problem
            dp.assert_replicated({"diverged": [torch.tensor([1.0, float("nan")])]})
            found["nan_named"] = False
        except FloatingPointError:
            found["nan_named"] = True
        found["fetch"] = _fetch_case(rank, out)
        found["ddp_layout"] = _ddp_layout_case()  # first: torch warns once per process
        for name in SEARCHES:
            cfg = load_config(None, search_overrides(name, sync_bn=True))
            res = run_search(cfg, f"{out}/runs/{name}")
            found[name] = {g: a.detach().clone()
                           for g, a in res.task.strategy.arch_params.as_dict().items()}
            if name == "darts1":  # what `diffnas search` does next
                found["genotype"] = res.genotype.to_json()
                found["retrain"] = run_retrain(cfg, res.genotype, f"{out}/runs/{name}")
                other = published_genotype("DARTS_V2")  # not what this search found
                try:  # rank 0 refuses; every rank must hear it, not wait in a collective
                    run_retrain(cfg, other, f"{out}/runs/{name}", resume=True)
                    found["pin_refused"] = ""
                except ValueError as exc:
                    found["pin_refused"] = str(exc)
        # after the searches, whose RNG streams the tests compare with one process
        plain = load_config(None, [*search_overrides("darts1", sync_bn=False),
                                   "retrain.epochs=2"])
        found["retrain_plain"] = run_retrain(plain, Genotype.from_json(found["genotype"]),
                                             f"{out}/runs/plain")
        save_rank(found, out, rank)
        dp.shutdown(together=True)  # as a command ends (torch 2.4-2.6 can hang without it)
    finally:
        dp.shutdown()  # (after an error: not together, a peer may never reach the barrier)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("ddp"))


def test_sync_batchnorm_matches_batchnorm_on_global_batch(spawned):
    r0, r1 = load_rank(spawned, 0)["bn"], load_rank(spawned, 1)["bn"]
    assert r0["is_sync"]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    w = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    out = bn(x)
    (out * w).sum().backward()
    torch.testing.assert_close(torch.cat([r0["out"], r1["out"]]), out.detach())
    torch.testing.assert_close(torch.cat([r0["x_grad"], r1["x_grad"]]), x.grad)
    torch.testing.assert_close(r0["weight_grad"], bn.weight.grad)
    torch.testing.assert_close(r0["bias_grad"], bn.bias.grad)
    for k in ("running_mean", "running_var"):
        torch.testing.assert_close(r0[k], getattr(bn, k))
        torch.testing.assert_close(r1[k], getattr(bn, k))
    # per-rank BatchNorm would have differed: the halves' statistics are not the global ones
    assert not torch.allclose(r0["out"], nn.functional.batch_norm(
        x.detach()[:4], None, None, bn.weight.detach(), bn.bias.detach(), training=True))


def test_every_rank_hears_that_another_genotype_is_refused(spawned):
    for rank in (0, 1):
        assert "another genotype" in load_rank(spawned, rank)["pin_refused"]


def test_ranks_share_rng_and_drift_is_detected(spawned):
    r0, r1 = load_rank(spawned, 0), load_rank(spawned, 1)
    torch.manual_seed(100)
    assert torch.equal(r0["rng"], torch.rand(5)) and torch.equal(r1["rng"], r0["rng"])
    assert r0["drift_caught"] and r1["drift_caught"]
    assert r0["nan_named"] and r1["nan_named"]


def test_downloads_happen_one_process_at_a_time(spawned):
    """data.download under torchrun: rank 0 fetches while the others wait; another node's
    local rank 0 fetches to its own disk after it; a rank sharing rank 0's disk never
    fetches, and finds the file complete."""
    r0, r1 = load_rank(spawned, 0)["fetch"], load_rank(spawned, 1)["fetch"]
    assert r0["shared"] == [{"mine": False, "node0": False}] and r1["shared"] == []
    assert r0["content"] == r1["content"] == "0"
    assert r0["own"] == [{"mine": False, "node0": False}]
    assert r1["own"] == [{"mine": False, "node0": True}]  # rank 0's turn had ended
    assert r0["failed"] == "ConnectionError: mirror down"
    assert r1["failed"] == ("RuntimeError: rank 0 failed to fetch the data: "
                            "ConnectionError: mirror down")


@pytest.mark.parametrize("name", list(SEARCHES))
def test_two_ranks_match_one_process(spawned, tmp_path, name):
    """Global batch 8 split 4 + 4 over two ranks vs one process with batch 8."""
    from diffnas.engine.search import run_search

    # two threads, whatever this machine's default: the reduction over the batch then splits
    # it 4 + 4 as the ranks do. Second-order finite differences and Adam on alpha amplify
    # float reduction-order differences to ~3e-3 after an epoch (1 thread vs 2 in one
    # process measured 2.98e-3 for darts2), far over the tolerance below.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref = run_search(load_config(None, search_overrides(name, sync_bn=False)), tmp_path)
    finally:
        torch.set_num_threads(threads)
    ref_alpha = ref.task.strategy.arch_params.as_dict()
    for rank in (0, 1):
        got = load_rank(spawned, rank)[name]
        for g, a in ref_alpha.items():
            # alphas start at N(0, 1e-3): they moved, so matching them proves something
            assert a.abs().max().item() > 1e-2, f"{name}: alphas barely moved"
            err = (got[g] - a.detach()).abs().max().item()
            assert err < 1e-5, f"{name} rank {rank} group {g}: max |alpha diff| {err:.2e}"
    if name == "darts1":
        assert Genotype.from_json(load_rank(spawned, 0)["genotype"]) == ref.genotype


def test_ddp_retrain_matches_one_process(spawned, tmp_path):
    from diffnas.engine.retrain import run_retrain

    cfg = load_config(None, search_overrides("darts1", sync_bn=False))
    genotype = Genotype.from_json(load_rank(spawned, 0)["genotype"])
    ref = run_retrain(cfg, genotype, tmp_path)
    got = torch.load(spawned / "runs" / "darts1" / "retrain" / "model.pt")
    want = torch.load(tmp_path / "retrain" / "model.pt")
    assert got.keys() == want.keys()  # saved without DDP's "module." prefix
    for k in want:
        if want[k].is_floating_point():
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=k)
    for rank in (0, 1):
        res = load_rank(spawned, rank)["retrain"]
        assert abs(res["history"][0]["loss"] - ref["history"][0]["loss"]) < 1e-5


def test_ddp_gets_the_weights_in_the_layout_of_their_gradients(spawned):
    """An NHWC network's weights were NCHW under DDP: the stem's gradient was copied into
    its bucket each step, and every rank printed torch's "Grad strides" warning."""
    for rank in (0, 1):
        found = load_rank(spawned, rank)["ddp_layout"]
        assert found["stepped"] > 10 and found["mismatched"] == []
        assert not [w for w in found["warned"] if "Grad strides" in w], found["warned"]


def test_every_rank_reports_the_same_test_numbers_without_sync_bn(spawned):
    """Without sync_bn each rank's BN statistics come from its own batches; evaluation
    uses rank 0's (the saved model's), so every rank reports the same numbers."""
    a, b = (load_rank(spawned, r)["retrain_plain"] for r in (0, 1))
    assert len(a["history"]) == 2
    for key in ("test_acc", "test_loss"):
        assert [h[key] for h in a["history"]] == [h[key] for h in b["history"]], key
        assert a[key] == b[key], key


def test_strategy_without_data_parallel_support_is_refused(monkeypatch):
    from diffnas.data import ImageData
    from diffnas.engine.search import build_search
    from diffnas.strategies.implicit import ImplicitStrategy

    # every built-in strategy runs data parallel; one that has not said so is refused
    monkeypatch.setattr(ImplicitStrategy, "data_parallel", False)
    cfg = load_config(None, overrides("{name: implicit}", sync_bn=False))
    data = ImageData("toy", torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,)),
                     torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,)), 3)
    with pytest.raises(ValueError, match="does not run data parallel"):
        build_search(cfg, data, rank=0, world_size=2)



def test_a_strategy_without_data_parallel_is_refused_from_the_config(monkeypatch):
    """Refused where rank 0 reads the config (cli: before the run directory)."""
    from diffnas.config import ConfigError
    from diffnas.strategies.implicit import ImplicitStrategy

    monkeypatch.setattr(ImplicitStrategy, "data_parallel", False)
    cfg = overrides("{name: implicit}", sync_bn=False)
    load_config(None, cfg)  # one process: fine
    _as_rank_of(monkeypatch, 2)
    with pytest.raises(ConfigError, match="strategy 'implicit' does not run data parallel"):
        load_config(None, cfg)


# --- torchrun end to end: kill, resume, and who writes the run directory ---------------------


def _torchrun(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(torchrun_search(args), env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert rc == 0, log.read_text()[-3000:]


def test_only_rank0_writes_the_run_directory(spawned):
    written = assert_rank0_only(spawned / "audit")
    assert {"checkpoint.pt", "metrics.jsonl", "genotype.json", "model.pt"} <= written


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (read from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _wait_unlocked(lock: Path, timeout: float = 60.0) -> None:
    """Until no process holds ``lock``'s flock (a SIGKILLed process frees it when the
    kernel has ended it, which under load may be after its launcher was reaped)."""
    import fcntl

    deadline = time.monotonic() + timeout
    with lock.open("a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{lock} still held {timeout:.0f} s after the kill") from None
                time.sleep(0.05)
            else:
                fcntl.flock(f, fcntl.LOCK_UN)
                return


def test_torchrun_killed_run_resumes_to_the_uninterrupted_result(spawned, tmp_path):
    """`torchrun -m diffnas search` killed (SIGKILL to launcher and workers) after its first
    checkpoint, then resumed, ends where the uninterrupted 2-process run ended."""
    runs = tmp_path / "runs"
    env = audited_env(tmp_path, runs)
    args = [*search_overrides("darts1", sync_bn=True), f"out_dir={runs}", "name=killed"]
    killed = _torchrun(args, env, tmp_path / "killed.log")
    ckpt = runs / "killed" / "search" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = _children(killed.pid)  # torchrun starts each in a session of its own
    os.killpg(killed.pid, signal.SIGKILL)
    for pid in workers:
        os.killpg(pid, signal.SIGKILL)
    killed.wait()
    _wait_unlocked(runs / "killed" / ".lock")  # the killed workers may take a moment to end
    assert ckpt.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    assert not (runs / "killed" / "search" / "DONE").exists(), "killed too late to test resume"
    resumed = _torchrun(["--resume", str(runs / "killed")], env, tmp_path / "resumed.log")
    _finish(resumed, tmp_path / "resumed.log")

    a, b = spawned / "runs" / "darts1", runs / "killed"
    assert Genotype.load(b / "search" / "genotype.json") == Genotype.load(
        a / "search" / "genotype.json")
    alphas = (a / "search" / "alphas.jsonl").read_text()
    assert (b / "search" / "alphas.jsonl").read_text() == alphas  # bitwise, every epoch
    assert len(alphas.splitlines()) == 2
    ra, rb = (json.loads((d / "retrain" / "result.json").read_text()) for d in (a, b))
    assert ra["test_loss"] == rb["test_loss"]  # DDP retraining after the resumed search
    written = assert_rank0_only(tmp_path / "audit")
    assert {"config.yaml", "log.txt", "checkpoint.pt", "result.json"} <= written


def _as_rank_of(monkeypatch, world: int) -> None:
    """The environment torchrun gives a process of ``world`` (no group joined)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")


def test_settings_torchrun_cannot_split_are_refused_before_a_run_directory(
        monkeypatch, tmp_path, capsys):
    """Under torchrun with 2 processes: batches that do not halve (the retrain one used
    to fail after the whole search), one GPU named for every process, and --seeds (each
    process would run every seed) are refused from the config, naming the setting."""
    from diffnas.cli import main
    from diffnas.config import ConfigError, check_device

    _as_rank_of(monkeypatch, 2)
    base = search_overrides("darts1", sync_bn=False)
    assert load_config(None, base).data.batch_size % 2 == 0
    with pytest.raises(ConfigError, match=r"data.batch_size=9 does not divide by the 2 proc"):
        load_config(None, [*base, "data.batch_size=9"])
    with pytest.raises(ConfigError, match=r"retrain.batch_size=7 does not divide by the 2"):
        load_config(None, [*base, "retrain.batch_size=7"])
    with pytest.raises(ConfigError, match=r"retrain.batch_size=7 does not divide"):
        load_config(None, [*base, "retrain.batch_size=7", "retrain.enabled=false"],
                    search=False)  # diffnas train retrains anyway
    load_config(None, [*base, "retrain.batch_size=7", "retrain.enabled=false"])
    with pytest.raises(ConfigError, match="'cuda:0' would put all 2 processes on one GPU"):
        check_device("cuda:0")
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--seeds", "0,1", *base]) == 2
    assert "not under torchrun with 2 processes" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    _as_rank_of(monkeypatch, 1)
    load_config(None, [*base, "data.batch_size=9", "retrain.batch_size=7"])


def test_an_engine_that_is_not_data_parallel_is_refused_under_torchrun(monkeypatch):
    """Under torchrun with 2 processes, the graph engine and a plugin engine (the worked
    tabular one) are refused by their Engine's ``data_parallel`` before a run directory
    exists (every rank would repeat the whole run); image and language-model runs are not.
    One process (WORLD_SIZE=1) takes them all."""
    from diffnas.config import ConfigError

    tabular = Path(__file__).resolve().parents[1] / "docs/examples/plugins/my_engine.py"
    runs = {"graph": ["search.space.name=gnn", "data.name=karate"],
            "tabular (my_engine.py)": [f"plugins=[{tabular}]", "search.space.name=mlp_cell",
                                       "data.name=wine"]}
    _as_rank_of(monkeypatch, 2)
    for label, overrides in runs.items():
        with pytest.raises(ConfigError, match=re.escape(
                f"torchrun: the {label}")) as caught:
            load_config(None, overrides)
        assert "engine runs in one process" in str(caught.value)
    load_config(None, search_overrides("darts1", sync_bn=False))
    load_config(None, ["search.space.name=darts_rnn", "data.name=ptb"])
    _as_rank_of(monkeypatch, 1)
    for overrides in runs.values():
        load_config(None, overrides)


def test_a_config_error_is_printed_by_rank_0_alone(monkeypatch, capsys):
    """Under torchrun every rank read the config and printed the same refusal (two on one
    line at times), burying it above torchrun's traceback; other errors name their rank.
    RANK alone (a pod, a shell) is no torchrun: printed as ever."""
    import diffnas.engine.distributed as dist
    from diffnas.cli import main

    argv = ["bench", "nb201", "--strategy", "rea", "--budget", "10", "--table", "t.csv",
            "--json", "o.json", "--set", "rea.population=abc"]  # a ConfigError, no group
    monkeypatch.setenv("RANK", "1")
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("diffnas: error: ")
    monkeypatch.setattr(dist, "launched_by_torchrun", lambda: True)
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("diffnas: error: ") if rank == "0" else err == ""
    assert main(["export", "/no/such/run", "--format", "torchscript"]) == 2
    assert capsys.readouterr().err.startswith("diffnas (rank 1): error: ")
