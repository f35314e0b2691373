"""Every DARTS-family strategy on the nb201 space, same data, epochs and seeds (CPU).

Each (strategy, seed) search runs in its own process, its memory the peak resident size
above the level after loading the data (sampled every 5 ms), on
Fashion-MNIST at reduced resolution and size, with the collapse diagnostics callback; the
derived cell is looked up in the NAS-Bench-201 table (CIFAR-10 test accuracy after 200
epochs, ``c10_test_200``). Prints a table and writes JSON.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/strategies.py \
        --seeds 0 1 2 --epochs 3 --out benchmarks/results/strategies.json

The search data (Fashion-MNIST) is not the benchmark's (CIFAR-10): the table accuracy
measures how good the chosen cell is on CIFAR-10, i.e. it asks whether a strategy's
choice transfers, and on a schedule this short it mostly tells collapse from non-collapse.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TABLE = "/work/shared/data/nb201/nb201_compact.csv.gz"

STRATEGIES: dict[str, dict] = {
    "darts_1st": {"name": "darts", "order": 1},
    "darts_2nd": {"name": "darts", "order": 2},
    "single_level": {"name": "single_level"},
    "implicit": {"name": "implicit", "K": 3},
    "zero_order_rs": {"name": "zero_order", "estimator": "rs", "samples": 4, "mu": 0.3},
    "zero_order_mgs": {"name": "zero_order", "estimator": "mgs", "samples": 4, "mu": 0.1},
    "zero_order_gld": {"name": "zero_order", "estimator": "gld", "samples": 4, "mu": 0.3},
    "mean_shift": {"name": "mean_shift", "bandwidth": 0.1, "samples": 3},
    "snas": {"name": "snas"},
    "gdas": {"name": "gdas"},
    "darts_edge_norm": {"name": "darts", "order": 1, "edge_norm": True},
    "few_shot": {"name": "few_shot"},
    "random_labels": {"name": "random_labels"},
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    """Samples this process's resident memory every 5 ms in a thread: the peak above the
    level at start is the search's own memory (data loading happens before)."""

    def __enter__(self) -> PeakRss:
        import threading

        self.base = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _run_one(args: tuple) -> dict:
    """One search in this (child) process; returns the record."""
    name, seed, epochs, data_opts, out_dir = args
    import torch

    torch.set_num_threads(1)
    from diffnas.config import load_config
    from diffnas.engine.diagnostics import CollapseDiagnostics
    from diffnas.engine.search import load_search_data, run_search

    section = {**STRATEGIES[name], "w_optim": {"lr": 0.05, "lr_min": 0.001}}
    if STRATEGIES[name].get("name") != "random_labels":  # it trains no alphas (refuses it)
        section["a_optim"] = {"lr": 3e-3, "weight_decay": 1e-3}
    cfg = load_config(None, [
        "data.name=fashion_mnist", f"data.resolution={data_opts['resolution']}",
        f"data.train_subset={data_opts['train_subset']}", "data.test_subset=100",
        f"data.batch_size={data_opts['batch_size']}", "progress=false", f"seed={seed}",
        f"search.epochs={epochs}", "search.space={name: nb201, C: 8, N: 1}",
        f"search.strategy={json.dumps(section)}", "retrain.enabled=false",  # search only
    ])
    run_dir = Path(out_dir) / f"{name}_s{seed}"
    diag = CollapseDiagnostics(run_dir / "collapse.jsonl")
    data = load_search_data(cfg)
    with PeakRss() as mem:
        t0 = time.perf_counter()
        result = run_search(cfg, run_dir, extra_callbacks=[diag], data=data)
        seconds = time.perf_counter() - t0
    from diffnas.engine.diagnostics import skip_count
    from diffnas.nasbench import open_benchmark
    from diffnas.spaces.nb201 import genotype_to_str

    bench = open_benchmark(TABLE)
    return {"strategy": name, "seed": seed, "arch": genotype_to_str(result.genotype),
            "c10_test_200": bench.accuracy(result.genotype, "cifar10", "test"),
            "skip_connect": skip_count(result.genotype), "seconds": seconds,
            "peak_rss_mb": mem.peak - mem.base, "final_loss": result.history[-1].get("loss")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--train-subset", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--out", default="benchmarks/results/strategies.json")
    a = p.parse_args(argv)
    unknown = [s for s in a.strategies if s not in STRATEGIES]
    if unknown:
        p.error(f"unknown strategies {unknown}; known: {', '.join(STRATEGIES)}")
    data = {"resolution": a.resolution, "train_subset": a.train_subset,
            "batch_size": a.batch_size}
    ctx = mp.get_context("spawn")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.strategies:
            for seed in a.seeds:
                with ctx.Pool(1) as pool:  # a fresh process: its peak RSS is this run's
                    rec = pool.apply(_run_one, ((name, seed, a.epochs, data, tmp),))
                records.append(rec)
                print(f"{name:16s} seed {seed}: {rec['c10_test_200']:6.2f}  skip "
                      f"{rec['skip_connect']}  {rec['seconds']:6.1f}s  {rec['arch']}",
                      file=sys.stderr, flush=True)
    rows = []
    for name in a.strategies:
        rs = [r for r in records if r["strategy"] == name]
        acc = [r["c10_test_200"] for r in rs]
        rows.append({
            "strategy": name,
            "acc_mean": statistics.mean(acc),
            "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "skip_connect_mean": statistics.mean(r["skip_connect"] for r in rs),
            "seconds_mean": statistics.mean(r["seconds"] for r in rs),
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in rs),
        })
    print(f"\nnb201 search on Fashion-MNIST {a.resolution}x{a.resolution}, "
          f"{a.train_subset} images, {a.epochs} epochs, seeds {a.seeds}; "
          "accuracy = NAS-Bench-201 CIFAR-10 test (200 epochs) of the derived cell")
    print(f"| {'strategy':16s} | table acc (mean +- std) | skip | search s | +peak RSS MB |")
    print(f"|{'-' * 18}|{'-' * 25}|{'-' * 6}|{'-' * 10}|{'-' * 14}|")
    for r in rows:
        print(f"| {r['strategy']:16s} | {r['acc_mean']:6.2f} +- {r['acc_std']:5.2f}         | "
              f"{r['skip_connect_mean']:4.1f} | {r['seconds_mean']:8.1f} | "
              f"{r['peak_rss_mb_max']:12.0f} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": {**vars(a), "cpu_count": os.cpu_count(),
                                            "table": TABLE},
                               "summary": rows, "runs": records}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
