"""Time one DARTS search step of several supernets side by side, in one process.

Contenders (``--contenders``):
  diffnas         diffnas's DARTS CNN supernet and its real strategy code (DartsStrategy)
  reference       a plain supernet (benchmarks/reference_supernet.py: every op, ``none``
                  included, weighted sum, no tricks), stepped as the original DARTS code does
  nni             NNI 3.0's DARTS space mutated by its DARTS strategy (first order only:
                  NNI 3.0 has no second-order DARTS); needs the benchmark venv with nni
  diffnas_nchw    ablation: diffnas without channels-last
  diffnas_nofuse  ablation: diffnas without the shared ReLU and the BN-fused weights
  diffnas_twice   ablation: diffnas inside twice_differentiable() (plain autograd, none
                  of the once-differentiable memory savers: DwPwConv, BNReLUConv, int16
                  max-pool indices)
  diffnas_recompute[:N]  diffnas recomputing the pool branches of all (or the first N)
                  cells in backward: the space's ``recompute`` option (less memory, more time)
  diffnas_pc      diffnas with partial channels (PC-DARTS, k=4)
  diffnas_gdas    diffnas's GDAS strategy (one sampled op per edge)
  diffnas_fdf     diffnas with ``hessian: fd_forward`` (second order: the virtual step's
                  pass reused, a forward difference; 4 passes per step instead of 5)

Modes (``--modes``): ``weights`` (one SGD step on w), ``first`` (first-order search step:
alpha step on a validation batch, then the weight step), ``second`` (unrolled second-order
search step, finite-difference Hessian-vector product, then the weight step).

Timing alternates the contenders (rotating who goes first), after warm-up steps, and
reports the median, min and max. Peak memory: on CUDA the max allocated bytes of the step;
on CPU the peak resident memory of one step in a fresh process that builds one contender
and steps it once before (a search's steady state: a first step peaks 3-15% lower),
together with the resident memory before its first step.
Writes JSON (``--out``) and prints a table. Example:

    python benchmarks/supernet_step.py --shape paper --batch 16 --modes first
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from reference_supernet import ReferenceSuperNet  # noqa: E402
from torch import nn  # noqa: E402

MODES = ("weights", "first", "second")


def shape_spec(name: str) -> dict[str, Any]:
    """The paper's CIFAR search shapes, or the demo's (read from its config file)."""
    if name == "paper":
        return dict(C=16, layers=8, nodes=4, in_channels=3, resolution=32, num_classes=10,
                    batch_cpu=16, batch_gpu=64)
    if name == "demo":
        cfg = yaml.safe_load((ROOT / "configs" / "darts_fashion_mnist.yaml").read_text())
        space = cfg["search"]["space"]
        bs = cfg["data"]["batch_size"]
        return dict(C=space["C"], layers=space["layers"], nodes=space["nodes"], in_channels=1,
                    resolution=cfg["data"]["resolution"], num_classes=10, batch_cpu=bs,
                    batch_gpu=bs)
    raise ValueError(f"unknown shape {name!r}; use 'paper' or 'demo'")


# --- contenders ---------------------------------------------------------------------------
class Contender:
    name = ""
    modes: tuple[str, ...] = MODES

    def step(self, mode: str, train, val) -> None:
        raise NotImplementedError

    def num_weights(self) -> int:
        return sum(p.numel() for p in self.weights())

    def weights(self):
        raise NotImplementedError


class Diffnas(Contender):
    """The library as a user runs it: space -> supernet, ArchParams, DartsStrategy."""

    def __init__(self, spec, device, variant: str = "diffnas") -> None:
        from diffnas.arch import ArchParams
        from diffnas.spaces import DataShape, create_space
        from diffnas.strategies import ClassificationObjective, create_strategy
        from diffnas.supernet.mixed import MixedOp

        self.name = variant
        section = {"name": "darts_cnn", "C": spec["C"], "layers": spec["layers"],
                   "nodes": spec["nodes"]}
        if variant == "diffnas_pc":
            section["mixed_op"] = {"name": "partial_channel", "k": 4}
        if variant.startswith("diffnas_recompute"):  # diffnas_recompute[:N cells]
            n = variant.partition(":")[2]
            section["recompute"] = int(n) if n else True
        space = create_space(section, DataShape(spec["in_channels"], spec["resolution"],
                                                spec["num_classes"]))
        self.net = space.build_supernet().to(device)
        if variant == "diffnas_nchw":
            self.net.channels_last = False
        if variant == "diffnas_nofuse":  # every op through its own module, weights by mul
            for m in self.net.modules():
                if isinstance(m, MixedOp):
                    m._other = list(m._live)
                    m._preact, m._prenorm, m._identity = [], [], []
        arch = ArchParams(space).to(device)
        obj = ClassificationObjective()
        if variant == "diffnas_gdas":
            self.s1 = create_strategy({"name": "gdas"}, self.net, arch, obj, epochs=50)
            self.modes = ("first",)
        else:
            self.s1 = create_strategy({"name": "darts", "order": 1}, self.net, arch, obj, 50)
            second = {"name": "darts", "order": 2}
            if variant == "diffnas_fdf":
                second["hessian"] = "fd_forward"
            self.s2 = create_strategy(second, self.net, arch, obj, 50)

    def weights(self):
        return self.net.parameters()

    def step(self, mode, train, val):
        if self.name == "diffnas_twice":  # ablation: no once-differentiable memory savers
            from diffnas.ops import twice_differentiable

            with twice_differentiable():
                return self._step(mode, train, val)
        return self._step(mode, train, val)

    def _step(self, mode, train, val):
        if mode == "weights":
            self.s1.weight_step(train, self.s1.arch_weights())
        elif mode == "first":
            self.s1.step(train, val)
        else:
            self.s2.step(train, val)


class Reference(Contender):
    """The plain supernet, stepped like the original DARTS code (model_search.py and
    architect.py): ``loss.backward()`` for the alpha step, a copied model for the unrolled
    step, finite differences for the Hessian-vector product."""

    name = "reference"

    def __init__(self, spec, device) -> None:
        self.net = ReferenceSuperNet(spec["C"], spec["num_classes"], spec["layers"],
                                     spec["nodes"], spec["in_channels"]).to(device)
        n_edges = sum(2 + i for i in range(spec["nodes"]))
        self.alphas = {g: nn.Parameter(1e-3 * torch.randn(n_edges, 8, device=device))
                       for g in ("normal", "reduce")}
        self.w_opt = torch.optim.SGD(self.net.parameters(), 0.025, momentum=0.9,
                                     weight_decay=3e-4)
        self.a_opt = torch.optim.Adam(self.alphas.values(), 3e-4, betas=(0.5, 0.999),
                                      weight_decay=1e-3)

    def weights(self):
        return self.net.parameters()

    def _loss(self, net, batch, detach=False):
        w = {g: F.softmax(a, dim=-1) for g, a in self.alphas.items()}
        if detach:
            w = {g: t.detach() for g, t in w.items()}
        return F.cross_entropy(net(batch[0], w), batch[1])

    def _weight_step(self, train):
        self.w_opt.zero_grad()
        self._loss(self.net, train, detach=True).backward()
        nn.utils.clip_grad_norm_(self.net.parameters(), 5.0)
        self.w_opt.step()

    def _unrolled_grads(self, train, val):
        lr, mom, wd = 0.025, 0.9, 3e-4
        params = list(self.net.parameters())
        loss = self._loss(self.net, train)
        grads = torch.autograd.grad(loss, params)
        unrolled = copy.deepcopy(self.net)
        with torch.no_grad():
            for p, q, g in zip(params, unrolled.parameters(), grads, strict=True):
                buf = self.w_opt.state.get(p, {}).get("momentum_buffer")
                m = torch.zeros_like(p) if buf is None else mom * buf
                q.copy_(p - lr * (m + g + wd * p))
        uloss = self._loss(unrolled, val)
        uloss.backward()
        dalpha = [a.grad.clone() for a in self.alphas.values()]
        vector = [q.grad for q in unrolled.parameters()]
        r = 1e-2 / torch.cat([v.flatten() for v in vector]).norm()
        alist = list(self.alphas.values())
        with torch.no_grad():
            for p, v in zip(params, vector, strict=True):
                p.add_(v, alpha=r.item())
        gp = torch.autograd.grad(self._loss(self.net, train), alist)
        with torch.no_grad():
            for p, v in zip(params, vector, strict=True):
                p.sub_(v, alpha=2 * r.item())
        gn = torch.autograd.grad(self._loss(self.net, train), alist)
        with torch.no_grad():
            for p, v in zip(params, vector, strict=True):
                p.add_(v, alpha=r.item())
        for a, da, p_, n_ in zip(alist, dalpha, gp, gn, strict=True):
            a.grad = da - lr * (p_ - n_) / (2 * r)

    def step(self, mode, train, val):
        if mode == "first":
            self.a_opt.zero_grad()
            self._loss(self.net, val).backward()
            self.a_opt.step()
        elif mode == "second":
            self.a_opt.zero_grad()
            self._unrolled_grads(train, val)
            self.a_opt.step()
        self._weight_step(train)


class Nni(Contender):
    """NNI 3.0: ``nni.nas.hub.pytorch.DARTS`` mutated by ``nni.nas.strategy.DARTS`` (its
    DifferentiableMixedCell), stepped as its DartsLightningModule.training_step does, minus
    Lightning's own overhead: alpha step (backward of the validation loss), weight step."""

    name = "nni"
    modes = ("weights", "first")

    def __init__(self, spec, device) -> None:
        warnings.filterwarnings("ignore")
        from nni.nas.hub.pytorch import DARTS
        from nni.nas.strategy import DARTS as DartsStrategy

        space = DARTS(width=spec["C"], num_cells=spec["layers"], dataset="cifar")
        if spec["nodes"] != 4:
            raise ValueError("NNI's DARTS space has 4 nodes per cell")
        net = DartsStrategy().mutate_model(space)
        if spec["in_channels"] != 3:  # NNI's CIFAR stem takes 3 channels
            old = net.stem[0]
            net.stem[0] = nn.Conv2d(spec["in_channels"], old.out_channels, 3, padding=1,
                                    bias=False)
        self.net = net.to(device)
        alphas = [p for m in self.net.modules() if hasattr(m, "arch_parameters")
                  for p in m.arch_parameters()]
        self.alphas = list({id(p): p for p in alphas}.values())
        ids = {id(p) for p in self.alphas}
        self._weights = [p for p in self.net.parameters() if id(p) not in ids]
        self.w_opt = torch.optim.SGD(self._weights, 0.025, momentum=0.9, weight_decay=3e-4)
        self.a_opt = torch.optim.Adam(self.alphas, 3e-4, betas=(0.5, 0.999), weight_decay=1e-3)

    def weights(self):
        return self._weights

    def step(self, mode, train, val):
        if mode == "first":
            self.a_opt.zero_grad()
            F.cross_entropy(self.net(val[0]), val[1]).backward()
            self.a_opt.step()
        self.w_opt.zero_grad()
        F.cross_entropy(self.net(train[0]), train[1]).backward()
        nn.utils.clip_grad_norm_(self._weights, 5.0)
        self.w_opt.step()


def build(name: str, spec, device) -> Contender:
    if name.startswith("diffnas"):
        return Diffnas(spec, device, name)
    if name == "reference":
        return Reference(spec, device)
    if name == "nni":
        return Nni(spec, device)
    raise ValueError(f"unknown contender {name!r}")


def nni_available() -> str | None:
    """None if NNI 3.0 imports, else the reason it does not."""
    try:
        warnings.filterwarnings("ignore")
        import nni  # noqa: F401
        from nni.nas.hub.pytorch import DARTS  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"nni does not import in {sys.executable}: {type(e).__name__}: {e}"
    return None


# --- measurement -------------------------------------------------------------------------
def batches(spec, batch: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, spec["in_channels"], spec["resolution"], spec["resolution"])
    out = []
    for _ in range(2):
        x = torch.randn(shape, generator=g).to(device)
        y = torch.randint(0, spec["num_classes"], (batch,), generator=g).to(device)
        out.append((x, y))
    return out


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory (VmRSS) or its peak (VmHWM) of this process, in MB. Not
    ru_maxrss: Linux keeps that across exec, so a child would inherit the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: ``clear_refs``
    5); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def probe(args) -> None:
    """Child process: one contender; for each of its modes (in ``MODES`` order, lightest
    first) the peak RSS of one step taken once the process is warm. The first mode gets a
    step of its own before the measured one, a later mode follows the earlier modes'
    steps. A fresh process's first step peaks 3-15% below its later ones (glibc keeps
    freed memory after it; 2026-12-05), so a search's steady state is the later figure.
    Prints JSON: per mode, the start RSS (after building) and the step's peak RSS."""
    spec = shape_spec(args.shape)
    device = torch.device("cpu")
    torch.manual_seed(0)
    c = build(args.probe_contender, spec, device)
    train, val = batches(spec, args.batch, device)
    start = rss_mb()
    modes = [m for m in MODES if m in args.probe_modes]
    c.step(modes[0], train, val)  # warm-up: allocator, oneDNN primitives
    result, resettable = {}, True
    for m in modes:
        resettable = reset_peak_rss() and resettable
        c.step(m, train, val)
        result[m] = {"start_rss_mb": start, "peak_rss_mb": rss_mb("VmHWM"),
                     "peak_rss_scope": "one warm step" if resettable
                     else "since the process started (VmHWM could not be reset)"}
    print("PROBE " + json.dumps(result))


def cpu_peaks(contender: str, modes: list[str], shape: str, batch: int) -> dict[str, dict]:
    """Per mode, :func:`probe`'s figures for ``contender`` from a fresh process (or the
    error it printed)."""
    cmd = [sys.executable, __file__, "--shape", shape, "--batch", str(batch),
           "--probe-contender", contender, "--probe-modes", *modes]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    for line in out.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    return {m: {"error": (out.stderr or out.stdout)[-500:]} for m in modes}


def run(args) -> dict:
    spec = shape_spec(args.shape)
    device = torch.device(args.device)
    batch = args.batch or (spec["batch_gpu"] if device.type == "cuda" else spec["batch_cpu"])
    names = list(args.contenders)
    skipped = {}
    if "nni" in names:
        why = nni_available()
        if why:
            skipped["nni"] = why
            names.remove("nni")
    torch.manual_seed(0)
    contenders = {n: build(n, spec, device) for n in names}
    train, val = batches(spec, batch, device)
    results = []
    load_before = os.getloadavg()
    for mode in args.modes:
        active = [n for n in names if mode in contenders[n].modes]
        for n in names:
            if n not in active:
                skipped[f"{n}/{mode}"] = f"{n} has no {mode!r} step"
        times: dict[str, list[float]] = {n: [] for n in active}
        peaks: dict[str, float] = {n: 0.0 for n in active}
        for r in range(args.warmup + args.repeats):
            order = active[r % len(active):] + active[: r % len(active)]
            for n in order:
                if device.type == "cuda":  # every contender's weights and state are resident:
                    sync(device)           # count only what this step allocates above them
                    torch.cuda.reset_peak_memory_stats()
                    resident = torch.cuda.memory_allocated()
                sync(device)
                t0 = time.perf_counter()
                contenders[n].step(mode, train, val)
                sync(device)
                dt = time.perf_counter() - t0
                if device.type == "cuda":
                    peaks[n] = max(peaks[n],
                                   (torch.cuda.max_memory_allocated() - resident) / 2**20)
                if r >= args.warmup:
                    times[n].append(dt)
            print(f"  [{args.shape} {mode}] round {r + 1}/{args.warmup + args.repeats}: "
                  + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" if times[n] else f"{n} warm"
                              for n in active), flush=True)
        for n in active:
            ts = times[n]
            row = {"shape": args.shape, "mode": mode, "contender": n, "batch": batch,
                   "device": str(device), "median_ms": statistics.median(ts) * 1e3,
                   "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3, "repeats": len(ts),
                   "images_per_s": batch / statistics.median(ts),
                   "num_weights": contenders[n].num_weights()}
            if device.type == "cuda":
                row["peak_mem_mb"] = peaks[n]
                row["peak_mem_kind"] = ("cuda max_memory_allocated above the memory allocated "
                                        "before the step (all contenders' resident weights "
                                        "and optimizer state excluded)")
            results.append(row)
    if device.type != "cuda" and args.memory:  # after all timing: one process per contender
        for n in names:
            rows = [r for r in results if r["contender"] == n]
            peaks = cpu_peaks(n, [r["mode"] for r in rows], args.shape, batch)
            for r in rows:
                p = peaks.get(r["mode"], {"error": "no figure"})
                r.update(p)
                r["peak_mem_mb"] = p.get("peak_rss_mb")
                r["peak_mem_kind"] = ("peak RSS (VmHWM) of one step in a fresh process, after "
                                      "a warm-up step or the lighter modes' steps")
    for row in results:  # ratios against diffnas for the same shape and mode
        base = next((r for r in results if r["contender"] == "diffnas"
                     and r["mode"] == row["mode"]), None)
        if base:
            row["diffnas_speedup"] = row["median_ms"] / base["median_ms"]
            if row.get("peak_mem_mb") and base.get("peak_mem_mb"):
                row["diffnas_mem_ratio"] = base["peak_mem_mb"] / row["peak_mem_mb"]
                if "start_rss_mb" in row and "start_rss_mb" in base:
                    row["diffnas_mem_ratio_above_start"] = (
                        (base["peak_rss_mb"] - base["start_rss_mb"])
                        / max(row["peak_rss_mb"] - row["start_rss_mb"], 1e-9))
    return {
        "shape": args.shape, "spec": spec, "batch": batch, "results": results,
        "skipped": skipped,
        "conditions": {
            "torch": torch.__version__, "python": platform.python_version(),
            "device": (torch.cuda.get_device_name() if device.type == "cuda"
                       else platform.processor() or platform.machine()),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "warmup": args.warmup, "repeats": args.repeats, "python_executable": sys.executable,
        },
    }


def table(report: dict) -> str:
    head = (f"{'shape':6} {'mode':8} {'contender':15} {'batch':>5} {'median ms':>10} "
            f"{'min':>8} {'max':>8} {'img/s':>8} {'peak MB':>8} {'x slower':>8} {'mem ratio':>9}")
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        mem = r.get("peak_mem_mb")
        lines.append(
            f"{r['shape']:6} {r['mode']:8} {r['contender']:15} {r['batch']:>5} "
            f"{r['median_ms']:>10.0f} {r['min_ms']:>8.0f} {r['max_ms']:>8.0f} "
            f"{r['images_per_s']:>8.1f} {'-' if mem is None else round(mem):>8} "
            f"{r.get('diffnas_speedup', float('nan')):>8.2f} "
            f"{r.get('diffnas_mem_ratio', float('nan')):>9.2f}")
    lines.append("x slower = contender median / diffnas median; mem ratio = diffnas peak / "
                 "contender peak")
    for k, v in report["skipped"].items():
        lines.append(f"skipped {k}: {v}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="paper", choices=["paper", "demo"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=0, help="0: 16 on CPU, 64 on GPU (paper)")
    p.add_argument("--contenders", nargs="+", default=["diffnas", "reference", "nni"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: measure peak RSS in a fresh process per contender")
    p.add_argument("--out", default=str(ROOT / "bench_results" / "supernet_step.json"))
    p.add_argument("--probe-contender", help=argparse.SUPPRESS)
    p.add_argument("--probe-modes", nargs="+", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_contender:
        probe(args)
        return
    report = run(args)
    out = Path(args.out)  # written before the table, so no printing problem can lose it
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
