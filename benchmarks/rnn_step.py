"""Tokens per second of one DARTS RNN supernet search step (alpha step + weight step).

Random token ids over a PTB-sized vocabulary (the speed does not depend on the text).
Prints a table and writes JSON. Example (the shared 2-core CPU):

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/rnn_step.py --out rnn_step.json

``--device cuda`` measures on a GPU when one is available.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from diffnas.arch import ArchParams
from diffnas.engine.lm import HiddenState, LanguageModelObjective, LmBatch
from diffnas.spaces import DataShape, create_space
from diffnas.strategies import create_strategy


def bench(order: int, nhid: int, batch: int, bptt: int, vocab: int, nodes: int, steps: int,
          warmup: int, device: str) -> dict:
    torch.manual_seed(0)
    space = create_space({"name": "darts_rnn", "ninp": nhid, "nhid": nhid, "nodes": nodes},
                         DataShape(num_classes=vocab))
    net = space.build_supernet().to(device)
    arch = ArchParams(space).to(device)
    s = create_strategy({"name": "darts", "order": order,
                         "w_optim": {"lr": 5.0, "momentum": 0.0, "grad_clip": 0.25}},
                        net, arch, LanguageModelObjective(), epochs=1)
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, vocab, (bptt + 1, batch), generator=g).to(device)
    ht, ha = HiddenState(net.init_hidden(batch)), HiddenState(net.init_hidden(batch))

    def step(i: int) -> None:
        s.step(LmBatch(text[:-1], text[1:], ht, 2 * i), LmBatch(text[:-1], text[1:], ha, 2 * i + 1))
        ht.commit()
        ha.commit()

    for i in range(warmup):
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return {"order": order, "nhid": nhid, "batch": batch, "bptt": bptt, "vocab": vocab,
            "nodes": nodes, "device": device, "s_per_step": dt,
            "tokens_per_s": batch * bptt / dt,
            "supernet_weights": sum(p.numel() for p in net.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nhid", type=int, nargs="+", default=[64, 300])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bptt", type=int, default=35)
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--orders", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="rnn_step.json")
    a = ap.parse_args()
    rows = [bench(o, h, a.batch, a.bptt, a.vocab, a.nodes, a.steps, a.warmup, a.device)
            for h in a.nhid for o in a.orders]
    print(f"{'order':>5} {'nhid':>5} {'batch':>5} {'bptt':>4} {'s/step':>8} {'tokens/s':>9}")
    for r in rows:
        print(f"{r['order']:>5} {r['nhid']:>5} {r['batch']:>5} {r['bptt']:>4} "
              f"{r['s_per_step']:>8.3f} {r['tokens_per_s']:>9.0f}")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine()}
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
