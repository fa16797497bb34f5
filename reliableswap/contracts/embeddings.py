"""``embeddings.jsonl``: the identity embeddings ``pairs`` computed, cached beside its output."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from annotated_types import Len
from pydantic import Field, StringConstraints

from triplets.records import Finite, Record, SafeId
from triplets.schema import EMBEDDINGS_SCHEMA


class EmbeddingRecord(Record):
    """An identity embedding that ``pairs`` computed for a face (``embeddings.jsonl`` beside its
    output): the judge's (SFace, or dlib's descriptor), valid while the crop's bytes have this SHA-256."""

    SCHEMA: ClassVar[str] = EMBEDDINGS_SCHEMA
    FILE: ClassVar[str] = "embeddings.jsonl"
    schema_: Literal["reliableswap.embeddings/1"] = Field(EMBEDDINGS_SCHEMA, alias="schema")
    id: SafeId
    judge: Literal["dlib", "sface"] = "dlib"  # whose embedding (lines from before the judge: dlib's)
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    embedding: Annotated[list[Finite], Len(128, 128)]
