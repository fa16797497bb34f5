"""``summary.json``: one schema for every command's summary (:class:`Summary`)."""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from triplets.jsonl import MAX_SUMMARY_BYTES, UnreadableFile, read_bounded
from triplets.records import ContractError, Finite, Record, Sub
from triplets.schema import SUMMARY_SCHEMA


class Counts(Sub):
    in_: int = Field(alias="in", ge=0)
    written: int = Field(ge=0)
    written_this_run: int = Field(ge=0)
    skipped: int = Field(0, ge=0)
    rejected: int = Field(ge=0)
    rejected_by_reason: dict[str, int] = Field(default_factory=dict)
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)


class Timings(Sub):
    wall_s: Finite = Field(ge=0)
    stages_s: dict[str, Finite] = Field(default_factory=dict)


class Throughput(Sub):
    unit: str
    per_s: Finite | None = None


class Summary(Record):
    """``summary.json`` of every command (one schema; command-specific figures under ``details``)."""

    SCHEMA: ClassVar[str] = SUMMARY_SCHEMA
    FILE: ClassVar[str] = "summary.json"
    schema_: Literal["reliableswap.summary/2"] = Field(SUMMARY_SCHEMA, alias="schema")
    command: str
    version: str
    device: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    counts: Counts
    timings: Timings
    throughput: Throughput
    details: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Summary":
        try:
            data = read_bounded(path, MAX_SUMMARY_BYTES)
        except UnreadableFile as e:
            raise ContractError(str(path), "", str(e).removeprefix(f"{path}: ")) from None
        return cls.parse_line(data, str(path))
