"""Export the retrained network of a run to ONNX or TorchScript, and check the outputs.

The exported file is only useful if it computes what the PyTorch model computes, so every
export runs both on the same random batches (a batch size other than the traced one, to
catch a frozen batch dimension) and fails when the largest difference exceeds ``atol``.

ONNX export needs the ``onnx`` package and the check needs ``onnxruntime``
(``pip install 'diffnas[export]'``); TorchScript needs nothing beyond torch.
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffnas.engine.callbacks import read_json
from diffnas.engine.checkpoint import atomic_write_text, staged_path, written_by_diffnas
from diffnas.spaces import DataShape

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
EXPORT_EXTRA = "pip install 'diffnas[export]'"


#: the largest --resolution export accepts: the check runs batches of 5 at that side
MAX_RESOLUTION = 4096
#: keys every model.json written beside an export holds (how a diffnas one is known)
DESCRIPTION_KEYS = {"input_shape", "preprocess", "mean", "std", "outputs", "classes"}


#: the marker an exported model carries: a file of the TorchScript archive, a metadata
#: entry of the ONNX model (how a file ``diffnas export`` wrote is known)
MARK_FILE, MARK_KEY, MARK = "diffnas.json", "diffnas", '{"generator": "diffnas export"}'


class ExportError(RuntimeError):
    """Export failed, a needed package is missing, or the exported outputs differ."""


@dataclass
class ExportResult:
    path: Path
    format: str
    input_shape: tuple[int, ...]
    max_abs_diff: float | None  # None: not checked (--no-check)
    atol: float
    info: Path | None = None  # the JSON beside the model: input normalisation, class names

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path),
                "info": None if self.info is None else str(self.info)}


def _require(module: str, why: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise ExportError(f"{why} needs the '{module}' package: {EXPORT_EXTRA}") from exc


def infer_shape(state: dict[str, torch.Tensor], data_name: str,
                resolution: int | None) -> DataShape:
    """Input channels (the first convolution) and classes (the classifier) from a state
    dict; the side from the config's resolution or the dataset's native size."""
    convs = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 4]
    if not convs or "classifier.weight" not in state:
        raise ExportError("retrain/model.pt does not look like an image classification network "
                          "(no convolution or no 'classifier.weight'), the only kind export "
                          "writes")
    from diffnas.data.images import BUILTIN_SHAPES

    builtin = BUILTIN_SHAPES.get(data_name)
    side = resolution or (builtin[1] if builtin else None)
    if side is None:
        raise ExportError(f"unknown input resolution for dataset {data_name!r}: pass --resolution")
    return DataShape(int(convs[0].shape[1]), int(side), int(state["classifier.weight"].shape[0]))


def _own_data_side(name: str, root: str | None) -> int | None:
    """The image side of your own data (``npz``, ``folder``) read from its files when they
    are still there; None otherwise (then ``--resolution`` names it)."""
    from diffnas.data.custom import peek_shape

    try:
        peeked = peek_shape(name, root)
    except (OSError, ValueError):
        return None
    return None if peeked is None else peeked[1]


RETRAIN_FIX = "restore it, or run the retraining again (diffnas train) to rewrite it"


def check_exportable(cfg: Any, run: Path) -> None:
    """Refuse runs whose engine's networks are not image classifiers (graph and
    language-model runs: ``Engine.exportable``): export writes image classifiers only."""
    from diffnas.engine.engines import engine_of

    engine = engine_of(cfg)
    if not engine.exportable:
        raise ExportError(
            f"{run} is {engine.a_run}, of space {cfg.search.space.get('name', 'darts_cnn')}: "
            "it cannot be exported; diffnas export writes the retrained image classifier of "
            f"an image run as {' or '.join(FORMATS)}")


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict saved in ``path``; a damaged file is a ``ValueError`` naming it."""
    from diffnas.engine.checkpoint import load_saved

    return load_saved(path, RETRAIN_FIX, weights_only=True, what="state dict")


def load_retrained(run_dir: str | Path, resolution: int | None = None,
                   overrides: Sequence[str] = ()) -> tuple[nn.Module, DataShape]:
    """The retrained network of a run (eval mode, on the CPU) and its input shape."""
    from diffnas.engine.retrain import build_network
    from diffnas.engine.rundir import (
        load_run_config,
        run_kind,
        seeds_parent_message,
        unretrained_search_message,
    )
    from diffnas.engine.runlock import run_lock_holder
    from diffnas.genotype import Genotype, GenotypeError

    run = Path(run_dir)
    why = seeds_parent_message(run, "export")
    if why:
        raise ExportError(why)
    # loaded on the CPU wherever it ran; a train run's config checked as train checked it
    cfg = load_run_config(run, list(overrides), device=False, search=run_kind(run) != "train")
    check_exportable(cfg, run)
    weights, result = run / "retrain" / "model.pt", run / "retrain" / "result.json"
    if not weights.is_file() or not result.is_file():
        holder = run_lock_holder(run)
        if holder is not None:
            raise FileNotFoundError(
                f"{run} has no retrained model yet: the run is still going (another diffnas "
                f"process{f' ({holder})' if holder else ''} holds it); export it once its "
                "retraining has ended")
        unretrained = unretrained_search_message(run, cfg)
        if unretrained:
            raise FileNotFoundError(f"{unretrained}; then export that run")
        raise FileNotFoundError(f"{run} has no retrained model (retrain/model.pt and "
                                "retrain/result.json); run or finish the retraining first")
    record = read_json(result, RETRAIN_FIX)
    if "genotype" not in record:
        raise ValueError(f"{result}: damaged, no 'genotype'; {RETRAIN_FIX}")
    try:
        genotype = Genotype.from_dict(record["genotype"])
    except GenotypeError as exc:
        raise GenotypeError(f"{result}: {exc}") from None
    state = _load_state(weights)
    recorded = (record.get("data") or {}).get("input")  # [C, side, side] the model trained on
    # the side it trained on: recorded, configured, or (older runs of your own data) read
    # from the data's files, before --resolution, which only a run that says none may set
    known = ((recorded[-1] if recorded else None) or cfg.data.resolution
             or _own_data_side(cfg.data.name, cfg.data.root))
    if resolution is not None and known is not None and resolution != known:
        raise ExportError(f"{run} was trained on {known}x{known} inputs; --resolution "
                          f"{resolution} is for runs that record no side: drop it")
    side = known or resolution
    shape = infer_shape(state, cfg.data.name, side)
    _, model = build_network(cfg, genotype, shape)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # config.yaml and model.pt describe different networks
        what = " ".join(line.strip() for line in str(exc).splitlines()[:2])[:200]
        raise ExportError(
            f"{weights} does not fit the network {run / 'config.yaml'} and {result} describe "
            f"({what}...): was one of them edited or replaced? Restore it, or run the "
            "retraining again") from None
    model.drop_path_prob = 0.0
    return model.eval(), shape


def export_model(model: nn.Module, example: torch.Tensor, path: str | Path, fmt: str) -> Path:
    """Write ``model`` (eval mode) traced on ``example`` as ONNX or TorchScript. The batch
    dimension stays dynamic."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # torch marks tracing and the TorchScript-based ONNX exporter as deprecated; both
        # still produce files we check below, and need no extra packages.
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(model, example), str(path),
                           _extra_files={MARK_FILE: MARK})
        else:
            onnx = _require("onnx", "ONNX export")
            # the TorchScript-based exporter: the default of torch before 2.5 (which has no
            # ``dynamo`` argument), asked for by name after
            legacy = ({"dynamo": False} if "dynamo" in
                      inspect.signature(torch.onnx.export).parameters else {})
            torch.onnx.export(
                model, (example,), str(path), input_names=["input"],
                output_names=["logits"], opset_version=17,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **legacy,
            )
            proto = onnx.load(str(path))
            entry = proto.metadata_props.add()
            entry.key, entry.value = MARK_KEY, MARK
            onnx.save(proto, str(path))
            onnx.checker.check_model(proto)
    return path


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a model ``diffnas export`` wrote: its marker (an entry of the
    TorchScript archive, a metadata entry of the ONNX model) or, for exports made before
    the marker, the model description diffnas wrote beside it."""
    import zipfile

    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            marked = any(n.endswith(f"/extra/{MARK_FILE}") for n in names)
            model = any(n.endswith("/data.pkl") for n in names)  # a TorchScript archive
        else:
            import onnx

            proto = onnx.load(str(path), load_external_data=False)
            marked = any(p.key == MARK_KEY for p in proto.metadata_props)
            model = len(proto.graph.node) > 0
    except Exception:  # not a model, or no onnx package to read one: not known as ours
        return False
    # (a description diffnas wrote beside a file that is no model, e.g. a user's notes at
    # --out beside an earlier export's model.json, does not make the file ours)
    described = path.with_suffix(".json")
    return marked or (model and described.is_file()
                      and written_by_diffnas(described, DESCRIPTION_KEYS))


def run_exported(path: str | Path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """Outputs of an exported file on ``x``: TorchScript through torch.jit.load, ONNX
    through onnxruntime's CPU provider."""
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated
            return torch.jit.load(str(path), map_location="cpu")(x)
    ort = _require("onnxruntime", "checking an ONNX export")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def max_output_diff(model: nn.Module, path: str | Path, fmt: str,
                    inputs: list[torch.Tensor]) -> float:
    """Largest absolute difference between the PyTorch model and the exported file."""
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            ref, got = model.eval()(x), run_exported(path, fmt, x)
            if got.shape != ref.shape:
                raise ExportError(f"exported output shape {tuple(got.shape)} != "
                                  f"{tuple(ref.shape)}")
            worst = max(worst, (got.float() - ref.float()).abs().max().item())
    return worst


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None,
               atol: float = 1e-5, resolution: int | None = None, seed: int = 0,
               check: bool = True, force: bool = False, overrides: Sequence[str] = ()
               ) -> ExportResult:
    """Export a run's retrained network (default ``RUN_DIR/export/model.{onnx,pt}``) and
    check it against PyTorch on random batches of 2 and 5 inputs. An existing file at the
    path is replaced only when it is an earlier export (:func:`is_export`; with ``force``
    also a file of the user's), never when a run needs it (``retrain/model.pt``, ...)."""
    from diffnas.report.outputs import (
        WRITE_DENIED,
        cannot_write,
        check_output,
        check_writable,
    )

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if not math.isfinite(atol) or atol < 0:
        raise ExportError(f"--atol must be a finite number >= 0, got {atol}")
    if resolution is not None and not 1 <= resolution <= MAX_RESOLUTION:
        raise ExportError(f"--resolution must be between 1 and {MAX_RESOLUTION} pixels, "
                          f"got {resolution}")
    model, shape = load_retrained(run_dir, resolution, overrides)
    if fmt == "onnx":  # (after the run is read: a graph run is refused as such, not for this)
        _require("onnx", "ONNX export")
        if check:
            _require("onnxruntime", "checking an ONNX export")
    dims = (shape.in_channels, shape.resolution, shape.resolution)
    path = Path(out) if out is not None else Path(run_dir) / "export" / f"model{SUFFIX[fmt]}"
    if path.is_dir():
        raise ExportError(f"--out {path} is a directory; give the file to write, e.g. "
                          f"{path / ('model' + SUFFIX[fmt])}")
    if path.suffix == ".json":  # the model's description is written to PATH.json
        raise ExportError(f"--out {path}: .json is the name of the model's description "
                          f"written beside it; use {path.with_suffix(SUFFIX[fmt])}")
    other = {s: f for f, s in SUFFIX.items() if f != fmt}
    if path.suffix in other:  # a deployer loads a .pt with torch.jit, an .onnx with onnx
        raise ExportError(f"--out {path}: {path.suffix} is the suffix of "
                          f"{other[path.suffix]} files, not {fmt}; use "
                          f"{path.with_suffix(SUFFIX[fmt])}")
    flag = "--out" if out is not None else None
    # at the default path, the run's own export/ folder: any file of that name is an
    # earlier export (those made before the marker and without a description too)
    check_output(path, is_export if out is not None else (lambda p: True), "a model", flag,
                 force)
    # the description written beside it: never a run's file, never a user's (no --force)
    check_output(path.with_suffix(".json"), lambda p: True, "a model description", flag)
    _check_description_path(path.with_suffix(".json"))
    check_writable(path.parent, path, flag)
    info = model_info(run_dir, dims)  # a damaged record is refused before writing
    g = torch.Generator().manual_seed(seed)
    diff = None
    try:
        with staged_path(path) as staged:  # the file appears at path only once it passed
            export_model(model, torch.randn(2, *dims, generator=g), staged, fmt)
            if check:
                diff = max_output_diff(model, staged, fmt,
                                       [torch.randn(n, *dims, generator=g) for n in (2, 5)])
                if not diff <= atol:
                    raise ExportError(f"{path}: exported outputs differ from PyTorch by "
                                      f"{diff:.3g} (> atol {atol:g}); nothing was written")
        described = None
        if info is not None:
            described = path.with_suffix(".json")
            atomic_write_text(json.dumps(info, indent=1) + "\n", described)
    except OSError as exc:
        if exc.errno not in WRITE_DENIED:
            raise
        raise cannot_write(path, exc, flag) from None
    return ExportResult(path, fmt, (1, *dims), diff, atol, described)


def _check_description_path(described: Path) -> None:
    """Refuse to replace a JSON file beside the export that is not a model description
    diffnas wrote (a user's own file of that name), before anything is written."""
    if not written_by_diffnas(described, DESCRIPTION_KEYS):
        raise ExportError(f"{described} exists and is not a model description diffnas "
                          "wrote; the export writes one beside its file: move that file "
                          "or choose another --out")


def model_info(run_dir: str | Path, dims: tuple[int, ...]) -> dict | None:
    """The ``model.json`` written beside an exported model: what to feed it (shape,
    normalisation of raw pixels) and what its outputs mean (class names), read from the
    run's retraining result; None for runs retrained before the result recorded its
    data."""
    result_path = Path(run_dir) / "retrain" / "result.json"
    result = read_json(result_path, RETRAIN_FIX)
    data = result.get("data")
    if data is None:
        return None
    missing = [k for k in ("mean", "std", "classes", "name")
               if not isinstance(data, dict) or k not in data]
    if missing:
        raise ExportError(f"{result_path}: damaged, its 'data' entry lacks "
                          f"{', '.join(missing)}; {RETRAIN_FIX}")
    return {
        "input_shape": ["batch", *dims],
        "preprocess": "resize to input_shape (see resize), then (pixels - mean) / std per "
                      "channel, with pixels in the units the dataset was read in (0..255 "
                      "for 8-bit images)",
        "resize": resize_text(data["name"], _configured_data(run_dir, "resolution"), dims[-1]),
        "mean": data["mean"], "std": data["std"],
        "outputs": "logits, one per class (index = label)",
        "classes": data["classes"], "dataset": data["name"],
        "test_acc": result.get("test_acc"),
        "test_images": test_images_text(run_dir, data["name"]),
    }


def _configured_data(run_dir: str | Path, key: str) -> int | None:
    """The run's ``data.<key>`` (an int: ``resolution``, ``test_subset``) as its
    ``config.yaml`` holds it (read as written: the description needs this one value, not
    a validated config)."""
    from diffnas.config import ConfigError, _load_yaml, read_utf8

    path = Path(run_dir) / "config.yaml"
    try:
        value = _load_yaml(read_utf8(path, "run config"), str(path))["data"].get(key)
    except (OSError, ConfigError, KeyError, TypeError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def test_images_text(run_dir: str | Path, dataset: str) -> str:
    """Which test images ``test_acc`` was measured on, for a deployment to check it on the
    same ones: all of the dataset's, or ``data.test_subset`` of them, drawn as
    ``data/base.subset`` draws them (seed recorded in ``retrain/test_subset.json``)."""
    from diffnas.data.registry import TEST_SUBSET_SEED
    from diffnas.engine.rundir import TEST_SUBSET_FILE

    n = _configured_data(run_dir, "test_subset")
    if n is None:
        return f"all the test images of {dataset}"
    try:  # (read, not test_subset_seed: that one records a choice when there is none)
        seed = read_json(Path(run_dir) / "retrain" / TEST_SUBSET_FILE, "").get("seed")
    except (OSError, ValueError):
        seed = None
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else TEST_SUBSET_SEED
    return (f"data.test_subset={n} of the test images of {dataset} (all of them where it "
            f"has no more): torch.randperm(N, generator=torch.Generator().manual_seed({seed}))"
            f"[:{n}] of its N test images in their stored order")


def resize_text(dataset: str, resolution: int | None, side: int) -> str:
    """How the training images were brought to ``side`` x ``side``, for a deployment to
    do the same: not at all (``data.resolution`` unset), Pillow's bilinear filter as a
    ``folder`` image was read, a plugin loader's own way (one that takes ``resolution``),
    else ``torch.nn.functional.interpolate`` on the loaded tensors (``data/base.resize``;
    linear, so before or after the normalisation is the same)."""
    if resolution is None:
        return f"none: the network trained on the images as stored ({side}x{side})"
    if dataset == "folder":
        return (f"each image resized to {side}x{side} with Pillow's bilinear filter "
                "(Image.resize(size, Image.Resampling.BILINEAR)) as it was read; images "
                "already that size unchanged")
    from diffnas.data import DATASETS

    loader = DATASETS.get(dataset) if dataset in DATASETS else None
    if loader is None:  # (a plugin not imported here)
        return (f"resized to {side}x{side} (data.resolution) as dataset {dataset!r} was "
                "loaded: see its loader")
    if not loader.__module__.startswith("diffnas.") and \
            "resolution" in inspect.signature(loader).parameters:
        return (f"resized to {side}x{side} by the loader of dataset {dataset!r} (a plugin "
                "that resizes as it reads: see its code)")
    return (f"resized to {side}x{side} with torch.nn.functional.interpolate: mode 'area' "
            "when shrinking, 'bilinear' (align_corners=False) when enlarging")
