"""`make bench`: the supernet step benchmark on CPU at the paper's and the demo's shapes.

Runs ``supernet_step.py`` with the benchmark venv (benchmarks/.venv-nni, with NNI 3.0)
when it exists and imports nni, so NNI's DARTS supernet is timed side by side in the same
process; otherwise with this Python, and the table says why NNI is missing. Make the venv
by hand:

    python3 -m venv benchmarks/.venv-nni
    benchmarks/.venv-nni/bin/pip install torch==2.13.0   # the CPU build
    benchmarks/.venv-nni/bin/pip install nni==3.0 pytorch-lightning pyyaml

Writes bench_results/supernet_step_{shape}_{i}.json and prints each table, then a
summary. Budget: < 15 minutes on an idle 2-core CPU. The side-by-side parts always run; the
ablations (``diffnas_twice``, the GDAS and partial-channel variants) run last, and only
if they start within ``OPTIONAL_START_S`` (``--all`` runs them whatever the time): on a
2-core VM twice as slow as the one the repetitions were sized on, everything took 15 min
0 s without NNI (2026-12-05); with NNI and the ablations skipped it took 12.5-14.5 min
there, and 12 min 46 s once the memory probe became one process per contender and
``diffnas_recompute:4`` an ablation. On a busy machine every figure is slower and noisier,
the ratios less so.
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

# (shape, batch, modes, contenders, warmup, repeats, optional). The optional parts
# (ablations) come last: they are the ones a slow machine skips. diffnas_recompute:4 is
# diffnas with the pool branches of the first 4 cells recomputed in backward
# (``recompute: 4``), diffnas_twice diffnas without the once-differentiable memory savers.
PLAN = [
    ("paper", 16, ["first"], ["diffnas", "nni", "reference"], 1, 3, False),
    ("paper", 16, ["weights", "second"], ["diffnas", "reference"], 1, 2, False),
    ("demo", 64, ["weights", "first", "second"], ["diffnas", "reference", "nni"], 1, 2, False),
    ("paper", 16, ["first"], ["diffnas", "diffnas_recompute:4", "diffnas_twice"], 1, 2, True),
    # the GDAS (one sampled op per edge) and partial-channel (k=4) variants
    ("paper", 16, ["first"], ["diffnas", "diffnas_gdas", "diffnas_pc"], 1, 2, True),
]
#: an optional part starts only this many seconds into the run (each takes 1.5-3 min)
OPTIONAL_START_S = 9 * 60


def pick_python() -> tuple[str, str | None]:
    if NNI_PY.exists():
        ok = subprocess.run([str(NNI_PY), "-c", "import nni.nas.hub.pytorch"],
                            capture_output=True, text=True)
        if ok.returncode == 0:
            return str(NNI_PY), None
        return sys.executable, f"{NNI_PY} cannot import nni: {ok.stderr.strip()[-300:]}"
    return sys.executable, f"no NNI venv at {NNI_PY} (see benchmarks/run_all.py's docstring)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true",
                    help="run the ablations too however long the side-by-side parts took")
    args = ap.parse_args(argv)
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
    reports, skipped = [], []
    for i, (shape, batch, modes, contenders, warmup, repeats, optional) in enumerate(PLAN):
        if optional and not args.all and time.time() - t0 > OPTIONAL_START_S:
            skipped.append(f"{shape} {'/'.join(modes)}: {', '.join(contenders[1:])}")
            continue
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
    for part in skipped:
        print(f"skipped (started after {OPTIONAL_START_S // 60} min; --all runs it): {part}")
    (out_dir / "summary.json").write_text(json.dumps(
        {"reports": reports, "nni_missing": why, "skipped": skipped,
         "seconds": time.time() - t0}, indent=2))


if __name__ == "__main__":
    main()
