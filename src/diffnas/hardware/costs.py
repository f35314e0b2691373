"""Cost model of a genotype: parameters, MACs, FLOPs per op type, measured latency on this
device and, given a fitted predictor, the predicted latency."""

from __future__ import annotations

import json
import logging
from collections import deque
from typing import Any

import torch
from torch import nn

from diffnas.genotype import CellGenotype, Genotype
from diffnas.hardware.dataset import (
    built_network_settings,
    describe_differences,
    encode_indices,
    one_hot,
    settings_differences,
)
from diffnas.hardware.latency import (
    LatencySettings,
    device_fingerprint,
    measure_latency,
    settings_dict,
)
from diffnas.report.cost import count_macs, count_parameters, flops_by_module
from diffnas.spaces import SearchSpace

log = logging.getLogger("diffnas")


def _cell_of(module: nn.Module, genotype: Genotype) -> CellGenotype:
    """The genotype cell a fixed cell module was built from: DARTS cells say whether they
    reduce; a space with one cell type (``nb201``) has only one to choose."""
    if hasattr(module, "reduction"):
        return genotype.cell("reduce" if module.reduction else "normal")
    if len(genotype.cells) == 1:
        return genotype.cells[0]
    names = [c.name for c in genotype.cells]
    raise ValueError(f"cannot tell which of the genotype's cells {names} the module "
                     f"{type(module).__name__} was built from")


def flops_by_op(model: nn.Module, genotype: Genotype, input_shape: tuple[int, ...]) -> dict:
    """FLOPs of one forward pass split by op name of the cells' edges; what lies outside
    the edge ops (stem, cell preprocessing, reduction blocks, classifier) is reported as
    ``other``. A fixed cell is any module with ``ops`` and ``spec`` (the ``(src, dst)``
    of each op, in any order, e.g. DARTS' ``FixedCell`` and ``Nb201FixedCell``); each op
    is named by the genotype's op on its ``(src, dst)`` edge."""
    per_module = flops_by_module(model, input_shape)
    out: dict[str, int] = {}
    in_ops = 0
    for name, module in model.named_modules():
        ops, spec = getattr(module, "ops", None), getattr(module, "spec", None)
        if not isinstance(ops, nn.ModuleList) or spec is None:
            continue
        # (src, dst) -> the genotype's ops on that edge, in order (DARTS may repeat one)
        names: dict[tuple[int, int], deque[str]] = {}
        for edge in _cell_of(module, genotype).edges:
            names.setdefault((edge.src, edge.dst), deque()).append(edge.op)
        for i, (src, dst) in enumerate(spec):
            if not names.get((src, dst)):
                raise ValueError(f"{name or 'model'} has an op on edge {src}->{dst} that the "
                                 "genotype does not have")
            op = names[(src, dst)].popleft()
            f = per_module.get(f"{name}.ops.{i}", 0)
            out[op] = out.get(op, 0) + f
            in_ops += f
    out["other"] = per_module[""] - in_ops
    return out


def genotype_costs(
    space: SearchSpace, genotype: Genotype, input_shape: tuple[int, int, int],
    network: dict | None = None, settings: LatencySettings | None = None,
    predictor: str | None = None,
) -> dict[str, Any]:
    """Parameters, MACs, FLOPs (total and per op), measured latency and, when a predictor
    file is given, the predicted latency of ``genotype`` built with ``network`` (a
    predictor fitted on another op list or edge count than ``space``'s is refused; a
    prediction outside the latencies it was fitted on is flagged)."""
    settings = settings or LatencySettings()
    p = None
    if predictor is not None:
        from diffnas.hardware.predictor import LatencyPredictor

        p = LatencyPredictor.load(predictor)
        p.check_space(space)
    model = space.build_network(genotype, **(network or {}))
    stats = measure_latency(model, input_shape, settings)
    out: dict[str, Any] = {
        "params": count_parameters(model), "macs": count_macs(model, input_shape),
        "flops": flops_by_module(model, input_shape)[""],
        "flops_by_op": flops_by_op(model, genotype, input_shape),
        "latency_ms": stats.median_ms, "latency_q25_ms": stats.q25_ms,
        "latency_q75_ms": stats.q75_ms, "settings": vars(settings),
        "device": device_fingerprint("cpu", settings.threads),
    }
    if p is not None:
        with torch.no_grad():
            out["predicted_ms"] = float(p(one_hot(encode_indices(genotype, space), space)))
        outside = p.outside_fitted_range(out["predicted_ms"])
        if outside:
            out["predicted_outside_fitted_range"] = outside
        differ = predictor_mismatch(p.meta, out["device"], {
            **settings_dict(settings), "input_shape": list(input_shape),
            "network": space.network_settings(dict(network or {}))})
        if differ:
            out["predictor_mismatch"] = differ
            log.warning("the latency predictor was fitted on records measured otherwise (%s): "
                        "its prediction is not for this measurement", differ)
    return out


def predictor_mismatch(meta: dict[str, Any], device: dict[str, Any],
                       settings: dict[str, Any]) -> str:
    """What differs between the device and measuring settings a predictor's records were
    taken with (its fit report, ``meta``) and ``device``/``settings``; empty when nothing
    does or the predictor does not record them. Networks compare as built (``settings``'
    network resolved by the caller, the fitted one from the space section stored with it);
    the space itself is checked by its op lists elsewhere."""
    fitted = built_network_settings(meta.get("settings") or {})
    fitted = {k: v for k, v in fitted.items() if k != "space"}
    if not fitted:
        return ""
    diff = settings_differences(fitted, json.loads(json.dumps(settings)))
    parts = [describe_differences(diff)] if diff else []
    theirs = (meta.get("device") or {}).get("id")
    if theirs is not None and theirs != device.get("id"):
        parts.append(f"device: {theirs!r} vs {device.get('id')!r}")
    return ", ".join(parts)
