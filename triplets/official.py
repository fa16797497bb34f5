"""The official ReliableSwap trainer's list files (ygtxr1997/ReliableSwap,
``modules/dataset/dataloader.py: TripletTrainDataset``):

* ``triplet.pickle`` — a pickled ``list`` of triplet folder paths (``str``), each folder holding
  ``source.jpg``, ``target.jpg``, ``output_st.jpg``, ``output_ts.jpg``;
* the vanilla pickle — a pickled ``list`` of ``(image_path, quality)`` tuples; the trainer sorts by
  quality (higher first), keeps the top k, and takes the identity from the image's parent folder
  (``path.split("/")[-2]``).

Both are written with absolute paths (the official files hold absolute paths too) and read back
with an unpickler that refuses every global: these lists need none, and a pickle that names one
(``os.system``…) is refused without running anything.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from triplets.errors import UserError
from triplets.jsonl import atomic_write_bytes

TRIPLET_PICKLE = "triplet.pickle"
VANILLA_PICKLE = "vanilla.pickle"


class ListPickleRefused(UserError, pickle.UnpicklingError):
    """An official list pickle that is not a plain list (or names code to load)."""


class _NoGlobals(pickle.Unpickler):
    """Lists, tuples, strings and numbers only: any global is refused."""

    def find_class(self, module, name):  # noqa: D102
        raise ListPickleRefused(f"refusing to load {module}.{name} from a list pickle")


def load_list_pickle(path: str | os.PathLike) -> list:
    """A pickled list of plain values (no globals admitted)."""
    with open(path, "rb") as f:
        try:
            items = _NoGlobals(f).load()
        except ListPickleRefused as e:
            raise ListPickleRefused(f"{path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as e:
            raise ListPickleRefused(f"{path}: not a readable list pickle ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(items, list):
        raise ListPickleRefused(f"{path}: expected a pickled list, got {type(items).__name__}")
    return items


def write_triplet_pickle(path: str | os.PathLike, folders: list[str | os.PathLike]) -> Path:
    """``triplet.pickle``: the folders as absolute path strings, in order."""
    return atomic_write_bytes(path, pickle.dumps([str(Path(f).resolve()) for f in folders], protocol=4))


def write_vanilla_pickle(path: str | os.PathLike, items: list[tuple[str | os.PathLike, float]]) -> Path:
    """The vanilla list: ``(absolute image path, quality)`` tuples; the image's parent folder is
    its identity for the official trainer."""
    return atomic_write_bytes(path, pickle.dumps([(str(Path(p).resolve()), float(q)) for p, q in items], protocol=4))


def read_triplet_pickle(path: str | os.PathLike) -> list[Path]:
    return [Path(str(p)) for p in load_list_pickle(path)]


def read_vanilla_pickle(path: str | os.PathLike) -> list[tuple[str, float]]:
    items = load_list_pickle(path)
    if not all(isinstance(t, tuple) and len(t) == 2 for t in items):
        raise ListPickleRefused(f"{path}: expected (path, quality) tuples")
    return [(str(p), float(q)) for p, q in items]
