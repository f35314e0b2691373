"""Graphs for node classification: Cora (Planetoid split) and Zachary's karate club.

``cora`` reads the Planetoid files of the public GCN release (Kipf & Welling, 2017;
https://github.com/kimiyoung/planetoid or https://github.com/tkipf/gcn, ``data/``):
``ind.cora.{x,y,tx,ty,allx,ally,graph,test.index}`` in ``data.root``. They are Python-2
pickles (``x``, ``tx``, ``allx`` scipy sparse matrices, ``y``, ``ty``, ``ally`` one-hot
arrays, ``graph`` a dict of adjacency lists) and a text list of test node ids. The
assembly follows the GCN code: features ``vstack(allx, tx)`` with the test rows put back
at their node ids, the standard split (train = the first 140 nodes, val = the next 500,
test = the 1000 nodes of ``test.index``), features normalised to unit row sums.

``karate`` is networkx's ``karate_club_graph()`` (34 nodes, 2 clubs), one-hot node
features, a fixed split (the first 4 nodes of each club train, the next 4 validate, the
other 18 test): a graph for quick runs and tests that needs no files.

Edges (``edge_index``, shape ``(2, E)``, rows source and target) are symmetric, without
duplicates, and include one self loop per node; :meth:`GraphData.adjacency` gives the
same as a sparse tensor.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffnas.data.base import DataFormatError, DatasetNotFoundError
from diffnas.data.registry import register_files_check
from diffnas.registry import Registry

CORA_FILES = ("x", "y", "tx", "ty", "allx", "ally", "graph", "test.index")
#: Planetoid's validation split: the nodes right after the training rows (Kipf & Welling)
CORA_VAL_NODES = 500

CORA_HELP = ("get the Planetoid files ind.cora.{x,y,tx,ty,allx,ally,graph,test.index} from "
             "https://github.com/kimiyoung/planetoid/tree/master/data (or tkipf/gcn, "
             "gcn/data) and pass their directory as data.root=/path/to/cora")


@dataclass
class GraphData:
    """One graph with node features, labels and a train/val/test node split."""

    name: str
    x: torch.Tensor  # (N, F) float node features
    y: torch.Tensor  # (N,) long labels
    edge_index: torch.Tensor  # (2, E) long: symmetric, deduplicated, with self loops
    train_idx: torch.Tensor  # long node ids
    val_idx: torch.Tensor
    test_idx: torch.Tensor
    num_classes: int

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    @property
    def num_features(self) -> int:
        return self.x.shape[1]

    def adjacency(self) -> torch.Tensor:
        """The adjacency (self loops included) as a sparse COO ``(N, N)`` tensor."""
        ones = torch.ones(self.edge_index.shape[1], device=self.edge_index.device)
        return torch.sparse_coo_tensor(self.edge_index, ones,
                                       (self.num_nodes, self.num_nodes),
                                       check_invariants=True).coalesce()

    def to(self, device: torch.device | str) -> GraphData:
        t = {k: getattr(self, k).to(device) for k in
             ("x", "y", "edge_index", "train_idx", "val_idx", "test_idx")}
        return GraphData(self.name, num_classes=self.num_classes, **t)


GraphLoader = Callable[[str | None], GraphData]
GRAPH_DATASETS: Registry[GraphLoader] = Registry("graph dataset")


def register_graph_dataset(name: str) -> Callable[[GraphLoader], GraphLoader]:
    """Decorator: register ``loader(root) -> GraphData`` as graph dataset ``name``, read by
    the graph engine (``data.name=NAME`` with ``search.space.name=gnn``)."""
    return GRAPH_DATASETS.register(name)


def load_graph(name: str, root: str | None = None) -> GraphData:
    """The graph dataset ``name`` (files in ``root`` where it needs any)."""
    return GRAPH_DATASETS.get(name)(root)


def symmetric_edges(src: np.ndarray, dst: np.ndarray, num_nodes: int) -> torch.Tensor:
    """``edge_index`` of the undirected graph with edges ``src - dst``: both directions,
    no duplicates, every self loop once; sorted by (target, source)."""
    s = np.concatenate([src, dst, np.arange(num_nodes)])
    d = np.concatenate([dst, src, np.arange(num_nodes)])
    key = np.unique(d.astype(np.int64) * num_nodes + s.astype(np.int64))
    return torch.from_numpy(np.stack([key % num_nodes, key // num_nodes])).long()


def row_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to sum 1 (all-zero rows stay zero), as the GCN code does."""
    s = x.sum(1, keepdim=True)
    return x / torch.where(s == 0, torch.ones_like(s), s)


# --- Cora --------------------------------------------------------------------------------
def _read_pickle(path: Path):
    try:
        with path.open("rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old scipy module paths inside the pickles
            return pickle.load(f, encoding="latin1")
    except Exception as exc:  # noqa: BLE001  (any unpickling failure: the file is bad)
        raise DataFormatError(f"Cora: cannot read {path} ({type(exc).__name__}: {exc}); "
                              f"{CORA_HELP}") from None


def _dense(m, path: Path, rows: int | None = None) -> np.ndarray:
    arr = m.toarray() if hasattr(m, "toarray") else np.asarray(m)
    if arr.ndim != 2 or (rows is not None and arr.shape[0] != rows):
        raise DataFormatError(f"Cora: {path} holds an array of shape {arr.shape}, expected a "
                              f"matrix{'' if rows is None else f' with {rows} rows'}; {CORA_HELP}")
    return arr.astype(np.float32)


@register_files_check("cora")
def cora_files(root: str | None, download: bool = False) -> dict[str, Path]:
    """The Planetoid files ``ind.cora.*`` in ``root``, by suffix."""
    if root is None:
        raise DatasetNotFoundError(f"Cora: data.root is not set; {CORA_HELP}")
    d = Path(root)
    paths = {n: d / f"ind.cora.{n}" for n in CORA_FILES}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(f"Cora: missing {', '.join(missing)}; {CORA_HELP}")
    return paths


@register_graph_dataset("cora")
def load_cora(root: str | None) -> GraphData:
    """Cora with the standard Planetoid split (140 / 500 / 1000); see the module text."""
    paths = cora_files(root)
    obj = {n: _read_pickle(paths[n]) for n in CORA_FILES if n != "test.index"}
    try:
        test_order = np.array([int(ln) for ln in paths["test.index"].read_text().split()])
    except ValueError:
        raise DataFormatError(f"Cora: {paths['test.index']} must list one node id per line; "
                              f"{CORA_HELP}") from None
    x, y = _dense(obj["x"], paths["x"]), _dense(obj["y"], paths["y"])
    allx, ally = _dense(obj["allx"], paths["allx"]), _dense(obj["ally"], paths["ally"])
    tx = _dense(obj["tx"], paths["tx"], len(test_order))
    ty = _dense(obj["ty"], paths["ty"], len(test_order))
    if allx.shape[0] != ally.shape[0] or x.shape[0] != y.shape[0]:
        raise DataFormatError(f"Cora: allx/ally or x/y row counts differ in {root}; {CORA_HELP}")
    graph = obj["graph"]
    if not isinstance(graph, dict):
        raise DataFormatError(f"Cora: {paths['graph']} must hold a dict of adjacency lists, got "
                              f"{type(graph).__name__}; {CORA_HELP}")
    test_sorted = np.sort(test_order)
    features = np.concatenate([allx, tx])
    labels = np.concatenate([ally, ty])
    n = features.shape[0]
    if test_sorted.min() < allx.shape[0] or test_sorted.max() >= n:
        raise DataFormatError(f"Cora: {paths['test.index']} names nodes outside "
                              f"{allx.shape[0]}..{n - 1}; {CORA_HELP}")
    if not np.array_equal(test_sorted, np.arange(allx.shape[0], n)):  # (the reorder needs
        raise DataFormatError(f"Cora: {paths['test.index']} must name each of the nodes "  # all)
                              f"{allx.shape[0]}..{n - 1} once; {CORA_HELP}")
    # the test rows come in test.index order; put them back at their node ids (GCN code)
    features[test_order] = features[test_sorted]
    labels[test_order] = labels[test_sorted]
    src = np.array([int(s) for s, ns in graph.items() for _ in ns], dtype=np.int64)
    dst = np.array([int(t) for ns in graph.values() for t in ns], dtype=np.int64)
    if len(src) and (max(src.max(), dst.max()) >= n or min(src.min(), dst.min()) < 0):
        raise DataFormatError(f"Cora: {paths['graph']} names nodes outside 0..{n - 1}")
    keep = src != dst  # self loops are added once for every node below
    n_train = y.shape[0]
    if n_train + CORA_VAL_NODES > allx.shape[0]:  # else validation would reach test nodes
        raise DataFormatError(
            f"Cora: {paths['x']} has {n_train} training rows and {paths['allx']} "
            f"{allx.shape[0]}: the {CORA_VAL_NODES} validation nodes that follow the "
            f"training ones must end before the test nodes ({allx.shape[0]}..{n - 1}); "
            f"{CORA_HELP}")
    return GraphData(
        name="cora",
        x=row_normalize(torch.from_numpy(features)),
        y=torch.from_numpy(labels.argmax(1)).long(),
        edge_index=symmetric_edges(src[keep], dst[keep], n),
        train_idx=torch.arange(n_train),
        val_idx=torch.arange(n_train, n_train + CORA_VAL_NODES),
        test_idx=torch.from_numpy(test_sorted).long(),
        num_classes=labels.shape[1],
    )


# --- karate club ---------------------------------------------------------------------------
@register_graph_dataset("karate")
def load_karate(root: str | None = None) -> GraphData:
    """Zachary's karate club from networkx (no files): one-hot features, 2 classes."""
    import networkx as nx  # a torch dependency; imported here to keep imports light

    g = nx.karate_club_graph()
    n = g.number_of_nodes()
    y = torch.tensor([0 if g.nodes[i]["club"] == "Mr. Hi" else 1 for i in range(n)])
    e = np.array(list(g.edges()), dtype=np.int64)
    per_class = [torch.nonzero(y == c).flatten() for c in (0, 1)]
    train = torch.cat([p[:4] for p in per_class]).sort().values
    val = torch.cat([p[4:8] for p in per_class]).sort().values
    test = torch.cat([p[8:] for p in per_class]).sort().values
    return GraphData("karate", torch.eye(n), y, symmetric_edges(e[:, 0], e[:, 1], n),
                     train, val, test, 2)
