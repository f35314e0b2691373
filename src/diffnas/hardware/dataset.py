"""Latency datasets: sample architectures of a space, build each fixed network, measure
it, and keep the records in a JSON Lines file that later runs extend and reuse.

A record holds the genotype, its per-edge encoding (op index per edge into the space's op
list, ``-1`` for an edge the genotype drops), that op list (``ops``, per cell type), the
median latency and quartiles, parameters and MACs, the
device fingerprint, the measuring settings and the machine load while measuring.

On a shared machine the load changes over minutes, so every chunk of architectures is
timed together with a fixed *anchor* architecture, interleaved round by round: ``ratio``
is the median over rounds of (latency / anchor latency in the same round), which cancels
load that is steady over one round (about a second). ``anchored_ms`` = ratio times the
anchor's median over the whole file is the load-corrected latency the predictor fits.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diffnas.config import read_utf8
from diffnas.genotype import Genotype
from diffnas.genotype.discretize import discretize
from diffnas.hardware.latency import (
    LatencySettings,
    device_fingerprint,
    load_average,
    measure_many,
    settings_dict,
)
from diffnas.report.cost import count_macs, count_parameters
from diffnas.spaces import SearchSpace
from diffnas.spaces.base import EdgeSpec

log = logging.getLogger("diffnas")


def sample_genotype(space: SearchSpace, generator: torch.Generator) -> Genotype:
    """A random genotype of ``space``, through the space's own discretizer (so any space
    works). Each cell type first draws an op preference ``p ~ Dirichlet(1)``; edge logits
    are ``log p + Gumbel noise``. Compared with uniform ops this covers the cheap and the
    expensive ends of the space (all pools, all separable convolutions) as well."""
    logits = {}
    for group, edges in space.edge_groups().items():
        n_ops = len(edges[0].candidates)
        u = torch.rand(n_ops, generator=generator).clamp_min(1e-12)
        pref = -torch.log(u)
        pref = pref / pref.sum()
        g = torch.rand(len(edges), n_ops, generator=generator).clamp(1e-12, 1 - 1e-12)
        logits[group] = torch.log(pref) - torch.log(-torch.log(g))
    return discretize(logits, space)


def edge_ops(groups: Mapping[str, Sequence[EdgeSpec]]) -> dict[str, tuple[str, ...]]:
    """The candidate op names of each cell type of edge groups, in the order op indices
    refer to."""
    return {g: tuple(es[0].candidates) for g, es in groups.items()}


def space_ops(space: SearchSpace) -> dict[str, tuple[str, ...]]:
    return edge_ops(space.edge_groups())


def encode_indices(genotype: Genotype, space: SearchSpace) -> dict[str, list[int]]:
    """Op index per edge of each cell type in the space's edge order; ``-1`` = dropped."""
    out = {}
    for group, edges in space.edge_groups().items():
        kept = {(e.src, e.dst): e.op for e in genotype.cell(group).edges}
        out[group] = []
        for e in edges:
            op = kept.get((e.src, e.dst))
            if op is not None and op not in e.candidates:
                raise ValueError(f"op {op!r} on edge {e.src}->{e.dst} of {group!r} is not "
                                 f"among the space's ops {list(e.candidates)}")
            out[group].append(-1 if op is None else e.candidates.index(op))
    return out


def record_op_mismatch(record: dict[str, Any], space: SearchSpace) -> str | None:
    """Why a record's op indices cannot be read against ``space``'s op lists, or ``None``.
    A record that names its op lists (``ops``) must name the space's; every record's
    encoding must equal its genotype encoded with the space's op lists (records written
    before ``ops`` was stored are checked by this alone: it catches a reordered or
    different op list wherever the record's genotype uses an op it affects)."""
    section = (record.get("settings") or {}).get("space")
    measured_on = section.get("name", "darts_cnn") if isinstance(section, dict) else None
    if measured_on is not None and measured_on != space.name:
        return f"it was measured on space {measured_on!r}, not {space.name!r}"
    ops = space_ops(space)
    if "ops" in record:
        named = {g: tuple(v) for g, v in record["ops"].items()}
        if named != ops:
            return f"it was measured with ops {named}, the space has {ops}"
    if "genotype" not in record or "encoding" not in record:
        return "it lacks its genotype or encoding"
    try:
        enc = encode_indices(Genotype.from_dict(record["genotype"]), space)
    except (KeyError, ValueError) as exc:
        return f"its genotype does not fit the space ({exc})"
    if enc != record["encoding"]:
        return ("its op indices are not its genotype's under the space's op lists "
                f"{ops} (measured with another op list or order?)")
    return None


def one_hot(indices: dict[str, list[int]], space: SearchSpace) -> dict[str, torch.Tensor]:
    """Per-edge one-hot weights shaped like relaxed arch weights. A dropped edge is the
    ``none`` op where the space has one (it computes nothing), else a row of zeros."""
    out = {}
    for group, edges in space.edge_groups().items():
        cands = edges[0].candidates
        w = torch.zeros(len(edges), len(cands))
        for row, idx in enumerate(indices[group]):
            if idx >= 0:
                w[row, idx] = 1.0
            elif "none" in cands:
                w[row, cands.index("none")] = 1.0
        out[group] = w
    return out


def anchor_genotype(space: SearchSpace) -> Genotype:
    """The fixed reference architecture timed alongside every chunk (seeded sample)."""
    return sample_genotype(space, torch.Generator().manual_seed(20190101))


def anchored_latencies(records: list[dict[str, Any]]) -> list[float]:
    """Load-corrected latencies (ms): ``ratio * median anchor latency`` of the records
    timed beside an anchor (a ``ratio`` and an ``anchor_ms``); records without an anchor
    (a hand-made or merged file) keep their raw median."""
    anchors = [r["anchor_ms"] for r in records if "anchor_ms" in r]
    if not anchors:
        return [r["latency_ms"] for r in records]
    ref = statistics.median(anchors)
    return [r["ratio"] * ref if "ratio" in r and "anchor_ms" in r else r["latency_ms"]
            for r in records]


#: Settings that only change how precisely a latency is estimated, not what is measured:
#: records that differ in these alone may share a file and a fit.
PRECISION_SETTINGS = ("warmup", "repeats")


def built_network_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with ``network`` as the network was built: the settings it left unset
    filled in from the ``space`` section stored beside it (records written before they
    stored them so), and that section with its defaults filled in (an op list written
    out equal to the default is the same space). Without a readable space section,
    ``settings`` unchanged."""
    section = settings.get("space")
    if not isinstance(section, dict) or not isinstance(settings.get("network"), dict):
        return settings
    try:
        space, built = json.loads(_built_network(
            json.dumps([section, settings["network"]], sort_keys=True)))
    except (KeyError, TypeError, ValueError):  # a space or setting this version lacks
        return settings
    return {**settings, "space": space, "network": built}


@functools.lru_cache(maxsize=64)
def _built_network(key: str) -> str:
    """(JSON of [space section, network]) -> JSON of [the section with its defaults, the
    network as built]; cached (a file's records mostly share one pair); failures raise,
    so they are not cached."""
    from diffnas.config import to_dict
    from diffnas.spaces import DataShape
    from diffnas.spaces.registry import SPACES, space_config

    section, network = json.loads(key)
    name = section.get("name", "darts_cnn")
    config = space_config(section)
    space = SPACES.get(name)(config, DataShape())
    return json.dumps([{"name": name, **to_dict(config)}, space.network_settings(network)])


def settings_differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{setting: (value in a, value in b)}`` for every measuring setting (batch size,
    clock, threads, input shape, network, space, ...) in which two records' ``settings``
    differ; latencies measured under different ones are not comparable. Networks compare
    as built (:func:`built_network_settings`): a layout set through the space section
    counts the same as one set as a network override."""
    a, b = built_network_settings(a), built_network_settings(b)
    keys = sorted((set(a) | set(b)) - set(PRECISION_SETTINGS))
    out: dict[str, tuple[Any, Any]] = {}
    for k in keys:
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):  # name the inner settings that differ
            out.update({f"{k}.{i}": (x.get(i), y.get(i)) for i in sorted(set(x) | set(y))
                        if x.get(i) != y.get(i)})
        elif x != y:
            out[k] = (x, y)
    return out


def describe_differences(diff: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {x!r} vs {y!r}" for k, (x, y) in diff.items())


def genotype_key(genotype: Genotype) -> str:
    """One string per architecture: a node's inputs sorted by source (the discretizer
    lists them strongest first, which says nothing about the network), as files written
    before it did so list them."""
    d = genotype.to_dict()
    for cell in d["cells"].values():
        cell["edges"] = sorted(cell["edges"], key=lambda e: (e[2], e[1], e[0]))
    return json.dumps(d, sort_keys=True)


def _json_kind(value: object) -> str:
    """Name a parsed JSON value's kind as JSON spells it (for error messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"


def load_records(path: str | Path, fingerprint: str | None = None) -> list[dict[str, Any]]:
    """Records of a latency file, optionally only those of one device fingerprint id."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"latency dataset not found: {p}")
    records, seen = [], {}
    text = read_utf8(p, "latency dataset")
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as exc:
            if n == len(lines) and not text.endswith("\n"):  # a write cut short by a kill
                log.warning("%s:%d: dropping a torn last record (a measurement run stopped "
                            "while writing it)", p, n)
                continue
            raise ValueError(f"{p}:{n}: not a JSON record: {exc}") from exc
        if not isinstance(r, dict):
            raise ValueError(f"{p}:{n}: not a JSON record: {_json_kind(r)}, not an "
                             "object of genotype, encoding, latency_ms, device, settings")
        missing = {"genotype", "encoding", "latency_ms", "device", "settings"} - set(r)
        if missing:
            raise ValueError(f"{p}:{n}: record lacks {sorted(missing)}")
        if not isinstance(r["device"], dict) or not isinstance(r["device"].get("id"), str):
            raise ValueError(f"{p}:{n}: the record's device has no fingerprint id (a "
                             "'device' object with an 'id' string, as measure writes)")
        if fingerprint is None or r["device"]["id"] == fingerprint:
            records.append(r)
        seen[r["device"]["id"]] = seen.get(r["device"]["id"], 0) + 1
    if fingerprint is not None and not records and seen:
        known = ", ".join(f"{k} ({n} records)" for k, n in seen.items())
        raise ValueError(f"{p} holds no record of device {fingerprint!r}; its devices: {known}")
    return records


def _drop_torn_tail(path: Path) -> None:
    """End ``path`` with a newline before appending: a last line that is a whole record
    (a file whose final newline was lost) gets one; a torn record (load_records skips it)
    is cut off, with a warning."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb") as f:
        f.seek(-1, 2)
        if f.read(1) == b"\n":
            return
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
    except ValueError:
        log.warning("%s: cutting off a torn last record before appending", path)
        with path.open("r+b") as f:
            f.truncate(cut)
    else:
        with path.open("ab") as f:
            f.write(b"\n")


def build_dataset(
    space: SearchSpace, path: str | Path, count: int, input_shape: tuple[int, int, int],
    network: dict | None = None, settings: LatencySettings | None = None, seed: int = 0,
    chunk: int = 25, progress: Callable[[int, int], None] | None = None,
    space_section: dict | None = None, max_misses: int = 1000,
) -> list[dict[str, Any]]:
    """Sample ``count`` new architectures (not already in ``path``), measure them in
    interleaved chunks and append one record per architecture to ``path``; returns the new
    records. A file that holds records measured with other settings (see
    :func:`settings_differences`) or op lists (:func:`record_op_mismatch`) is refused
    before anything is measured. When ``max_misses`` samples in a row are all
    architectures already seen, the space (as the sampler reaches it) is taken to be
    exhausted: what was found is measured and a warning logged, so fewer than ``count``
    records may come back."""
    if max_misses < 1:
        raise ValueError(f"max_misses must be >= 1, got {max_misses}")
    settings = settings or LatencySettings()
    network = space.network_settings(dict(network or {}))  # stored as built
    path = Path(path)
    fp = device_fingerprint("cpu", settings.threads)
    # through JSON, so the comparison below sees what the file will hold (lists, not tuples)
    common = {"settings": json.loads(json.dumps(
        {**settings_dict(settings), "input_shape": list(input_shape), "network": network,
         "space": space_section or {"name": space.name}})), "device": fp,
        "ops": {g: list(v) for g, v in space_ops(space).items()}}
    existing = load_records(path) if path.is_file() else []
    for n, r in enumerate(existing, 1):
        if r["device"]["id"] != fp["id"]:  # one file = one device (fit refuses a mix)
            what = describe_differences({k: (r["device"].get(k), fp.get(k)) for k in fp
                                         if k != "id" and r["device"].get(k) != fp.get(k)})
            raise ValueError(f"{path} holds records measured on another device (record {n} "
                             f"vs this machine: {what or 'device id ' + r['device']['id']}); "
                             "use a new file")
        diff = settings_differences(r["settings"], common["settings"])
        if diff:  # one file = one way of measuring (fit_predictor refuses a mix anyway)
            raise ValueError(f"{path} holds records measured with other settings (record "
                             f"{n} vs now: {describe_differences(diff)}); use a new file")
        why = record_op_mismatch(r, space)
        if why:
            raise ValueError(f"{path} holds records of another op list (record {n}: {why}); "
                             "use a new file")
    seen = {genotype_key(Genotype.from_dict(r["genotype"])) for r in existing}
    gen = torch.Generator().manual_seed(seed + len(seen))
    new: list[dict[str, Any]] = []
    path.parent.mkdir(parents=True, exist_ok=True)
    anchor = space.build_network(anchor_genotype(space), **network)
    exhausted = False
    _drop_torn_tail(path)  # (a record cut short by a kill would swallow the next one)
    while len(new) < count and not exhausted:
        genotypes: list[Genotype] = []
        misses = 0
        while len(genotypes) < min(chunk, count - len(new)):
            g = sample_genotype(space, gen)
            k = genotype_key(g)
            if k not in seen:
                seen.add(k)
                genotypes.append(g)
                misses = 0
            else:
                misses += 1
                if misses >= max_misses:
                    exhausted = True
                    break
        if exhausted:
            log.warning("%s: %d samples in a row were architectures already seen (%d known, "
                        "%d of them from the file): the space looks exhausted; measuring the "
                        "%d new ones found, %d fewer than the %d asked for", path, max_misses,
                        len(seen), len(existing), len(new) + len(genotypes),
                        count - len(new) - len(genotypes), count)
        if not genotypes:
            break
        models = [space.build_network(g, **network) for g in genotypes]
        load_before = load_average()
        *stats, anchor_stats = measure_many([*models, anchor], input_shape, settings,
                                            seed=seed + len(new))
        load_after = load_average()
        batch = []
        for g, m, st in zip(genotypes, models, stats, strict=True):
            ratio = statistics.median(
                a / b for a, b in zip(st.samples_ms, anchor_stats.samples_ms, strict=True))
            batch.append({
                "genotype": g.to_dict(), "encoding": encode_indices(g, space),
                "latency_ms": st.median_ms, "q25_ms": st.q25_ms, "q75_ms": st.q75_ms,
                "ratio": ratio, "anchor_ms": anchor_stats.median_ms,
                "params": count_parameters(m), "macs": count_macs(m, input_shape),
                "load": [load_before, load_after],
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **common,
            })
        with path.open("a") as f:  # one write per chunk, on disk before the next chunk
            f.write("".join(json.dumps(r) + "\n" for r in batch))
            f.flush()
            os.fsync(f.fileno())
        new += batch
        if progress is not None:
            progress(len(new), count)
    return new
