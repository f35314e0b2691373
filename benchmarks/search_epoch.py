"""First-order DARTS search epochs at CIFAR-10 scale on synthetic tensors (GPU figure).

25,000 training and 25,000 validation images of 3x32x32 live on the device as random
tensors (the real data's loading is not what is measured); the paper's supernet (C=16,
8 cells, 4 nodes) is searched with diffnas's DartsStrategy (order 1). For each batch size
it times ``--steps`` steps after warm-up, extrapolates one epoch (25,000 / batch steps)
and 50 epochs, and records the peak memory. ``--full-epoch B`` also runs one whole epoch
at batch B. ``--profile`` counts kernels and the GPU's busy time over a few steps, which
says what bounds the step: launches (GPU mostly idle) or arithmetic (GPU busy).

``--compile MODE`` applies torch.compile in this benchmark only (the library is not
changed): ``--scope net`` compiles the whole supernet forward (one graph per pass and batch
shape), ``cell`` each search cell, ``edge`` each MixedOp (edges of equal shapes share one
compiled graph). ``reduce-overhead`` adds CUDA graphs (cudagraph trees; with ``--scope edge``
that is 448 graphs per step, whose recording did not finish in minutes on torch 2.11), and
``cudagraphs`` is the backend of that name (AOTAutograd graphs, eager kernels, no
Inductor). Compilation is lazy:
the warm-up steps' extra time over a steady step is reported as ``compile_s``. A compile
failure is recorded in the JSON (``compile_errors``) and the point is re-timed eagerly,
labelled ``fallback``. The alpha pass runs with the weights frozen (the library's
``hypergrad.frozen``): a compiled backward graph would otherwise compute every weight
gradient. Settings the library offers (eager or Inductor per edge, bf16, ``--graph``) are
timed through ``diffnas.engine.search.configured_step`` itself, what ``diffnas search`` runs.

``--graph 1`` captures the whole step as one CUDA graph after the warm-up and replays it
(``diffnas.engine.cuda_graph.GraphedStep``, the library's ``search.cuda_graph``; combined with
``--compile default --scope edge`` it gave the best epoch, benchmarks/README.md).
``--inductor KEY=VALUE`` sets ``torch._inductor.config`` options (e.g. ``conv_1x1_as_mm=True``).

    python benchmarks/search_epoch.py --device cuda --batches 64 256 1024 --full-epoch 64
    python benchmarks/search_epoch.py --amp bf16 --batches 1250 --compile default --scope edge \\
        --cudnn-benchmark 1 --full-epoch 1250 --graph 1

benchmarks/gpu_notes_compile.md has the H100 figures and what failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from diffnas.arch import ArchParams  # noqa: E402
from diffnas.engine.search import configured_step  # noqa: E402
from diffnas.ops import twice_differentiable  # noqa: E402
from diffnas.spaces import DataShape, create_space  # noqa: E402
from diffnas.strategies import ClassificationObjective, create_strategy  # noqa: E402
from diffnas.supernet.compile import compile_mixed_ops  # noqa: E402

N_TRAIN = N_VAL = 25_000


def make_strategy(device, channels_last: bool, cfg: dict | None = None):
    torch.manual_seed(0)
    space = create_space({"name": "darts_cnn", "C": 16, "layers": 8, "nodes": 4},
                         DataShape(3, 32, 10))
    net = space.build_supernet().to(device)
    net.channels_last = channels_last
    if cfg is not None and not library_path(cfg):
        apply_compile(net, cfg)
    arch = ArchParams(space).to(device)
    return create_strategy({"name": "darts", "order": 1}, net, arch, ClassificationObjective(),
                           epochs=50)


def apply_compile(net, cfg: dict) -> None:
    """torch.compile the supernet in place at a scope or mode the library does not offer
    (``cfg['scope']``: net, cell or edge; modes other than Inductor's default). The alpha
    pass runs with the weights frozen either way (the library's ``hypergrad.frozen``)."""
    import torch._dynamo

    mode = cfg["compile"]
    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    kw = {"dynamic": False}
    if mode == "cudagraphs":  # no Inductor: AOTAutograd graphs replayed as CUDA graphs
        kw["backend"] = "cudagraphs"
    elif mode != "default":
        kw["mode"] = mode
    if cfg["scope"] == "net":
        net.forward = torch.compile(net.forward, **kw)
    elif cfg["scope"] == "cell":
        for cell in net.cells:
            cell.compile(**kw)
    elif cfg["scope"] == "edge":  # as the library's search.compile does
        compile_mixed_ops(net, {"backend": kw.get("backend", "inductor"),
                                "mode": kw.get("mode")})
    else:
        raise ValueError(f"unknown scope {cfg['scope']!r}")


def data(device):
    g = torch.Generator(device=device).manual_seed(0)
    xs = torch.randn(N_TRAIN + N_VAL, 3, 32, 32, device=device, generator=g)
    ys = torch.randint(0, 10, (N_TRAIN + N_VAL,), device=device, generator=g)
    return (xs[:N_TRAIN], ys[:N_TRAIN]), (xs[N_TRAIN:], ys[N_TRAIN:])


def library_path(cfg: dict | None) -> bool:
    """Settings the library offers (``search.compile`` per edge with Inductor,
    ``search.amp``, ``search.cuda_graph``): timed through ``configured_step`` itself."""
    return cfg is None or (
        cfg["compile"] in ("none", "default") and cfg["scope"] in (None, "edge")
    )


def step_fn(s, amp: str, cfg: dict | None = None):
    """The timed step, built by the library's ``configured_step`` (bf16, whole-step CUDA
    graph, per-edge Inductor); scopes and modes the library does not offer were compiled
    by ``apply_compile`` and run on plain autograd here."""
    cfg = cfg or {"compile": "none", "scope": None, "graph": 0, "warmup": 2}
    library = library_path(cfg)
    step = None
    if not library:
        graphs = cfg["compile"] in ("reduce-overhead", "cudagraphs")

        def step(train, val):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            # compiled graphs take plain autograd, not the memory savers' custom functions
            with twice_differentiable():
                return s.step(train, val)

    return configured_step(
        s, next(s.supernet.parameters()).device, amp=None if amp == "none" else amp,
        cuda_graph=bool(cfg.get("graph")),
        compile={"backend": "inductor"} if library and cfg["compile"] != "none" else None,
        graph_warmup=cfg["warmup"], step=step)


def dynamo_stats() -> dict:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # pragma: no cover
        return {}
    return {"unique_graphs": counters["stats"].get("unique_graphs", 0),
            "graph_breaks": sum(counters["graph_break"].values()),
            "graph_break_reasons": sorted(counters["graph_break"])[:10]}


def warm_up(step, b, train, val, n, extra_batch=None) -> list[float]:
    """Run ``n`` steps at batch ``b`` (and one at ``extra_batch`` after the first, for the
    last, smaller batch of an epoch), synchronised; returns each step's seconds."""
    ts = []
    sizes = [b] + ([extra_batch] if extra_batch else []) + [b] * (n - 1)
    for i, bb in enumerate(sizes):
        t0 = time.perf_counter()
        step(batch_at(train, i, bb), batch_at(val, i, bb))
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
        print(f"  warm-up step {i} (batch {bb}): {ts[-1]:.1f} s {dynamo_stats()}", flush=True)
    return ts


def batch_at(split, i, b):
    x, y = split
    lo = (i * b) % (x.shape[0] - b + 1)
    return x[lo:lo + b], y[lo:lo + b]


_BUILT: dict = {}


def built(b, device, train, val, amp, channels_last, cfg, extra_batch=None):
    """The strategy and step for this point, built and warmed up once per process (a
    compiled one is compiled in its warm-up) and reused by timing, profile and full epoch;
    returns ``(step, warm-up seconds or [] when reused)``."""
    key = (b, amp, channels_last, tuple(sorted(label(cfg).items())))
    if key in _BUILT:
        step, sizes = _BUILT[key]
        if extra_batch and extra_batch not in sizes:  # compile that shape outside the timing
            sizes.add(extra_batch)
            return step, warm_up(step, extra_batch, train, val, 1)
        return step, []
    _BUILT.clear()  # one at a time: a cached strategy holds its CUDA-graph memory pool
    torch.cuda.empty_cache()
    s = make_strategy(device, channels_last, cfg)
    step = step_fn(s, amp, cfg)
    torch.cuda.reset_peak_memory_stats()
    # graphed: the step after the eager warm-up captures the graph (and replays it once)
    warm = warm_up(step, b, train, val, cfg["warmup"] + bool(cfg.get("graph")), extra_batch)
    _BUILT[key] = (step, {b, extra_batch})
    return step, warm


_SYNCED = False


@contextlib.contextmanager
def gpu_turn():
    """With BENCH_SYNC_DIR set (several of these processes sharing one GPU, compiling at
    once): wait once until BENCH_SYNC_N processes are warmed up (or BENCH_SYNC_DEADLINE, a
    Unix time, passes), then hold an exclusive lock on the GPU for the timed section."""
    global _SYNCED
    d = os.environ.get("BENCH_SYNC_DIR")
    if not d:
        yield
        return
    import fcntl

    if not _SYNCED:
        Path(d, f"ready.{os.getpid()}").touch()
        n = int(os.environ.get("BENCH_SYNC_N", "1"))
        deadline = float(os.environ.get("BENCH_SYNC_DEADLINE", "inf"))
        while len(list(Path(d).glob("ready.*"))) < n and time.time() < deadline:
            time.sleep(1)
        _SYNCED = True
    with open(Path(d, "gpu.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def time_batch(b, steps, device, train, val, amp, channels_last, cfg) -> dict:
    step, warm = built(b, device, train, val, amp, channels_last, cfg)
    ts = []
    with gpu_turn():
        for i in range(steps):
            t0 = time.perf_counter()
            step(batch_at(train, i, b), batch_at(val, i, b))
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
    med = statistics.median(ts)
    n = math.ceil(N_TRAIN / b)
    return {"batch": b, "amp": amp, "channels_last": channels_last, **label(cfg),
            "warmup_s": warm, "compile_s": sum(warm) - len(warm) * med,
            "step_ms_median": med * 1e3, "step_ms_min": min(ts) * 1e3,
            "step_ms_max": max(ts) * 1e3, "steps_per_epoch": n,
            "epoch_s_est": n * med, "epochs50_min_est": 50 * n * med / 60,
            "train_images_per_s": b / med,
            "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20, **dynamo_stats()}


def label(cfg: dict) -> dict:
    return {k: cfg.get(k) for k in ("compile", "scope", "cudnn_benchmark",
                                    "graph")}


def full_epoch(b, device, train, val, amp, channels_last, cfg) -> dict:
    # Warm up the last, smaller batch too: a compiled step compiles it once per shape (a
    # strategy reused from the timing was not, unless the batch divides 25,000).
    step, warm = built(b, device, train, val, amp, channels_last, cfg,
                       extra_batch=N_TRAIN % b or None)
    perm_t = torch.randperm(N_TRAIN, device=device)
    perm_v = torch.randperm(N_VAL, device=device)
    with gpu_turn():
        t0 = time.perf_counter()
        n = 0
        for lo in range(0, N_TRAIN, b):
            it, iv = perm_t[lo:lo + b], perm_v[lo:lo + b]
            step((train[0][it], train[1][it]), (val[0][iv], val[1][iv]))
            n += 1
        torch.cuda.synchronize()
        sec = time.perf_counter() - t0
    return {"batch": b, "amp": amp, "channels_last": channels_last, **label(cfg),
            "warmup_s": warm, "steps": n, "epoch_s": sec, "epochs50_min": 50 * sec / 60,
            "epochs50_min_plus_warmup": (50 * sec + sum(warm)) / 60, **dynamo_stats()}


PROFILER_RECORDS = {"Activity Buffer Request", "Buffer Flush"}


def profile(b, device, train, val, amp, channels_last, cfg) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    step, warm = built(b, device, train, val, amp, channels_last, cfg)
    steps = 3
    with gpu_turn(), tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            step(batch_at(train, i, b), batch_at(val, i, b))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    cuda = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # CUPTI's own records (seen under CUDA graphs: ~0.5 s each per profile) are no kernels.
    kernels = [e for e in cuda if e.name not in PROFILER_RECORDS]
    overhead = sum(e.device_time for e in cuda if e.name in PROFILER_RECORDS) / 1e6
    busy = sum(e.device_time for e in kernels) / 1e6  # us -> s
    top = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    return {"batch": b, "amp": amp, **label(cfg), "warmup_s": warm,
            "kernels_per_step": len(kernels) / steps,
            "gpu_busy_s_per_step": busy / steps, "wall_s_per_step": wall / steps,
            "gpu_busy_fraction": busy / wall,
            "profiler_records_s_per_step": overhead / steps, "top_kernels": top}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", type=int, nargs="*", default=[64, 256, 1024])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--amp", nargs="+", default=["none"], choices=["none", "bf16"])
    p.add_argument("--channels-last", nargs="+", type=int, default=[1])
    p.add_argument("--full-epoch", type=int, nargs="*", default=[])
    p.add_argument("--profile", type=int, nargs="*", default=[])
    p.add_argument("--compile", nargs="+", default=["none"],
                   choices=["none", "default", "max-autotune-no-cudagraphs", "reduce-overhead",
                            "cudagraphs"],
                   help="torch.compile mode; 'cudagraphs' is backend='cudagraphs' (no Inductor)")
    p.add_argument("--scope", nargs="+", default=["net"], choices=["net", "cell", "edge"],
                   help="what torch.compile wraps (ignored with --compile none)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps (compile happens here)")
    p.add_argument("--cudnn-benchmark", type=int, default=0)
    p.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                   help="torch._inductor.config settings, e.g. conv_1x1_as_mm=True "
                        "(values parsed as Python literals)")
    p.add_argument("--graph", type=int, nargs="+", default=[0],
                   help="1: capture the whole step as one CUDA graph after the warm-up "
                        "(diffnas.engine.cuda_graph.GraphedStep) and replay it")
    p.add_argument("--out", default=str(ROOT / "bench_results" / "search_epoch.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("search_epoch.py measures a GPU: pass --device cuda on a GPU machine")
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    if args.inductor:
        import ast

        import torch._inductor.config as inductor_config

        for item in args.inductor:
            key, _, value = item.partition("=")
            if not hasattr(inductor_config, key):
                raise SystemExit(f"--inductor: torch._inductor.config has no {key!r}")
            setattr(inductor_config, key, ast.literal_eval(value))
    if os.environ.get("BENCH_STACKS"):  # where a long compile spends its time
        import faulthandler
        faulthandler.dump_traceback_later(float(os.environ["BENCH_STACKS"]), repeat=True)
    train, val = data(device)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "argv": sys.argv[1:], "inductor": args.inductor,
              "env": {k: v for k, v in os.environ.items()
                      if k.startswith(("TORCH", "TORCHINDUCTOR"))},
              "timed": [], "full_epochs": [], "profiles": [], "oom": [],
              "compile_errors": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(report, indent=2))

    def cfg_for(mode, scope, graph=0):
        return {"compile": mode, "scope": scope if mode != "none" else None,
                "warmup": args.warmup,
                "cudnn_benchmark": args.cudnn_benchmark, "graph": graph}

    configs = []
    for graph in args.graph:
        for mode in args.compile:
            for scope in (args.scope if mode != "none" else [None]):
                configs.append(cfg_for(mode, scope, graph))

    def guarded(kind, fn, b, amp, cl, cfg):
        """Run ``fn``; on a compile failure record it and re-run eagerly (labelled)."""
        tag = {"kind": kind, "batch": b, "amp": amp, "channels_last": cl, **label(cfg)}
        try:
            return fn(b, device, train, val, amp, bool(cl), cfg)
        except torch.cuda.OutOfMemoryError:
            _BUILT.clear()
            report["oom"].append(tag)
            print(f"{tag}: out of memory", flush=True)
            torch.cuda.empty_cache()
            return None
        except Exception as e:  # noqa: BLE001 -- a compile failure of any kind
            if cfg["compile"] == "none" and not cfg.get("graph"):
                raise
            err = f"{type(e).__name__}: {e}"[:4000]
            report["compile_errors"].append({**tag, "error": err})
            print(f"{tag}: COMPILE FAILED, falling back to eager: {err[:500]}", flush=True)
            save()
            _BUILT.clear()
            torch.cuda.empty_cache()
            # a failed capture retries the same compile setting without the graph
            fb = ({**cfg, "graph": 0, "fallback_from": "graph"} if cfg.get("graph")
                  else {**cfg_for("none", None), "fallback_from": cfg["compile"]})
            r = fn(b, device, train, val, amp, bool(cl), fb)
            r["fallback"] = (f"eager (compile {cfg['compile']}/{cfg['scope']}, "
                             f"graph {cfg.get('graph')} failed)")
            return r

    for cfg in configs:
        for amp in args.amp:
            for cl in args.channels_last:
                for b in args.batches:
                    if args.steps <= 0:
                        continue
                    r = guarded("timed", lambda *a, **k: time_batch(a[0], args.steps, *a[1:]),
                                b, amp, cl, cfg)
                    if r is not None:
                        report["timed"].append(r)
                        print(json.dumps(r), flush=True)
                    save()
        for tag, fn, batches, key in (("profile", profile, args.profile, "profiles"),
                                      ("full_epoch", full_epoch, args.full_epoch, "full_epochs")):
            for b in batches:
                r = guarded(tag, fn, b, args.amp[0], args.channels_last[0], cfg)
                if r is not None:
                    if "top_kernels" in r:
                        print(r.pop("top_kernels"))
                    report[key].append(r)
                    print(json.dumps(r), flush=True)
                save()
        _BUILT.clear()
        torch.cuda.empty_cache()
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
