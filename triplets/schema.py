"""Schema names, versions and required fields of the JSON-lines contracts.

Every record carries ``"schema": "<name>/<major>"``. A reader accepts the same name with the same
major version and ignores fields it does not know, so minor additions never break old readers.
"""

from __future__ import annotations

from typing import Any, Mapping

FACES_SCHEMA = "reliableswap.faces/1"
PAIRS_SCHEMA = "reliableswap.pairs/1"
MANIFEST_SCHEMA = "reliableswap.manifest/1"
REJECTS_SCHEMA = "reliableswap.rejects/1"
SUMMARY_SCHEMA = "reliableswap.summary/1"
FLOWS_SCHEMA = "reliableswap.flows/1"

#: Fields every record of a schema must have.
REQUIRED: dict[str, tuple[str, ...]] = {
    FACES_SCHEMA: (
        "id", "image", "origin", "bbox", "landmarks68", "pose", "inverse", "quality", "identity",
    ),
    PAIRS_SCHEMA: ("a", "b", "pose_delta", "seed"),
    MANIFEST_SCHEMA: ("pair", "folder", "files", "steps", "qc"),
    REJECTS_SCHEMA: ("input", "reason"),
    SUMMARY_SCHEMA: ("command", "version", "counts", "timings"),
    FLOWS_SCHEMA: ("a", "b", "flow", "size"),
}


class SchemaError(ValueError):
    """A record does not follow its declared schema."""


def _split(schema: str) -> tuple[str, int]:
    name, _, major = schema.partition("/")
    if not major.isdigit():
        raise SchemaError(f"malformed schema tag {schema!r} (expected 'name/major')")
    return name, int(major)


def check_record(record: Mapping[str, Any], expected: str) -> None:
    """Raise :class:`SchemaError` unless ``record`` declares ``expected`` (same name and major
    version) and has every required field of that schema."""
    got = record.get("schema")
    if got is None:
        raise SchemaError(f"record has no 'schema' field (expected {expected})")
    if _split(str(got)) != _split(expected):
        raise SchemaError(f"record schema {got!r} is not compatible with {expected!r}")
    missing = [k for k in REQUIRED.get(expected, ()) if k not in record]
    if missing:
        raise SchemaError(f"{expected} record lacks {', '.join(missing)}")
