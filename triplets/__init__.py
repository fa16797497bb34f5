"""Light dataset package for face-swap triplets (numpy, torch, Pillow only).

It never imports :mod:`reliableswap`, so a trainer can depend on it alone. This module holds the
file contracts shared by every command: schema names and versions, JSON-lines reading, and atomic
writes (temp name + rename, so a killed run never leaves a half-written file).
"""

from triplets.schema import (
    FACES_SCHEMA,
    PAIRS_SCHEMA,
    MANIFEST_SCHEMA,
    REJECTS_SCHEMA,
    SUMMARY_SCHEMA,
    SchemaError,
    check_record,
)
from triplets.layout import FILES, TYPE_TABLE
from triplets.jsonl import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, read_jsonl

__all__ = [
    "FILES",
    "TYPE_TABLE",
    "TripletDataset",
    "FACES_SCHEMA",
    "PAIRS_SCHEMA",
    "MANIFEST_SCHEMA",
    "REJECTS_SCHEMA",
    "SUMMARY_SCHEMA",
    "SchemaError",
    "check_record",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_jsonl",
    "read_jsonl",
]


def __getattr__(name: str):
    # torch is imported only when the dataset is asked for
    if name == "TripletDataset":
        from triplets.dataset import TripletDataset

        return TripletDataset
    raise AttributeError(name)
