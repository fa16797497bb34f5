"""Typed records of the JSON-lines contracts, each with one reader and one writer.

Every command talks to the next through files: ``faces.jsonl`` (+ ``flame.jsonl``) →
``pairs.jsonl`` → triplet folders + ``manifest.jsonl`` (and ``flows`` manifests) → trainers. Each
file holds one record a line, tagged ``"schema": "<name>/<major>"``; the classes below validate
them (pydantic v2), so nothing downstream sees a record of the wrong shape:

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

from annotated_types import Len
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, ValidationError, model_validator

from triplets.jsonl import MAX_SUMMARY_BYTES, UnreadableFile, atomic_write_bytes, dumps, loads_bounded, open_regular, read_bounded
from triplets.layout import FILES
from triplets.schema import (EMBEDDINGS_SCHEMA, FACES_SCHEMA, FLAME_SCHEMA, FLOWS_SCHEMA, MANIFEST_SCHEMA, PAIRS_SCHEMA,
                             REJECTS_SCHEMA, SUMMARY_SCHEMA)
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


# -- faces.jsonl (prep) ---------------------------------------------------------------------------

class Origin(Sub):
    path: str
    frame: int | None = None
    face_index: int = Field(0, ge=0)
    size: tuple[int, int]


class Pose(Sub):
    yaw: Finite = Field(ge=-180, le=180)
    pitch: Finite = Field(ge=-180, le=180)
    roll: Finite = Field(ge=-180, le=180)


class Quality(Sub):
    det_score: Finite
    face_px: Finite = Field(ge=0)
    sharpness: Finite = Field(ge=0)


Landmarks68 = Annotated[list[Point], Len(68, 68)]
#: MediaPipe's 468-point face mesh: (x, y, z) crop pixels, z smaller = nearer the camera.
Mesh468 = Annotated[list[tuple[Finite, Finite, Finite]], Len(468, 468)]
Hand21 = Annotated[list[Point], Len(21, 21)]


#: The occluder masks prep stores, in the order of their PNG's channels (R, G, B).
OCCLUDER_CHANNELS = ("hands", "glasses", "hair")
Fraction = Annotated[Finite, Field(ge=0, le=1)]


class OccluderArea(Sub):
    """The fraction of the crop each stored occluder mask covers (values > 0.5)."""

    hands: Fraction
    glasses: Fraction
    hair: Fraction


class Occluders(Sub):
    """What covers a face in its crop (``prep --landmarks mesh``): ``mask`` is an RGB PNG beside
    ``faces.jsonl``, one soft mask (0-255) per channel in :data:`OCCLUDER_CHANNELS` order, at the
    crop's size; ``sources`` names what found each one."""

    mask: RelPath
    area: OccluderArea
    sources: dict[Literal["hands", "glasses", "hair"], Annotated[str, StringConstraints(max_length=200)]]


class FaceRecord(Record):
    """One aligned face (``faces.jsonl``, written by ``prep`` only)."""

    SCHEMA: ClassVar[str] = FACES_SCHEMA
    FILE: ClassVar[str] = "faces.jsonl"
    schema_: Literal["reliableswap.faces/1"] = Field(FACES_SCHEMA, alias="schema")
    id: SafeId
    image: RelPath
    origin: Origin
    align: str
    size: int = Field(ge=16, le=4096)
    bbox: tuple[Finite, Finite, Finite, Finite]
    landmarks68: Landmarks68
    landmarks68_origin: Landmarks68 | None = None
    pose: Pose
    inverse: tuple[tuple[Finite, Finite, Finite], tuple[Finite, Finite, Finite]]
    quality: Quality
    identity: str | None = None
    embedding: Annotated[list[Finite], Len(128, 128)] | None = None
    mesh468: Mesh468 | None = None  # prep --landmarks mesh
    hands: Annotated[list[Hand21], Len(0, 8)] | None = None  # prep --landmarks mesh: 21 points per hand found on the crop
    occluders: Occluders | None = None  # prep --landmarks mesh: hands, glasses and hair masks (a PNG)

    @model_validator(mode="after")
    def _landmarks_near_crop(self) -> "FaceRecord":
        lo, hi = -self.size, 2 * self.size
        if any(not (lo <= v <= hi) for p in self.landmarks68 for v in p):
            raise ValueError(f"landmarks68 lie far outside the {self.size} px crop")
        if self.mesh468 is not None and any(not (lo <= v <= hi) for p in self.mesh468 for v in p):
            raise ValueError(f"mesh468 lies far outside the {self.size} px crop")
        if self.hands and any(not (lo <= v <= hi) for h in self.hands for p in h for v in p):
            raise ValueError(f"hands lie far outside the {self.size} px crop")
        return self


class FlameRecord(Record):
    """Fitted FLAME parameters of one face (``flame.jsonl``, written by ``fit`` only)."""

    SCHEMA: ClassVar[str] = FLAME_SCHEMA
    FILE: ClassVar[str] = "flame.jsonl"
    schema_: Literal["reliableswap.flame/1"] = Field(FLAME_SCHEMA, alias="schema")
    id: SafeId
    size: int = Field(ge=16, le=4096)
    rmse_px: Finite = Field(ge=0)
    shape: Annotated[list[Finite], Len(1, 300)]
    expression: Annotated[list[Finite], Len(0, 100)]
    global_pose: Vec3
    neck: Vec3
    jaw: Vec3
    eyes: tuple[Finite, Finite, Finite, Finite, Finite, Finite]
    camera: Vec3

    PARAMS: ClassVar[tuple[str, ...]] = ("shape", "expression", "global_pose", "neck", "jaw", "eyes", "camera")


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


# -- rejects.jsonl and summary.json ---------------------------------------------------------------

class RejectRecord(Record):
    """An input left out, with a one-line reason (``rejects.jsonl`` of every command)."""

    SCHEMA: ClassVar[str] = REJECTS_SCHEMA
    FILE: ClassVar[str] = "rejects.jsonl"
    schema_: Literal["reliableswap.rejects/1"] = Field(REJECTS_SCHEMA, alias="schema")
    input: str
    reason: str
    frame: int | None = None


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


# -- a prep folder: faces.jsonl + flame.jsonl + crops ---------------------------------------------

class FaceSet:
    """The faces of a ``prep`` folder by id, joined with their ``fit`` parameters (``flame.jsonl``)
    when present. Ids are unique (a duplicate is refused naming both lines); crop paths resolve
    inside the folder."""

    def __init__(self, folder: Path, faces: list[FaceRecord], flame: dict[str, FlameRecord],
                 problems: list[ContractError] | None = None):
        self.folder, self.faces, self.flame = folder, faces, flame
        self.problems = problems or []  # lines refused when read leniently
        self.by_id: dict[str, FaceRecord] = {}
        for f in faces:
            if f.id in self.by_id:
                raise ContractError(f.where, "id", f"{f.id!r} already used at {self.by_id[f.id].where}")
            self.by_id[f.id] = f

    @classmethod
    def load(cls, folder: str | os.PathLike, flame: bool = True, strict: bool = True) -> "FaceSet":
        """``strict``: the first bad line raises; otherwise bad lines (of faces.jsonl and flame.jsonl)
        are left out and kept in :attr:`problems`, so a command can reject them with their reason.
        Duplicate ids are refused either way (which record is right cannot be known)."""
        folder = Path(folder)
        if not (folder / FaceRecord.FILE).is_file():
            raise ContractError(str(folder), "", "no faces.jsonl here (run `reliableswap prep` first)")
        read = (lambda rec_cls, p: (rec_cls.read(p), [])) if strict else (lambda rec_cls, p: rec_cls.read_valid(p))
        faces, problems = read(FaceRecord, folder / FaceRecord.FILE)
        params: dict[str, FlameRecord] = {}
        if flame and (folder / FlameRecord.FILE).is_file():
            recs, bad = read(FlameRecord, folder / FlameRecord.FILE)
            params, problems = {r.id: r for r in recs}, problems + bad
        return cls(folder, faces, params, problems)

    def __len__(self) -> int:
        return len(self.faces)

    def __iter__(self) -> Iterator[FaceRecord]:
        return iter(self.faces)

    def __contains__(self, face_id: str) -> bool:
        return face_id in self.by_id

    def __getitem__(self, face_id: str) -> FaceRecord:
        return self.by_id[face_id]

    def image_path(self, face: FaceRecord) -> Path:
        """The crop of ``face``, kept inside the folder."""
        return resolve_inside(self.folder, face.image, face.where, "image")
