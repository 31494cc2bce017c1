"""The benchmark suites behind ``fastattn bench``: a module per suite, each with
``cases(device, quick) -> list[common.Case]``; ``common`` times them, ``report`` turns the rows
into a table, CSV/JSON and plots. ``distributed`` is a script of its own (``python -m
fastattn.bench.distributed``): its cases need a process group per world size.

Nothing here is imported by ``import fastattn``.
"""
import importlib

SUITES = ("flash", "sparse", "linear", "varlen", "decode", "mla", "block", "models", "flex")
# Selections of the suites' cases at chosen configs, run only when named (--suite headline).
SELECTIONS = ("headline",)


def suite(name: str):
    """The module of one suite, imported on demand."""
    if name not in SUITES + SELECTIONS:
        raise ValueError(f"unknown benchmark suite {name!r}; have {', '.join(SUITES + SELECTIONS)}")
    return importlib.import_module(f"fastattn.bench.{name}")
