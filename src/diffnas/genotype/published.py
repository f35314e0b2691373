"""Published genotypes, by name, in the papers' own text form."""

from __future__ import annotations

from pathlib import Path

from diffnas.genotype.genotype import Genotype, GenotypeError, from_darts_str

PUBLISHED: dict[str, str] = {
    # Liu et al., DARTS (ICLR 2019): first-order (V1) and second-order (V2) CIFAR-10 cells.
    "DARTS_V1": (
        "Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), "
        "('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
        "('skip_connect', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "
        "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0), ('max_pool_3x3', 0), "
        "('skip_connect', 2), ('skip_connect', 2), ('avg_pool_3x3', 0)], "
        "reduce_concat=[2, 3, 4, 5])"
    ),
    "DARTS_V2": (
        "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
        "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), "
        "('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "
        "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
        "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], "
        "reduce_concat=[2, 3, 4, 5])"
    ),
    # DARTS recurrent cells for Penn Treebank.
    "DARTS_RNN_V1": (
        "Genotype(recurrent=[('relu', 0), ('relu', 1), ('tanh', 2), ('relu', 3), ('relu', 4), "
        "('identity', 1), ('relu', 5), ('relu', 1)], concat=range(1, 9))"
    ),
    "DARTS_RNN_V2": (
        "Genotype(recurrent=[('sigmoid', 0), ('relu', 1), ('relu', 1), ('identity', 1), "
        "('tanh', 2), ('sigmoid', 5), ('tanh', 3), ('relu', 5)], concat=range(1, 9))"
    ),
}


def published_genotype(name: str) -> Genotype:
    if name not in PUBLISHED:
        raise GenotypeError(f"unknown published genotype {name!r}; known: {sorted(PUBLISHED)}")
    return from_darts_str(PUBLISHED[name])


def resolve_genotype(ref: str) -> Genotype:
    """A published name (e.g. ``DARTS_V2``) or a path to a genotype file."""
    if ref in PUBLISHED:
        return published_genotype(ref)
    if ref.lstrip().startswith("Genotype("):
        raise GenotypeError("the genotype is DARTS Genotype(...) text, not a file name: save "
                            "that text in a file and give the file's path")
    if Path(ref).is_dir():
        run = Path(ref) / "search" / "genotype.json"
        hint = f" (this run's: {run})" if run.is_file() else ""
        raise GenotypeError(f"{ref} is a folder: give a genotype file{hint} or a published "
                            f"name ({', '.join(sorted(PUBLISHED))})")
    if not Path(ref).is_file():  # a mistyped name should not read as a missing file only
        raise GenotypeError(f"genotype file not found: {ref}, and not a published genotype "
                            f"name either; published: {', '.join(sorted(PUBLISHED))}")
    if Path(ref).suffix == ".jsonl":  # a search's per-epoch record, not one genotype
        final = Path(ref).with_name("genotype.json")
        hint = f" (the search's final one: {final})" if final.is_file() else ""
        raise GenotypeError(f"{ref} holds one genotype per line (a search's per-epoch "
                            f"record); give one genotype's file{hint}, or save the line you "
                            "want without its 'epoch' key as a .json file")
    return Genotype.load(ref)
