"""The contracts of a prep folder: ``faces.jsonl`` (:class:`FaceRecord`, written by ``prep`` only),
``flame.jsonl`` (:class:`FlameRecord`, written by ``fit`` only), the occluder masks' record, and
:class:`FaceSet`, the two joined by face id. Read and written through
:class:`triplets.records.Record` (one reader and one writer, every field validated)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, ClassVar, Iterator, Literal

from annotated_types import Len
from pydantic import Field, StringConstraints, model_validator

from triplets.records import ContractError, Finite, Point, Record, RelPath, SafeId, Sub, Vec3, resolve_inside
from triplets.schema import FACES_SCHEMA, FLAME_SCHEMA

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
