"""Rules of the data-parallel helpers (``engine/distributed.py``) that a mutation audit
could break unseen by the other data-parallel tests: one process (no group) makes every
collective an identity and SyncBatchNorm plain BatchNorm; which device a rank gets and
when it is refused; which errors leave the group together; what converting BatchNorm
keeps; that the wrapper for writing callbacks passes hooks their arguments and closes
everywhere; that language-model batches are checked with the right least share. Two gloo
ranks then check the rules a single rank cannot show: an explicit ``src`` of the
broadcasts, metrics with keys in another order and float64 precision, the inputs of a
mean left untouched, a permutation or one rank's NaN caught by ``assert_replicated`` and
the drifted group named, ``main_process_result`` computing on rank 0 alone, a failing
download of a later turn, SyncBatchNorm's eps and momentum and the gradient of
``global_batch_norm``. Each rule is replayed by hand on a tiny float64 example."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ranks import join_ranks, load_rank, save_rank, spawn_ranks
from torch import nn

from diffnas.engine import distributed as dp
from diffnas.engine.loop import Callback


# --- one process, no group: every collective is an identity ---------------------------------
def test_without_a_group_collectives_are_identities_and_sync_bn_is_batchnorm():
    assert not dp.is_distributed()
    assert (dp.get_rank(), dp.get_world_size(), dp.env()) == (0, 1, dp.DistEnv())
    a, b = torch.randn(3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    out = dp.all_reduce_mean([a, None, b])
    assert out[0] is a and out[1] is None and out[2] is b
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    p.grad = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    dp.average_grads_([p])
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    metrics = {"loss": 1.0 / 3.0}
    assert dp.all_reduce_metrics(metrics) == {"loss": 1.0 / 3.0}
    t = torch.ones(2)
    dp.broadcast_([t], src=0)
    assert torch.equal(t, torch.ones(2))
    torch.manual_seed(3)
    dp.sync_rng()
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    dp.sync_rng()
    assert torch.equal(torch.rand(4), want)
    dp.assert_replicated({"w": [torch.tensor([float("nan")])]})  # nothing to compare with
    assert dp.sum_over_ranks(t) is t
    assert dp.broadcast_object("x") == "x"
    dp.barrier()
    dp.shutdown(together=True)  # nothing to leave


@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_without_a_group_sync_batchnorm_and_global_batch_norm_are_batchnorm(eps):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 2, 2, generator=g, dtype=torch.float64) * 2 + 1
    ref = nn.BatchNorm2d(3, eps=eps, momentum=0.3).double()
    bn = dp.convert_sync_batchnorm(nn.BatchNorm2d(3, eps=eps, momentum=0.3).double())
    torch.testing.assert_close(bn(x), ref(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(dp.global_batch_norm(x, eps=eps),
                               (x - mean) / torch.sqrt(var + eps), rtol=1e-12, atol=1e-12)


def test_sync_batchnorm_takes_inputs_of_two_dimensions_or_more():
    bn = dp.SyncBatchNorm(3).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(bn(x), F.batch_norm(x, None, None, training=True))
    with pytest.raises(ValueError, match="expected at least 2D input, got 1D"):
        bn(torch.randn(3, dtype=torch.float64))


# --- the device of a rank -------------------------------------------------------------------
def _as_rank(monkeypatch, local_rank: int, gpus: int) -> None:
    """In a group as local rank ``local_rank`` of a node with ``gpus`` GPUs (no group)."""
    monkeypatch.setattr(dp, "is_distributed", lambda: True)
    monkeypatch.setattr(dp, "env", lambda: dp.DistEnv(local_rank, 4, local_rank))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)


def test_a_rank_gets_the_gpu_of_its_local_rank_unless_one_is_named(monkeypatch):
    assert dp.rank_device(torch.device("cuda")) == torch.device("cuda")  # one process
    _as_rank(monkeypatch, 1, gpus=2)
    assert dp.rank_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert dp.rank_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert dp.rank_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize(("local_rank", "gpus"), [(2, 2), (3, 2), (0, 0)])
def test_a_local_rank_without_its_gpu_is_refused(monkeypatch, local_rank, gpus):
    _as_rank(monkeypatch, local_rank, gpus)
    with pytest.raises(RuntimeError, match=rf"local rank {local_rank} but only {gpus} GPU\(s\)"
                                           r" on this node: use torchrun --nproc_per_node"):
        dp.rank_device(torch.device("cuda"))


# --- leaving the group on an error ----------------------------------------------------------
class _EveryRank(ValueError):
    on_every_rank = True


@pytest.mark.parametrize(("error", "together"), [(_EveryRank("all"), True),
                                                  (ValueError("one"), False),
                                                  (KeyboardInterrupt(), False)])
def test_an_error_leaves_the_group_together_only_when_every_rank_raised_it(
        monkeypatch, error, together):
    left: list = []
    monkeypatch.setattr(dp, "is_distributed", lambda: True)
    monkeypatch.setattr(dp, "shutdown", lambda together=False: left.append(together))
    with pytest.raises(type(error)) as caught, dp.leave_group_on_error():
        raise error
    assert caught.value is error and left == [together]
    with dp.leave_group_on_error():
        pass
    assert left == [together]  # no error: the command leaves the group itself


def test_a_failure_to_leave_does_not_hide_the_commands_error(monkeypatch):
    def gone(together=False):
        raise RuntimeError("peer gone")

    monkeypatch.setattr(dp, "is_distributed", lambda: True)
    monkeypatch.setattr(dp, "shutdown", gone)
    with pytest.raises(ValueError, match="the real error"), dp.leave_group_on_error():
        raise ValueError("the real error")


def test_rank_alone_without_world_size_is_one_process(monkeypatch):
    for v in dp.TORCHRUN_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("RANK", "1")  # a pod or a shell that sets RANK: not torchrun
    assert dp.init_distributed() == dp.DistEnv()


# --- converting BatchNorm -------------------------------------------------------------------
@pytest.mark.parametrize(("affine", "track"), [(True, True), (False, False), (False, True)])
def test_converting_batchnorm_keeps_every_setting(affine, track):
    bn = nn.BatchNorm1d(4, eps=1e-3, momentum=0.25, affine=affine, track_running_stats=track)
    new = dp.convert_sync_batchnorm(bn)
    assert isinstance(new, dp.SyncBatchNorm)
    settings = ("num_features", "eps", "momentum", "affine", "track_running_stats")
    assert [getattr(new, k) for k in settings] == [getattr(bn, k) for k in settings]
    assert (new.weight is None) == (not affine) and (new.running_mean is None) == (not track)


def test_converting_twice_keeps_the_sync_batchnorms_and_reaches_nested_ones():
    inner = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    net = nn.Sequential(nn.BatchNorm1d(2), inner)
    assert dp.convert_sync_batchnorm(net) is net
    first = [m for m in net.modules() if isinstance(m, dp.SyncBatchNorm)]
    assert len(first) == 2 and not any(type(m) is nn.BatchNorm1d for m in net.modules())
    dp.convert_sync_batchnorm(net)
    assert [m for m in net.modules() if isinstance(m, dp.SyncBatchNorm)] == first
    assert dp.convert_sync_batchnorm(first[0]) is first[0]


# --- callbacks of rank 0 ----------------------------------------------------------------------
class _Args(Callback):
    def __init__(self):
        self.seen, self.closed = [], 0

    def on_epoch_start(self, loop, epoch):
        self.seen.append(("epoch_start", loop, epoch))

    def on_step_end(self, loop, step, metrics):
        self.seen.append(("step_end", loop, step, metrics))

    def on_epoch_end(self, loop, epoch, metrics):
        self.seen.append(("epoch_end", loop, epoch, metrics))

    def close(self):
        self.closed += 1


@pytest.mark.parametrize("main_rank", [True, False])
def test_rank_0_callbacks_get_their_arguments_and_close_on_every_rank(monkeypatch, main_rank):
    monkeypatch.setattr(dp, "is_main_process", lambda: main_rank)
    inner, loop = _Args(), object()
    (cb,) = dp.main_process_only([inner])
    cb.on_epoch_start(loop, 3)
    cb.on_step_end(loop, 7, {"loss": 0.5})
    cb.on_epoch_end(loop, 3, {"val_acc": 0.25})
    want = [("epoch_start", loop, 3), ("step_end", loop, 7, {"loss": 0.5}),
            ("epoch_end", loop, 3, {"val_acc": 0.25})]
    assert inner.seen == (want if main_rank else [])
    cb.close()  # what a rank opened (or nothing) is released on every rank
    assert inner.closed == 1


# --- language-model batches: each rank's least share of columns -------------------------------
@pytest.mark.parametrize(("world", "key", "batch", "least", "problem"), [
    (1, "data.batch_size", 1, 2, None),  # one process: nothing to share out
    (1, "data.batch_size", 7, 2, None),
    (2, "retrain.batch_size", 2, 1, None),  # one column a rank is enough to retrain
    (2, "data.batch_size", 4, 2, None),
    (2, "data.batch_size", 2, 2, "data.batch_size=2 over 2 processes leaves 1 column"),
    (3, "retrain.batch_size", 4, 1, "retrain.batch_size=4 does not divide by the 3"),
    (3, "data.batch_size", 3, 2, "leaves 1 column per rank.*at least 2 sequences"),
])
def test_lm_batches_leave_each_rank_its_least_share(monkeypatch, world, key, batch, least,
                                                    problem):
    from diffnas.config import ConfigError
    from diffnas.engine import lm

    monkeypatch.setattr(dp, "planned_world_size", lambda: world)
    if problem is None:
        lm._check_shares(key, batch, least)
    else:
        with pytest.raises(ConfigError, match=problem):
            lm._check_shares(key, batch, least)


def test_lm_retraining_takes_one_column_a_rank(monkeypatch):
    from test_distributed_lm import overrides

    from diffnas.config import load_config

    for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(var, value)  # torchrun's environment, no group joined
    cfg = load_config(None, [*overrides(), "retrain.batch_size=2"])
    assert cfg.retrain.batch_size == 2


# --- two gloo ranks -----------------------------------------------------------------------------
def _halves() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 2, 2, generator=g, dtype=torch.float64) * 3 - 1
    w = torch.randn(8, 3, 2, 2, generator=g, dtype=torch.float64)
    return x, w


def _catch(fn) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    join_ranks(rank, world, port)
    try:
        found: dict = {"env": dp.init_distributed(), "planned": dp.planned_world_size(),
                       "nccl": dp.nccl_for_cuda(), "main": dp.is_main_process()}
        found["object"] = dp.broadcast_object(f"from {rank}", src=1)
        t = torch.full((3,), float(rank))
        dp.broadcast_([t], src=1)
        found["tensor"] = t
        torch.manual_seed(100 + rank)
        dp.sync_rng(src=1)
        found["rng"] = torch.rand(4)
        a = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True) * (rank + 1)
        found["mean"] = dp.all_reduce_mean([a])[0]
        found["mean_input"] = a.detach().clone()
        ps = [nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in (2, 3, 1)]
        ps[0].grad = torch.tensor([1.0, -2.0], dtype=torch.float64) * (rank + 1)
        ps[2].grad = torch.tensor([4.0], dtype=torch.float64) * (3 * rank + 1)
        dp.average_grads_(ps)
        found["grads"] = [p.grad for p in ps]
        pairs = [("loss", 1.0 / 3.0 + rank * 1e-12), ("acc", 0.1 * rank)]
        found["metrics"] = dp.all_reduce_metrics(dict(pairs if rank == 0 else pairs[::-1]))
        v = torch.tensor([1.0, 2.0, 5.0])
        found["permuted"] = _catch(lambda: dp.assert_replicated(
            {"w": [v if rank == 0 else v.flip(0)]}))
        found["second_drifted"] = _catch(lambda: dp.assert_replicated(
            {"alphas": [torch.ones(2)], "empty": [], "weights": [torch.ones(3) + rank]}))
        found["one_nan"] = _catch(lambda: dp.assert_replicated(
            {"w": [torch.tensor([1.0, float("nan") if rank == 1 else 2.0])]}))
        calls: list = []
        found["result"] = dp.main_process_result(lambda: calls.append(rank) or f"r{rank}")
        found["calls"] = calls

        def rank1_fails() -> None:
            if rank == 1:
                raise OSError("disk full")

        os.environ["LOCAL_RANK"] = "0"  # each rank a node of its own: rank 1 has a turn
        try:
            found["fetch"] = _catch(lambda: dp.fetch_in_turn(rank1_fails))
        finally:
            os.environ["LOCAL_RANK"] = str(rank)
        x_full, w_full = _halves()
        half = slice(rank * 4, rank * 4 + 4)
        bn = dp.convert_sync_batchnorm(nn.BatchNorm2d(3, eps=0.5, momentum=0.3).double())
        for _ in range(2):
            found["bn"] = bn(x_full[half])
        found["bn_stats"] = (bn.running_mean.clone(), bn.running_var.clone())
        x = x_full[half].clone().requires_grad_(True)
        y = dp.global_batch_norm(x, eps=0.5)
        (y * w_full[half]).sum().backward()
        found["gbn"], found["gbn_grad"] = y.detach(), x.grad
        save_rank(found, out, rank)
        dp.shutdown(together=True)
        found_after = {"in_group": dp.is_distributed(), "rank": dp.get_rank(),
                       "world": dp.get_world_size()}
        torch.save(found_after, f"{out}/after{rank}.pt")
    finally:
        dp.shutdown()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = spawn_ranks(_worker, tmp_path_factory.mktemp("rules2"))
    return [{**load_rank(out, r), "after": torch.load(out / f"after{r}.pt")} for r in (0, 1)]


def test_each_rank_knows_its_place_and_the_group_is_left(ranks):
    for rank, found in enumerate(ranks):
        assert found["env"] == dp.DistEnv(rank, 2, rank)  # init_distributed again: same
        assert found["planned"] == 2 and found["main"] == (rank == 0)
        assert found["nccl"] is False  # a gloo-only group: CUDA tensors do not use NCCL
        assert found["after"] == {"in_group": False, "rank": 0, "world": 1}


def test_broadcasts_and_rng_come_from_the_named_source_rank(ranks):
    torch.manual_seed(101)
    want = torch.rand(4)
    for found in ranks:
        assert found["object"] == "from 1"
        assert torch.equal(found["tensor"], torch.ones(3))
        assert torch.equal(found["rng"], want)


def test_means_leave_their_inputs_reach_every_gradient_and_keep_metric_keys(ranks):
    for rank, found in enumerate(ranks):
        assert torch.equal(found["mean_input"],
                           torch.tensor([1.0, 2.0], dtype=torch.float64) * (rank + 1))
        assert not found["mean"].requires_grad
        g0, none, g2 = found["grads"]  # every gradient averaged, whatever its place
        assert none is None
        assert torch.equal(g0, torch.tensor([1.5, -3.0], dtype=torch.float64))
        assert torch.equal(g2, torch.tensor([10.0], dtype=torch.float64))  # (4 + 16) / 2
        torch.testing.assert_close(found["mean"], torch.tensor([1.5, 3.0], dtype=torch.float64))
        got = found["metrics"]
        assert got["loss"] == (1.0 / 3.0 + (1.0 / 3.0 + 1e-12)) / 2  # float32 loses 1e-12
        assert got["acc"] == pytest.approx(0.05, rel=1e-15)


def test_replicas_that_differ_in_order_or_by_one_nan_are_caught_and_named(ranks):
    for found in ranks:
        assert found["permuted"].startswith("RuntimeError: w differ between ranks")
        assert found["second_drifted"].startswith("RuntimeError: weights differ between ranks")
        assert found["one_nan"].startswith("FloatingPointError: non-finite values (NaN or inf)"
                                           " in w on some rank")


def test_main_process_result_runs_on_rank_0_alone(ranks):
    assert ranks[0]["calls"] == [0] and ranks[1]["calls"] == []
    assert ranks[0]["result"] == ranks[1]["result"] == "r0"


def test_a_later_turns_failed_download_names_its_rank_everywhere(ranks):
    assert ranks[1]["fetch"] == "OSError: disk full"
    assert ranks[0]["fetch"] == "RuntimeError: rank 1 failed to fetch the data: OSError: disk full"


def test_sync_batchnorm_eps_momentum_and_global_batch_norm_gradient(ranks):
    x, w = _halves()
    ref = nn.BatchNorm2d(3, eps=0.5, momentum=0.3).double()
    for _ in range(2):
        out = ref(x)
    xr = x.clone().requires_grad_(True)
    y = F.batch_norm(xr, None, None, training=True, eps=0.5)
    (y * w).sum().backward()
    for rank, found in enumerate(ranks):
        half = slice(rank * 4, rank * 4 + 4)
        torch.testing.assert_close(found["bn"], out[half].detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(found["bn_stats"][0], ref.running_mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(found["bn_stats"][1], ref.running_var, rtol=1e-12, atol=0)
        torch.testing.assert_close(found["gbn"], y.detach()[half], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(found["gbn_grad"], xr.grad[half], rtol=1e-10, atol=1e-12)
