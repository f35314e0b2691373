"""How much of mean_shift's alpha shift follows the loss, and how much is noise.

On a linear loss ``L(alpha) = g . alpha`` over ``--dims`` logits (224: darts_cnn's), the
shift ``sum k_i delta_i`` of :func:`diffnas.strategies.mean_shift.mean_shift` is split into
its part down the gradient and the rest; averaged over ``--trials`` draws per sample
count. Prints a table and writes JSON (docs/strategies.md quotes it):

    .venv/bin/python benchmarks/mean_shift_noise.py --out mean_shift_noise.json
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from diffnas.strategies.mean_shift import mean_shift


def measure(dims: int, bandwidth: float, samples: int, trials: int, seed: int) -> dict:
    torch.manual_seed(seed)
    g = torch.randn(dims, dtype=torch.float64)
    down = -g / g.norm()
    along, across = [], []
    for _ in range(trials):
        x = torch.zeros(dims, dtype=torch.float64, requires_grad=True)
        shift, _, _ = mean_shift(lambda d, x=x: ((x + d[0]) * g).sum(), [x], bandwidth,
                                 samples, 1.0)
        s = shift[0].detach()
        a = float(s @ down)
        along.append(a)
        across.append(float((s - a * down).pow(2).sum()) / (dims - 1))
    return {"samples": samples, "down_total": sum(along) / trials,
            "down_per_logit": sum(along) / trials / dims ** 0.5,
            "across_rms_per_logit": (sum(across) / trials) ** 0.5,
            "equal_weights_rms": bandwidth / samples ** 0.5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, default=224)
    ap.add_argument("--bandwidth", type=float, default=0.1)
    ap.add_argument("--samples", default="2,4,8")
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="mean_shift_noise.json")
    a = ap.parse_args()
    rows = [measure(a.dims, a.bandwidth, int(n), a.trials, a.seed) for n in a.samples.split(",")]
    print(f"linear loss, {a.dims} logits, bandwidth {a.bandwidth}, {a.trials} draws each")
    print("| samples | down the gradient, per logit | across it, rms per logit | "
          "equal weights |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['samples']} | {r['down_per_logit']:.4f} | {r['across_rms_per_logit']:.4f} "
              f"| {r['equal_weights_rms']:.4f} |")
    meta = {**vars(a), "torch": torch.__version__, "machine": platform.machine()}
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
