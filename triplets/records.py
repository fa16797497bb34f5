"""Typed records of the JSON-lines contracts, each with one reader and one writer.

Every command talks to the next through files: ``faces.jsonl`` (+ ``flame.jsonl``) →
``pairs.jsonl`` → triplet folders + ``manifest.jsonl`` (and ``flows`` manifests) → trainers. Each
file holds one record a line, tagged ``"schema": "<name>/<major>"``; :class:`Record` validates
them (pydantic v2), so nothing downstream sees a record of the wrong shape. This module holds the
base and what a trainer reads (pairs, manifests, flows, rejects); the faces, FLAME, embeddings
and summary records of the commands live in :mod:`reliableswap.contracts`, on the same base:

* a line that is not JSON, has the wrong schema, lacks a field, or holds a value of the wrong
  type, length or range (NaN and infinities included) is refused with one line
  ``file:line: field: what is wrong`` (:class:`ContractError`);
* ids are safe names (letters, digits, ``._-``, no leading dot, at most 120 characters), so an id
  can name an output file; paths inside records are relative and must stay inside their folder
  once resolved (:func:`resolve_inside`, symlinks included);
* fields a reader does not know are kept (forward compatible) and written back unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, ClassVar, Iterable, Iterator, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, ValidationError, model_validator

from triplets.jsonl import UnreadableFile, atomic_write_bytes, dumps, loads_bounded, open_regular
from triplets.layout import FILES
from triplets.schema import FLOWS_SCHEMA, MANIFEST_SCHEMA, PAIRS_SCHEMA, REJECTS_SCHEMA
from triplets.errors import UserError

#: Ids: letters, digits, ``._-``; no leading dot; 1–120 characters. Safe as a file name, also
#: two of them joined (a flow's key ``{a}__{b}``).
SAFE_ID_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,119}$"
#: File-name keys (folders, shards, flow keys): the same alphabet, up to 242 characters.
SAFE_NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,241}$"
#: Longest line a reader accepts (a record is a few KB; a larger line is refused, not read).
MAX_LINE_BYTES = 1 << 20

SafeId = Annotated[str, StringConstraints(pattern=SAFE_ID_PATTERN)]
SafeName = Annotated[str, StringConstraints(pattern=SAFE_NAME_PATTERN)]


def _relative(v: str) -> str:
    p = PurePosixPath(v)
    if not v or "\x00" in v or "\\" in v or p.is_absolute() or ".." in p.parts or len(v) > 1024:
        raise ValueError("must be a relative path inside its folder (no '..', not absolute)")
    return v


RelPath = Annotated[str, AfterValidator(_relative)]
Finite = float  # allow_inf_nan=False on every model refuses NaN and ±inf
Point = tuple[Finite, Finite]
Vec3 = tuple[Finite, Finite, Finite]


class ContractError(UserError):
    """A record that breaks its contract; ``str(err)`` is one line ``file:line: field: problem``."""

    def __init__(self, where: str, field: str, problem: str):
        # a key or value read from the file may hold line breaks: keep the message one line
        field, problem = (" ".join(str(t).splitlines()) if t else t for t in (field, problem))
        self.where, self.field, self.problem = where, field, problem
        super().__init__(f"{where}: {field}: {problem}" if field else f"{where}: {problem}")


def _first_error(e: ValidationError) -> tuple[str, str]:
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(x) for x in err["loc"]) or "record"
    msg = err["msg"].removeprefix("Value error, ")
    if err.get("type") == "json_invalid":
        return "record", "not valid JSON"
    if "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], (dict, list)):
        shown = repr(err["input"])
        msg += f" (got {shown[:40] + '…' if len(shown) > 40 else shown})"
    return loc, msg


class Sub(BaseModel):
    """A nested object of a record (unknown keys kept, non-finite numbers refused)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


R = TypeVar("R", bound="Record")


class Record(Sub):
    """Base of the line records: schema tag, reading and writing (one reader/writer per contract)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)
    SCHEMA: ClassVar[str]
    FILE: ClassVar[str]  # the usual file name
    _where: str = PrivateAttr("")  # "file:line" it was read from, for messages about it

    @property
    def where(self) -> str:
        return self._where

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def parse_line(cls: type[R], line: str | bytes, where: str) -> R:
        """One line → record, or :class:`ContractError` naming ``where`` and the field."""
        try:
            raw = loads_bounded(line)
        except (ValueError, UnicodeDecodeError) as e:
            raise ContractError(where, "", f"not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(raw, dict):
            raise ContractError(where, "", f"expected a JSON object, got {type(raw).__name__}")
        tag = raw.get("schema")
        if tag != cls.SCHEMA:
            problem = "missing" if tag is None else f"{str(tag)[:60]!r} is not {cls.SCHEMA!r}"
            raise ContractError(where, "schema", problem)
        try:
            rec = cls.model_validate(raw)
        except ValidationError as e:
            raise ContractError(where, *_first_error(e)) from None
        rec._where = where
        return rec

    @classmethod
    def iter_file(cls: type[R], path: str | os.PathLike) -> Iterator[R | ContractError]:
        """Each line's record, or the :class:`ContractError` that refuses it (blank lines skipped).
        Memory stays bounded: a line over :data:`MAX_LINE_BYTES` is refused without being read whole."""
        path = Path(path)
        try:
            f = open_regular(path)
        except UnreadableFile as e:
            raise ContractError(str(path), "", str(e).removeprefix(f"{path}: ")) from None
        except OSError as e:
            raise ContractError(str(path), "", f"cannot read ({e.strerror or e})") from None
        with f:
            n = 0
            while True:
                line = f.readline(MAX_LINE_BYTES + 1)
                if not line:
                    break
                n += 1
                where = f"{path}:{n}"
                if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                    while line and not line.endswith(b"\n"):  # skip the rest of the long line
                        line = f.readline(MAX_LINE_BYTES + 1)
                    yield ContractError(where, "", f"line longer than {MAX_LINE_BYTES} bytes")
                    continue
                if not line.strip():
                    continue
                try:
                    yield cls.parse_line(line, where)
                except ContractError as e:
                    yield e

    @classmethod
    def read(cls: type[R], path: str | os.PathLike) -> list[R]:
        """Every record of ``path``; the first bad line raises :class:`ContractError`."""
        out: list[R] = []
        for r in cls.iter_file(path):
            if isinstance(r, ContractError):
                raise r
            out.append(r)
        return out

    @classmethod
    def read_valid(cls: type[R], path: str | os.PathLike) -> tuple[list[R], list[ContractError]]:
        """Good records and the refusals of bad lines (a bad line never stops the others)."""
        good: list[R] = []
        bad: list[ContractError] = []
        for r in cls.iter_file(path):
            (bad if isinstance(r, ContractError) else good).append(r)
        return good, bad

    @classmethod
    def write(cls, path: str | os.PathLike, records: Iterable["Record | dict"]) -> Path:
        """Write records (validated) one a line, atomically."""
        lines = []
        for r in records:
            rec = r if isinstance(r, cls) else cls.model_validate(r)
            lines.append(dumps(rec.to_json()) + "\n")
        return atomic_write_bytes(path, "".join(lines).encode("utf-8"))


def resolve_inside(base: str | os.PathLike, rel: str, where: str = "", field: str = "path") -> Path:
    """``base / rel``, refused (:class:`ContractError`) unless it resolves inside ``base`` —
    symbolic links followed, so a link pointing out of the folder is refused too."""
    base = Path(base)
    try:
        _relative(rel)
        target = (base / rel).resolve()
        inside = target.is_relative_to(base.resolve())
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a symlink loop
        inside = False
    if not inside:
        raise ContractError(where or str(base), field, f"{rel[:80]!r} leads outside {base}")
    return base / rel


def open_inside(base: str | os.PathLike, rel: str, where: str = "", field: str = "path", max_bytes: int | None = None):
    """``base / rel`` opened for reading once: a regular file of at most ``max_bytes``, and the file
    actually opened (its descriptor, not its name) lies inside ``base``, so a link swapped in after
    :func:`resolve_inside`'s check is refused too. :class:`ContractError` otherwise."""
    path = resolve_inside(base, rel, where, field)
    try:
        f = open_regular(path, max_bytes)
    except UnreadableFile as e:
        raise ContractError(where or str(base), field, str(e)) from None
    except OSError as e:
        raise ContractError(where or str(base), field, f"cannot read {rel[:80]!r} ({e.strerror or e})") from None
    try:
        opened = Path(os.readlink(f"/proc/self/fd/{f.fileno()}"))
    except OSError:  # no procfs: compare the descriptor with the resolved name
        st, real = os.fstat(f.fileno()), Path(base, rel).resolve()
        try:
            same = os.stat(real)
            opened = real if (st.st_dev, st.st_ino) == (same.st_dev, same.st_ino) else Path("/")
        except OSError:
            opened = Path("/")
    if not opened.is_relative_to(Path(base).resolve()):
        f.close()
        raise ContractError(where or str(base), field, f"{rel[:80]!r} leads outside {base} (changed while opened)")
    return f


def read_inside(base: str | os.PathLike, rel: str, where: str = "", field: str = "path", max_bytes: int = 1 << 30) -> bytes:
    """The bytes of :func:`open_inside`'s file (at most ``max_bytes``)."""
    with open_inside(base, rel, where, field, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ContractError(where or str(base), field, f"{rel[:80]!r} is larger than {max_bytes} bytes")
    return data


# -- pairs.jsonl ----------------------------------------------------------------------------------

class PoseDelta(Sub):
    yaw: Finite
    pitch: Finite
    roll: Finite


class PairRecord(Record):
    """A pair of faces: ``a`` gives the identity to ``b`` (``pairs.jsonl``)."""

    SCHEMA: ClassVar[str] = PAIRS_SCHEMA
    FILE: ClassVar[str] = "pairs.jsonl"
    schema_: Literal["reliableswap.pairs/1"] = Field(PAIRS_SCHEMA, alias="schema")
    a: SafeId
    b: SafeId
    pose_delta: PoseDelta | None = None
    seed: int = Field(0, ge=0, le=2**32 - 1)

    @model_validator(mode="after")
    def _two_faces(self) -> "PairRecord":
        if self.a == self.b:
            raise ValueError(f"a self-pair ({self.a!r} with itself) makes no triplet")
        return self


# -- manifest.jsonl (triplets) --------------------------------------------------------------------

class PairRef(Sub):
    index: int = Field(ge=0)
    a: SafeId
    b: SafeId


class ManifestRecord(Record):
    """One triplet: a folder in the official layout, or a sample in a WebDataset shard."""

    SCHEMA: ClassVar[str] = MANIFEST_SCHEMA
    FILE: ClassVar[str] = "manifest.jsonl"
    schema_: Literal["reliableswap.manifest/1"] = Field(MANIFEST_SCHEMA, alias="schema")
    pair: PairRef
    folder: SafeName | None
    files: dict[Literal["source", "target", "output_st", "output_ts"], SafeName] = Field(default_factory=lambda: dict(FILES))
    steps: dict[str, Any] = Field(default_factory=dict)
    qc: dict[str, Finite] = Field(default_factory=dict)
    shard: SafeName | None = None
    key: SafeName | None = None
    judge: Literal["sface", "dlib"] | None = None  # who measured the qc's identity figures (none before the judge: dlib)

    @model_validator(mode="after")
    def _folder_or_shard(self) -> "ManifestRecord":
        if self.folder is None and (self.shard is None or self.key is None):
            raise ValueError("a record names a folder, or a shard and a key")
        if set(self.files) != set(FILES):
            raise ValueError(f"files must name {', '.join(FILES)}")
        return self


# -- flows manifest -------------------------------------------------------------------------------

class FlowRecord(Record):
    """One dense shape flow (``flows`` output's ``manifest.jsonl``)."""

    SCHEMA: ClassVar[str] = FLOWS_SCHEMA
    FILE: ClassVar[str] = "manifest.jsonl"
    schema_: Literal["reliableswap.flows/1"] = Field(FLOWS_SCHEMA, alias="schema")
    key: SafeName
    a: SafeId
    b: SafeId
    flow: RelPath
    preview: RelPath | None = None
    size: int = Field(ge=16, le=4096)
    contour_shift_px: Finite = 0.0


# -- rejects.jsonl ---------------------------------------------------------------

class RejectRecord(Record):
    """An input left out, with a one-line reason (``rejects.jsonl`` of every command)."""

    SCHEMA: ClassVar[str] = REJECTS_SCHEMA
    FILE: ClassVar[str] = "rejects.jsonl"
    schema_: Literal["reliableswap.rejects/1"] = Field(REJECTS_SCHEMA, alias="schema")
    input: str
    reason: str
    frame: int | None = None
