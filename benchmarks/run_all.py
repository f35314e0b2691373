"""`make bench`: the supernet step benchmark on CPU at the paper's and the demo's shapes.

Runs ``supernet_step.py`` with the benchmark venv (benchmarks/.venv-nni, with NNI 3.0)
when it exists and imports nni, so NNI's DARTS supernet is timed side by side in the same
process; otherwise with this Python, and the table says why NNI is missing. Make the venv
by hand:

    python3 -m venv benchmarks/.venv-nni
    benchmarks/.venv-nni/bin/pip install torch==2.13.0   # the CPU build
    benchmarks/.venv-nni/bin/pip install nni==3.0 pytorch-lightning pyyaml

Writes bench_results/supernet_step_{shape}_{i}.json and prints each table, then a
summary. Budget: < 15 minutes on an idle 2-core CPU (the repetitions are sized for it);
on a busy machine every figure is slower and noisier, the ratios less so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NNI_PY = HERE / ".venv-nni" / "bin" / "python"

# (shape, batch, modes, contenders, warmup, repeats). diffnas_recompute:4 is diffnas with
# the first 4 cells recomputing activations in backward (the space's ``recompute: 4``).
PLAN = [
    ("paper", 16, ["first"], ["diffnas", "diffnas_recompute:4", "nni", "reference"], 1, 3),
    ("paper", 16, ["first"], ["diffnas", "diffnas_twice"], 1, 2),
    # the GDAS (one sampled op per edge) and partial-channel (k=4) variants
    ("paper", 16, ["first"], ["diffnas", "diffnas_gdas", "diffnas_pc"], 1, 2),
    ("paper", 16, ["weights", "second"], ["diffnas", "reference"], 1, 2),
    ("demo", 64, ["weights", "first", "second"], ["diffnas", "reference", "nni"], 1, 2),
]


def pick_python() -> tuple[str, str | None]:
    if NNI_PY.exists():
        ok = subprocess.run([str(NNI_PY), "-c", "import nni.nas.hub.pytorch"],
                            capture_output=True, text=True)
        if ok.returncode == 0:
            return str(NNI_PY), None
        return sys.executable, f"{NNI_PY} cannot import nni: {ok.stderr.strip()[-300:]}"
    return sys.executable, f"no NNI venv at {NNI_PY} (see benchmarks/run_all.py's docstring)"


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)  # --help
    py, why = pick_python()
    if why:
        print(f"NNI 3.0 not available, comparing against the plain reference only: {why}")
    out_dir = ROOT / "bench_results"
    out_dir.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    # OpenMP's default (spinning) wait policy is kept: on an idle machine it is about twice
    # as fast as OMP_WAIT_POLICY=PASSIVE. On a machine shared with other jobs, spinning
    # threads can turn a few-second step into a minute; set OMP_WAIT_POLICY=PASSIVE then.
    t0 = time.time()
    reports = []
    for i, (shape, batch, modes, contenders, warmup, repeats) in enumerate(PLAN):
        if why:
            contenders = [c for c in contenders if c != "nni"]
        out = out_dir / f"supernet_step_{shape}_{i}.json"
        cmd = [py, str(HERE / "supernet_step.py"), "--shape", shape, "--batch", str(batch),
               "--modes", *modes, "--contenders", *contenders, "--warmup", str(warmup),
               "--repeats", str(repeats), "--out", str(out)]
        print("$ " + " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, env=env)
        reports.append(json.loads(out.read_text()))
    summary = []
    for rep in reports:
        rows = rep["results"]
        for ours in [r for r in rows if r["contender"].startswith("diffnas")]:
            for r in rows:
                if r["contender"].startswith("diffnas") or r["mode"] != ours["mode"]:
                    continue
                a, b = ours.get("peak_mem_mb"), r.get("peak_mem_mb")  # None: a probe failed
                mem = a / b if a and b else float("nan")
                summary.append(
                    f"{r['shape']:6} {r['mode']:8} {ours['contender']:20} vs "
                    f"{r['contender']:10}: {r['median_ms'] / ours['median_ms']:.2f}x faster, "
                    f"{mem:.2f}x the peak memory")
    print("\nsummary (CPU, " + f"{time.time() - t0:.0f} s)")
    print("\n".join(summary))
    (out_dir / "summary.json").write_text(json.dumps(
        {"reports": reports, "nni_missing": why, "seconds": time.time() - t0}, indent=2))


if __name__ == "__main__":
    main()
