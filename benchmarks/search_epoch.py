"""First-order DARTS search epochs at CIFAR-10 scale on synthetic tensors (GPU figure).

25,000 training and 25,000 validation images of 3x32x32 live on the device as random
tensors (the real data's loading is not what is measured); the paper's supernet (C=16,
8 cells, 4 nodes) is searched with diffnas's DartsStrategy (order 1). For each batch size
it times ``--steps`` steps after warm-up, extrapolates one epoch (25,000 / batch steps)
and 50 epochs, and records the peak memory. ``--full-epoch B`` also runs one whole epoch
at batch B. ``--profile`` counts kernels and the GPU's busy time over a few steps, which
says what bounds the step: launches (GPU mostly idle) or arithmetic (GPU busy).

    python benchmarks/search_epoch.py --device cuda --batches 64 256 1024 --full-epoch 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from diffnas.arch import ArchParams  # noqa: E402
from diffnas.spaces import DataShape, create_space  # noqa: E402
from diffnas.strategies import ClassificationObjective, create_strategy  # noqa: E402

N_TRAIN = N_VAL = 25_000


def make_strategy(device, channels_last: bool):
    torch.manual_seed(0)
    space = create_space({"name": "darts_cnn", "C": 16, "layers": 8, "nodes": 4},
                         DataShape(3, 32, 10))
    net = space.build_supernet().to(device)
    net.channels_last = channels_last
    arch = ArchParams(space).to(device)
    return create_strategy({"name": "darts", "order": 1}, net, arch, ClassificationObjective(),
                           epochs=50)


def data(device):
    g = torch.Generator(device=device).manual_seed(0)
    xs = torch.randn(N_TRAIN + N_VAL, 3, 32, 32, device=device, generator=g)
    ys = torch.randint(0, 10, (N_TRAIN + N_VAL,), device=device, generator=g)
    return (xs[:N_TRAIN], ys[:N_TRAIN]), (xs[N_TRAIN:], ys[N_TRAIN:])


def step_fn(s, amp: str):
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if amp == "bf16"
           else contextlib.nullcontext())

    def step(train, val):
        with ctx:
            s.step(train, val)

    return step


def batch_at(split, i, b):
    x, y = split
    lo = (i * b) % (x.shape[0] - b + 1)
    return x[lo:lo + b], y[lo:lo + b]


def time_batch(b, steps, device, train, val, amp, channels_last) -> dict:
    s = make_strategy(device, channels_last)
    step = step_fn(s, amp)
    torch.cuda.reset_peak_memory_stats()
    for i in range(3):
        step(batch_at(train, i, b), batch_at(val, i, b))
    torch.cuda.synchronize()
    ts = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(batch_at(train, i, b), batch_at(val, i, b))
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    med = statistics.median(ts)
    n = math.ceil(N_TRAIN / b)
    return {"batch": b, "amp": amp, "channels_last": channels_last,
            "step_ms_median": med * 1e3, "step_ms_min": min(ts) * 1e3,
            "step_ms_max": max(ts) * 1e3, "steps_per_epoch": n,
            "epoch_s_est": n * med, "epochs50_min_est": 50 * n * med / 60,
            "train_images_per_s": b / med,
            "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20}


def full_epoch(b, device, train, val, amp, channels_last) -> dict:
    s = make_strategy(device, channels_last)
    step = step_fn(s, amp)
    for i in range(3):
        step(batch_at(train, i, b), batch_at(val, i, b))
    torch.cuda.synchronize()
    perm_t = torch.randperm(N_TRAIN, device=device)
    perm_v = torch.randperm(N_VAL, device=device)
    t0 = time.perf_counter()
    n = 0
    for lo in range(0, N_TRAIN, b):
        it, iv = perm_t[lo:lo + b], perm_v[lo:lo + b]
        step((train[0][it], train[1][it]), (val[0][iv], val[1][iv]))
        n += 1
    torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    return {"batch": b, "amp": amp, "channels_last": channels_last, "steps": n,
            "epoch_s": sec, "epochs50_min": 50 * sec / 60}


def profile(b, device, train, val, amp, channels_last) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    s = make_strategy(device, channels_last)
    step = step_fn(s, amp)
    for i in range(3):
        step(batch_at(train, i, b), batch_at(val, i, b))
    torch.cuda.synchronize()
    steps = 3
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            step(batch_at(train, i, b), batch_at(val, i, b))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e6  # us -> s
    top = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    return {"batch": b, "amp": amp, "kernels_per_step": len(kernels) / steps,
            "gpu_busy_s_per_step": busy / steps, "wall_s_per_step": wall / steps,
            "gpu_busy_fraction": busy / wall, "top_kernels": top}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", type=int, nargs="*", default=[64, 256, 1024])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--amp", nargs="+", default=["none"], choices=["none", "bf16"])
    p.add_argument("--channels-last", nargs="+", type=int, default=[1])
    p.add_argument("--full-epoch", type=int, nargs="*", default=[])
    p.add_argument("--profile", type=int, nargs="*", default=[])
    p.add_argument("--out", default=str(ROOT / "bench_results" / "search_epoch.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("search_epoch.py measures a GPU: pass --device cuda on a GPU machine")
    train, val = data(device)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "timed": [], "full_epochs": [], "profiles": [], "oom": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(report, indent=2))

    for amp in args.amp:
        for cl in args.channels_last:
            for b in args.batches:
                try:
                    r = time_batch(b, args.steps, device, train, val, amp, bool(cl))
                except torch.cuda.OutOfMemoryError:
                    report["oom"].append({"batch": b, "amp": amp, "channels_last": cl})
                    print(f"batch {b} amp={amp} cl={cl}: out of memory", flush=True)
                    torch.cuda.empty_cache()
                    continue
                report["timed"].append(r)
                print(json.dumps(r), flush=True)
                torch.cuda.empty_cache()
                save()
    for b in args.profile:
        r = profile(b, device, train, val, args.amp[0], bool(args.channels_last[0]))
        print(r.pop("top_kernels"))
        report["profiles"].append(r)
        print(json.dumps(r), flush=True)
        save()
    for b in args.full_epoch:
        r = full_epoch(b, device, train, val, args.amp[0], bool(args.channels_last[0]))
        report["full_epochs"].append(r)
        print(json.dumps(r), flush=True)
        save()
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
