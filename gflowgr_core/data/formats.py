"""Format names and the loader of each: ``load_interactions(format, path)`` for every format ``gflowgr prepare``
reads. Kept apart from :mod:`gflowgr_core.data.loaders` so that the MiniOneRec loader, which builds on the
loaders' types, is not imported back by them."""
from __future__ import annotations

from pathlib import Path

from gflowgr_core.data.loaders import Interactions, load_csv, load_letter, load_ml100k, load_p5
from gflowgr_core.data.minionerec import load_minionerec

FORMATS = ("letter", "p5", "csv", "minionerec", "ml100k")


def load_interactions(format: str, path: str | Path | None = None, **kwargs) -> Interactions:
    """Load interactions by format name.

    Args:
        format: one of ``"letter"``, ``"p5"``, ``"csv"``, ``"minionerec"``, ``"ml100k"``.
        path: the file or folder (not used by ``"ml100k"``).
        **kwargs: passed to :func:`load_csv` (column names, separator); only valid for ``"csv"``.
    """
    name = format.lower()
    if name not in FORMATS:
        raise ValueError(f"unknown interaction format {format!r}; expected one of {list(FORMATS)}")
    if kwargs and name != "csv":
        raise ValueError(f"format {name!r} takes no options, got {sorted(kwargs)}")
    if name == "ml100k":
        if path is not None:
            raise ValueError("format 'ml100k' reads the copy bundled with recbole; it takes no path")
        return load_ml100k()
    if path is None:
        raise ValueError(f"format {name!r} needs a path")
    if name == "letter":
        return load_letter(path)
    if name == "p5":
        return load_p5(path)
    if name == "minionerec":
        return load_minionerec(path)
    return load_csv(path, **kwargs)
