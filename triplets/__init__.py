"""Light dataset package for face-swap triplets (numpy, torch, Pillow, pydantic only).

It never imports :mod:`reliableswap`, so a trainer can depend on it alone. It holds what a trainer
reads: schema tags, the record base with one reader/writer per contract and the pairs, manifest,
flows and rejects records (:mod:`triplets.records`), atomic writes (temp name + rename, so a
killed run never leaves a half-written file), the official layout and list files, and
:class:`TripletDataset`. The commands' own contracts (faces, FLAME fits, embeddings, summaries)
live in :mod:`reliableswap.contracts`, built on the same base.
"""

from triplets.jsonl import atomic_write_bytes, atomic_write_json, atomic_write_jsonl
from triplets.layout import FILES, TYPE_TABLE
from triplets.records import ContractError, FlowRecord, ManifestRecord, PairRecord, RejectRecord, Record, resolve_inside

__all__ = [
    "FILES", "TYPE_TABLE", "TripletDataset", "ContractError", "FlowRecord", "ManifestRecord", "PairRecord", "Record",
    "RejectRecord", "resolve_inside",
    "atomic_write_bytes", "atomic_write_json", "atomic_write_jsonl",
]


def __getattr__(name: str):
    # torch is imported only when the dataset is asked for
    if name == "TripletDataset":
        from triplets.dataset import TripletDataset

        return TripletDataset
    raise AttributeError(name)
