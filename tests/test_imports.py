"""Every diffnas module imports on its own, as a user's first import (no import cycles that
only a particular import order hides)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import diffnas

# Optional back-ends whose modules need an extra that the test environment may lack.
OPTIONAL = ("tensorboard", "onnx", "statsmodels", "nas_201_api", "nats_bench")

SCRIPT = f"""
import importlib, sys, traceback
OPTIONAL = {OPTIONAL!r}
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "diffnas" or m.startswith("diffnas.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ImportError as e:
        if getattr(e, "name", None) and not e.name.startswith("diffnas") and any(
            o in e.name for o in OPTIONAL
        ):
            continue  # an optional extra that is not installed
        failed.append(name + ": " + traceback.format_exception_only(e)[-1].strip())
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_first():
    names = [m.name for m in pkgutil.walk_packages(diffnas.__path__, "diffnas.")
             if not m.name.endswith(".__main__")]  # runs the CLI on import
    assert "diffnas.supernet.network" in names  # the walk is not empty
    done = subprocess.run([sys.executable, "-c", SCRIPT, *names], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
