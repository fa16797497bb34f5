"""Light dataset package for face-swap triplets (numpy, torch, Pillow, pydantic only).

It never imports :mod:`reliableswap`, so a trainer can depend on it alone. It holds the file
contracts shared by every command: schema tags, typed records with one reader/writer each
(:mod:`triplets.records`), atomic writes (temp name + rename, so a killed run never leaves a
half-written file), the official layout and list files, and :class:`TripletDataset`.
"""

from triplets.jsonl import atomic_write_bytes, atomic_write_json, atomic_write_jsonl
from triplets.layout import FILES, TYPE_TABLE
from triplets.records import (ContractError, FaceRecord, FaceSet, FlameRecord, FlowRecord, ManifestRecord, PairRecord,
                              RejectRecord, Summary, resolve_inside)

__all__ = [
    "FILES", "TYPE_TABLE", "TripletDataset", "ContractError", "FaceRecord", "FaceSet", "FlameRecord", "FlowRecord",
    "ManifestRecord", "PairRecord", "RejectRecord", "Summary", "resolve_inside",
    "atomic_write_bytes", "atomic_write_json", "atomic_write_jsonl",
]


def __getattr__(name: str):
    # torch is imported only when the dataset is asked for
    if name == "TripletDataset":
        from triplets.dataset import TripletDataset

        return TripletDataset
    raise AttributeError(name)
