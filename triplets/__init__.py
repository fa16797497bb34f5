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
from triplets.jsonl import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, read_jsonl

__all__ = [
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
