"""NAS-Bench-201 results lookup: the accuracy of a cell for a dataset and a metric.

Two backends answer the same interface (:class:`Nb201Benchmark`):

- :class:`CsvNb201Table`: a CSV (optionally gzipped) with one row per cell and the columns
  ``index, arch_str`` plus accuracy columns named ``<setting>_<split>_<epochs>`` such as
  ``c10valid_valid_200`` or ``c10_test_200`` (see :data:`COLUMNS`). The project never
  ships the table; users pass its path.
- :class:`ApiNb201Table`: the official NATS-Bench (``nats_bench``, topology space ``tss``)
  or NAS-Bench-201 (``nas_201_api``) files through their API packages, when installed
  (``pip install diffnas[nb201]``).

A cell can be given as a :class:`Genotype`, its official string, the six op names, or the
benchmark's index (an arbitrary order fixed by the benchmark's authors).
"""

from __future__ import annotations

import csv
import gzip
import importlib
import inspect
import io
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffnas.genotype import Genotype, GenotypeError
from diffnas.spaces.nb201 import (
    NB201_OPS,
    genotype_to_ops,
    ops_to_genotype,
    ops_to_str,
    str_to_ops,
)

#: (dataset, split, epochs) -> column. "cifar10-valid" is the benchmark's setting that
#: trains on half of CIFAR-10 train and validates on the other half.
COLUMNS: dict[tuple[str, str, int], str] = {
    ("cifar10-valid", "valid", 200): "c10valid_valid_200",
    ("cifar10-valid", "test", 200): "c10valid_test_200",
    ("cifar10", "test", 200): "c10_test_200",
    ("cifar100", "test", 200): "c100_test_200",
    ("ImageNet16-120", "test", 200): "in16_test_200",
    ("cifar10", "test", 12): "c10_test_12",
    ("cifar10-valid", "valid", 12): "c10valid_valid_12",
    ("cifar100", "valid", 12): "c100_valid_12",
    ("ImageNet16-120", "valid", 12): "in16_valid_12",
}
ALL_METRICS: tuple[str, ...] = tuple(COLUMNS.values())
#: What a search may see: validation accuracy after 200 epochs (CIFAR-10 "valid" setting).
SEARCH_METRIC = "c10valid_valid_200"
#: What the chosen cell is reported by (never visible to a search).
REPORT_METRICS: tuple[str, ...] = ("c10_test_200", "c100_test_200", "in16_test_200")
TEST_METRICS: tuple[str, ...] = tuple(m for (_, split, _), m in COLUMNS.items() if split == "test")

Arch = Genotype | str | int | Sequence[str]


class Nb201BackendError(ImportError, ValueError):
    """The official API backend cannot be used (its package is missing or too old): an
    ImportError for code that catches those, a ValueError so the command line reports
    it in one line."""


class Nb201Benchmark(ABC):
    """Index <-> string mapping and per-metric accuracy (percent) of every cell."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def arch_str(self, index: int) -> str:
        """The official string of the cell at benchmark ``index``."""

    @abstractmethod
    def _index_of_str(self, arch_str: str) -> int: ...

    @abstractmethod
    def _value(self, index: int, metric: str) -> float:
        """Accuracy of cell ``index`` under column ``metric`` (already validated)."""

    @property
    @abstractmethod
    def metrics(self) -> tuple[str, ...]:
        """Columns this backend can answer."""

    # --- conversions ----------------------------------------------------------------------
    def index_of(self, arch: Arch) -> int:
        """Benchmark index of a genotype, string, op tuple or index."""
        if isinstance(arch, (bool, np.bool_)):  # True is an int to Python, not a cell
            raise GenotypeError(f"{arch!r} is not an nb201 cell: pass a genotype, an nb201 "
                                "string, six op names or a benchmark index")
        if isinstance(arch, (int, np.integer)):
            index = int(arch)
            if not 0 <= index < len(self):
                raise GenotypeError(f"nb201 index {index} out of range 0..{len(self) - 1}")
            return index
        return self._index_of_str(self.canonical_str(arch))

    def genotype(self, index: int) -> Genotype:
        return ops_to_genotype(str_to_ops(self.arch_str(self.index_of(index))))

    @staticmethod
    def canonical_str(arch: Genotype | str | Sequence[str]) -> str:
        """The official string of a genotype, string (checked) or six op names."""
        if isinstance(arch, Genotype):
            return ops_to_str(genotype_to_ops(arch))
        if isinstance(arch, str):
            return ops_to_str(str_to_ops(arch))
        ops = tuple(arch)
        for op in ops:  # else an index or a typo would only be "not in the table"
            if not isinstance(op, str) or op not in NB201_OPS:
                hint = (" (op indices are not accepted: diffnas.nasbench.encoding.cell_names "
                        "turns them into names)" if not isinstance(op, str) else "")
                raise GenotypeError(f"unknown nb201 op {op!r} in {ops}; ops: "
                                    f"{', '.join(NB201_OPS)}{hint}")
        return ops_to_str(ops)

    # --- lookups --------------------------------------------------------------------------
    def query(self, arch: Arch, metric: str = SEARCH_METRIC) -> float:
        """Accuracy (percent) of ``arch`` under column ``metric``."""
        if metric not in self.metrics:
            raise KeyError(f"unknown nb201 metric {metric!r}; this table has {list(self.metrics)}")
        return self._value(self.index_of(arch), metric)

    def accuracy(self, arch: Arch, dataset: str = "cifar10", split: str = "test",
                 epochs: int = 200) -> float:
        """Accuracy of ``arch`` on ``dataset`` (cifar10-valid, cifar10, cifar100,
        ImageNet16-120), ``split`` (valid or test) after ``epochs`` (200 or 12)."""
        key = (dataset, split, int(epochs))
        if key not in COLUMNS:
            have = ", ".join(f"{d}/{s}/{e}" for d, s, e in COLUMNS)
            raise KeyError(f"no nb201 results for {dataset}/{split}/{epochs}; have: {have}")
        return self.query(arch, COLUMNS[key])

    def record(self, arch: Arch) -> dict[str, float | int | str]:
        """Every metric of ``arch`` with its index and string (for reports, never search)."""
        index = self.index_of(arch)
        out: dict[str, float | int | str] = {"index": index, "arch_str": self.arch_str(index)}
        out.update({m: self._value(index, m) for m in self.metrics})
        return out


class CsvNb201Table(Nb201Benchmark):
    """The results table as a CSV (``.csv`` or ``.csv.gz``), loaded into memory."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(
                f"NAS-Bench-201 table not found: {p} (pass the path of nb201_compact.csv.gz "
                "or a CSV with columns index, arch_str, c10valid_valid_200, ...)"
            )
        self.path = p
        try:
            raw = gzip.open(p, "rt") if p.suffix == ".gz" else p.open("r", newline="")
            with raw as f:
                rows = list(csv.reader(io.StringIO(f.read())))
        except (EOFError, UnicodeDecodeError, gzip.BadGzipFile, csv.Error) as exc:
            # cut short, not gzip, not text: a download or copy gone wrong
            raise ValueError(f"{p}: not a readable NAS-Bench-201 table "
                             f"({type(exc).__name__}: {exc}); fetch or copy it again "
                             "(see docs/nb201.md)") from None
        if not rows:
            raise ValueError(f"{p}: empty NAS-Bench-201 table")
        header = rows[0]
        twice = sorted({h for h in header if header.count(h) > 1})
        if twice:  # (the last copy's values would silently win)
            raise ValueError(f"{p}: column(s) {', '.join(twice)} appear more than once in "
                             "the header")
        for need in ("index", "arch_str"):
            if need not in header:
                raise ValueError(f"{p}: NAS-Bench-201 table lacks column {need!r}; has {header}")
        self._metrics = tuple(m for m in header if m in ALL_METRICS)
        if not self._metrics:
            raise ValueError(f"{p}: no accuracy columns among {header}; expected {ALL_METRICS}")
        col = {name: i for i, name in enumerate(header)}
        body = [r for r in rows[1:] if r]  # (a blank last line)
        n = len(body)
        parsed = [self._row(p, line, r, col) for line, r in enumerate(body, 2)]
        if sorted(index for index, _, _ in parsed) != list(range(n)):
            raise ValueError(f"{p}: the index column must hold 0..{n - 1} once each")
        self._strs = [""] * n
        self._data = {m: np.empty(n) for m in self._metrics}
        for index, arch, values in parsed:
            self._strs[index] = arch
            for m, v in zip(self._metrics, values, strict=True):
                self._data[m][index] = v
        self._by_str = {s: i for i, s in enumerate(self._strs)}
        if len(self._by_str) != n:
            raise ValueError(f"{p}: some arch_str appears more than once")

    def _row(self, path: Path, line: int, row: list[str],
             col: dict[str, int]) -> tuple[int, str, list[float]]:
        """(index, canonical arch string, metric values) of one CSV row; a short row or
        a value that is not a number is a ``ValueError`` naming the file and line."""
        if len(row) < len(col):
            raise ValueError(f"{path}, line {line}: {len(row)} values for {len(col)} columns")
        try:
            index = int(row[col["index"]])
            values = [float(row[col[m]]) for m in self._metrics]
            bad = [m for m, v in zip(self._metrics, values, strict=True) if not math.isfinite(v)]
            if bad:
                raise ValueError(f"{', '.join(bad)} not finite (NaN or inf)")
            arch = ops_to_str(str_to_ops(row[col["arch_str"]]))
        except ValueError as exc:  # GenotypeError is one too
            raise ValueError(f"{path}, line {line}: {exc}") from None
        return index, arch, values

    def __len__(self) -> int:
        return len(self._strs)

    @property
    def metrics(self) -> tuple[str, ...]:
        return self._metrics

    def arch_str(self, index: int) -> str:
        return self._strs[self.index_of(index)]

    def _index_of_str(self, arch_str: str) -> int:
        try:
            return self._by_str[arch_str]
        except KeyError:
            raise GenotypeError(f"cell {arch_str} is not in the table {self.path}") from None

    def _value(self, index: int, metric: str) -> float:
        return float(self._data[metric][index])

    def column(self, metric: str) -> np.ndarray:
        """All values of ``metric`` by benchmark index (a copy; for analysis and tests)."""
        if metric not in self._data:
            raise KeyError(f"unknown nb201 metric {metric!r}; this table has {list(self.metrics)}")
        return self._data[metric].copy()


# --- the official API files ---------------------------------------------------------------
#: column -> (dataset, key of get_more_info, hp)
_API_FIELDS: dict[str, tuple[str, str, str]] = {
    "c10valid_valid_200": ("cifar10-valid", "valid-accuracy", "200"),
    "c10valid_test_200": ("cifar10-valid", "test-accuracy", "200"),
    "c10_test_200": ("cifar10", "test-accuracy", "200"),
    "c100_test_200": ("cifar100", "test-accuracy", "200"),
    "in16_test_200": ("ImageNet16-120", "test-accuracy", "200"),
    "c10_test_12": ("cifar10", "test-accuracy", "12"),
    "c10valid_valid_12": ("cifar10-valid", "valid-accuracy", "12"),
    "c100_valid_12": ("cifar100", "valid-accuracy", "12"),
    "in16_valid_12": ("ImageNet16-120", "valid-accuracy", "12"),
}


class ApiNb201Table(Nb201Benchmark):
    """The official benchmark files through ``nats_bench`` (``create(path, 'tss')``) or
    ``nas_201_api`` (``API(path)``). Accuracies are seed averages (``is_random=False``) at
    the last epoch of the ``hp`` schedule, as in the CSV table."""

    def __init__(self, path: str | Path | None, package: str = "auto") -> None:
        self.package, self.api = _open_api(path, package)
        self._cache: dict[tuple[int, str, str], dict] = {}

    def __len__(self) -> int:
        return len(self.api)

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(_API_FIELDS)

    def arch_str(self, index: int) -> str:
        return ops_to_str(str_to_ops(self.api.arch(self.index_of(index))))

    def _index_of_str(self, arch_str: str) -> int:
        index = int(self.api.query_index_by_arch(arch_str))
        if index < 0:
            raise GenotypeError(f"cell {arch_str} is not in the benchmark")
        return index

    def _value(self, index: int, metric: str) -> float:
        dataset, key, hp = _API_FIELDS[metric]
        ck = (index, dataset, hp)
        if ck not in self._cache:
            self._cache[ck] = self.api.get_more_info(index, dataset, iepoch=None, hp=hp,
                                                     is_random=False)
        return float(self._cache[ck][key])


def _open_api(path: str | Path | None, package: str):
    names = ("nats_bench", "nas_201_api") if package == "auto" else (package,)
    for name in names:
        if name not in ("nats_bench", "nas_201_api"):
            raise ValueError(f"unknown NAS-Bench-201 backend {name!r}: auto, csv, "
                             "nats_bench or nas_201_api")
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        p = None if path is None else str(path)
        if name == "nats_bench":
            return name, mod.create(p, "tss", fast_mode=True, verbose=False)
        api = mod.API(p, verbose=False)
        if "hp" not in inspect.signature(api.get_more_info).parameters:
            raise Nb201BackendError(  # v1.x: use_12epochs_result instead of hp
                "nas_201_api before v2.0 has no hp= in get_more_info, which this backend "
                "reads: upgrade nas-bench-201 (>= 2.0) or use nats_bench "
                "(pip install 'diffnas[nb201]')")
        return name, api
    where = f" ({path} is not a .csv or .csv.gz table; --backend csv reads it as one)" \
        if path is not None and Path(path).is_file() else ""
    raise Nb201BackendError(
        "the NAS-Bench-201 API backend needs the package nats_bench (pip install "
        "'diffnas[nb201]') or nas-bench-201, plus the benchmark file; or use the CSV "
        f"table{where}")


def open_benchmark(path: str | Path | None, backend: str = "auto") -> Nb201Benchmark:
    """A CSV table for ``*.csv``/``*.csv.gz`` paths, the official API otherwise
    (``backend``: auto, csv, nats_bench, nas_201_api)."""
    if backend == "csv" or (backend == "auto" and path is not None
                            and str(path).endswith((".csv", ".csv.gz"))):
        if path is None:
            raise ValueError("the CSV backend needs a table path")
        return CsvNb201Table(path)
    if path is not None and not Path(path).exists():  # before asking for the API package
        raise FileNotFoundError(
            f"NAS-Bench-201 file not found: {path} (pass the path of nb201_compact.csv.gz, "
            "or of the official benchmark file or folder for the API backend)")
    return ApiNb201Table(path, "auto" if backend == "auto" else backend)
