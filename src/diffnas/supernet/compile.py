"""torch.compile of a supernet's mixed ops (``search.compile``).

Each mixed op (one edge: every candidate op, the mixing weights and their sum) is compiled
on its own: edges of equal shapes share a compiled graph, so the DARTS CNN supernet needs 11
distinct graphs per pass kind, and Inductor fuses each edge's BN, ReLU, pool and mixing
arithmetic. Compiling the whole supernet as one graph did not finish in minutes on the
paper's supernet (benchmarks/gpu_notes_compile.md). The compiled forward runs plain
autograd: the engine builds it inside ``twice_differentiable()`` (the memory savers are
custom autograd functions that compiled graphs do not take).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from diffnas.config import ConfigError
from diffnas.ops.savers import skip_hooks_when_compiling
from diffnas.supernet.mixed import MixedOp
from diffnas.supernet.nb201 import Nb201MixedOp

log = logging.getLogger(__name__)

MIXED_OPS: tuple[type[nn.Module], ...] = (MixedOp, Nb201MixedOp)
COMPILE_KEYS = ("backend", "mode")


def check_compile_settings(spec: dict[str, Any]) -> None:
    """Refuse ``search.compile`` settings :func:`compile_mixed_ops` cannot take (config
    loading calls it too, before a run directory exists)."""
    unknown = sorted(set(spec) - set(COMPILE_KEYS))
    if unknown:
        raise ConfigError(f"search.compile: unknown setting(s) {unknown}; known: {COMPILE_KEYS}")
    backend, mode = spec.get("backend", "inductor"), spec.get("mode")
    if backend not in compile_backends(debug=True):
        raise ConfigError(f"search.compile.backend must be a torch.compile backend: one of "
                          f"{', '.join(compile_backends())} (or a debug one such as eager, "
                          f"aot_eager), got {backend!r}")
    modes = compile_modes()
    if mode is not None and mode not in modes:
        raise ConfigError(f"search.compile.mode must be null or one of {', '.join(modes)}, "
                          f"got {mode!r}")
    # other backends ignore a mode (a log line, no error)
    if mode is not None and backend != "inductor":
        raise ConfigError(f"search.compile.mode applies to the inductor backend only, "
                          f"not {backend!r}")


def compile_backends(debug: bool = False) -> list[str]:
    """The backend names ``torch.compile`` accepts; with ``debug`` also those dynamo tags
    debug or experimental (``eager``, ``aot_eager``). Dynamo is imported only when asked:
    loading it takes a second."""
    import torch._dynamo

    listed = torch._dynamo.list_backends
    return sorted(listed(exclude_tags=()) if debug else listed())


def compile_modes() -> list[str]:
    """The ``mode`` values ``torch.compile`` accepts (Inductor's mode table)."""
    import torch._inductor

    return list(torch._inductor.list_mode_options())


def compile_mixed_ops(net: nn.Module, spec: dict[str, Any]) -> int:
    """Compile every mixed op of ``net`` in place with ``torch.compile(**spec)`` (keys
    ``backend``, default ``inductor``, and ``mode``); returns how many were compiled."""
    check_compile_settings(spec)
    ops = [m for m in net.modules() if isinstance(m, MIXED_OPS)]
    if not ops:
        raise ValueError(f"search.compile: {type(net).__name__} has no mixed ops to compile")
    _raise_recompile_limits(per_code=64, total=4096)
    if skip_hooks_when_compiling():
        log.info("search.compile: this torch's compiler does not trace gradient hooks; the "
                 "compiled mixed ops run without the layout hooks (same gradients)")
    kw = {"backend": spec.get("backend", "inductor"), "dynamic": False}
    if spec.get("mode") is not None:
        kw["mode"] = spec["mode"]
    for m in ops:
        m.compile(**kw)
    log.info("search.compile: %d mixed ops compile (backend %s) during the first steps, one "
             "graph per edge shape and pass kind: minutes before the first batch (longest on "
             "a CPU); benchmarks/README.md says where it pays", len(ops), kw["backend"])
    return len(ops)


def _raise_recompile_limits(per_code: int, total: int) -> None:
    """Every edge runs the same ``forward`` code at its own shapes, in two pass kinds
    (weights frozen or not): dynamo's default of 8 graphs per code object would send the
    rest back to eager without a word. (The names changed across torch versions.)"""
    import torch._dynamo.config as dynamo

    for names, value in ((("recompile_limit", "cache_size_limit"), per_code),
                         (("accumulated_recompile_limit", "accumulated_cache_size_limit"),
                          total)):
        for name in names:
            if hasattr(dynamo, name):
                setattr(dynamo, name, max(getattr(dynamo, name), value))
                break


__all__ = ["COMPILE_KEYS", "compile_backends", "compile_mixed_ops", "compile_modes"]
