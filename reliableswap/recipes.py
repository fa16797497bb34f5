"""Recipes: every knob of a run in one TOML file, validated at load, the single source of truth.

Two kinds, told apart by the top-level ``kind`` key:

* ``kind = "triplets"`` (:class:`TripletRecipe`): sections ``[pairs]`` (read by ``pairs``),
  ``[reenact] [appearance] [blend] [reshape] [flame] [qc] [output]`` (read by ``triplets``);
* ``kind = "train"`` (:class:`TrainRecipe`): ``[model] [identity] [data] [loss] [optim] [train]``
  (read by ``finetune``).

A recipe with an unknown section or key, a value of the wrong type or out of range, or a choice
not on the list fails at load with one line naming the file and the key (:class:`RecipeError`).
Command-line flags override recipe values in one explicit step, :meth:`Recipe.with_overrides`,
which returns a new validated recipe; the resolved recipe is written beside the outputs so a run
can be repeated exactly.
"""

from __future__ import annotations

import os
import re
import tomllib
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from triplets.jsonl import MAX_DEPTH, UnreadableFile, nesting_depth, read_bounded

from reliableswap.choices import (Appearance, BlendMethod, Condition, IdentityKind, GlassesRule, JpegEncoder, JudgeName, MaskBackend, OccluderKind,
                                  OutputFormat, Rasterizer, ReshapeMethod, RestoreBackend, Strategy)
from reliableswap.errors import UserError

#: ``package.module:Class`` (a user's class, imported at start-up).
CLASS_SPEC = r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"
ClassSpec = Annotated[str, StringConstraints(pattern=rf"^{CLASS_SPEC}$")]


#: Largest recipe file read (a recipe is a few KB).
MAX_RECIPE_BYTES = 1 << 20

#: The recipes that ship inside the package (a source checkout's ``recipes/`` links here).
BUILTIN_RECIPES = Path(str(files("reliableswap") / "recipe_files"))
BUILTIN_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,40}")


def builtin_recipes() -> list[str]:
    """Names of the recipes that ship with the package (``cycle``, ``tps``, ``tiny``, …)."""
    return sorted(p.stem for p in BUILTIN_RECIPES.glob("*.toml"))


def resolve_recipe(path: str | os.PathLike) -> Path:
    """A recipe argument → its file: an existing path as given, else a built-in name such as
    ``tps`` (or ``tps.toml``), which is how a ``pip install``-ed package reaches its recipes."""
    p = Path(path)
    if p.exists() or p.parent != Path("."):
        return p
    name = p.name.removesuffix(".toml")
    if BUILTIN_NAME.fullmatch(name) and (BUILTIN_RECIPES / f"{name}.toml").is_file():
        return BUILTIN_RECIPES / f"{name}.toml"
    raise RecipeError(f"{path}: no such file, nor a built-in recipe ({', '.join(builtin_recipes())})")


class RecipeError(UserError):
    """A recipe that cannot be used; ``str(err)`` is one line naming the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, use_enum_values=False)


# -- triplet recipes ----------------------------------------------------------------------------

class PairsSection(Section):
    strategy: Strategy = Strategy.pose  # pose: prefer partners with a similar head pose
    n: int | None = Field(None, ge=1)  # pairs to make (default: one per face)
    max_yaw_diff: float = Field(20.0, ge=0, le=180)  # pose: largest yaw difference, degrees
    seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy and torch generators take non-negative seeds
    min_face_px: float = Field(64.0, ge=0)  # leave out faces narrower than this in their photo


class IdentityJudgeSection(Section):
    # who judges identity for pairs (same person?) and QC (keep, leak, margin): sface | dlib
    judge: JudgeName = JudgeName.sface


class ReenactSection(Section):
    # mesh: a's 468-point face mesh in b's pose/expression, textured from a (z-buffered); tps: 2D
    # warp through 68 points; flame: dense FLAME correspondence (needs --flame); lia, liveportrait:
    # the published networks with the user's weight files ([weights]); or module:Class
    backend: Annotated[str, StringConstraints(pattern=rf"^(mesh|tps|flame|lia|liveportrait|{CLASS_SPEC})$")] = "mesh"
    identity_layout: float = Field(1.0, ge=0, le=1)  # tps: 0 = b's landmarks, 1 = a's feature positions
    mirror: bool = True  # mesh/tps: flip the identity face when that brings its yaw closer to the target's
    stitching: bool = True  # liveportrait: apply the stitching MLP when its file is there


class AppearanceSection(Section):
    method: Appearance = Appearance.skin
    large_gap: float = Field(25.0, ge=0)  # skin: LAB distance of the skin means above which a damped LAB transfer replaces LCT


class MasksSection(Section):
    backend: MaskBackend = MaskBackend.geometry
    blur: float = Field(2.0, ge=0, le=32)  # bisenet: softening of the parsed regions, pixels
    hands: bool = True  # mesh recipes: MediaPipe hand masks (`weights fetch hands`); a target's hand stays, a source's is never pasted
    glasses: GlassesRule = GlassesRule.fill  # mesh recipes: glasses frames from the mesh and the crop's edges (fill: a source's frame is filled with its skin | keep: also a target's frame stays in front | off)


class RestoreSection(Section):
    backend: RestoreBackend = RestoreBackend.none  # applied to the reenacted face before blending
    strength: float = Field(1.0, ge=0, le=1)  # 1 = the restored face, 0 = the input


class WeightsSection(Section):
    dir: str = ""  # learned backends' weight files (<dir>/<backend>/<file>); "" → $RELIABLESWAP_WEIGHTS or ~/.cache/reliableswap/weights
    amp: bool = True  # fp16 autocast for the learned networks on CUDA


class BlendSection(Section):
    method: BlendMethod = BlendMethod.multiband
    levels: int = Field(6, ge=1, le=12)
    forehead: float = Field(0.2, ge=0, le=1)
    feather: float = Field(0.03, ge=0, le=0.5)
    erode: float = Field(0.06, ge=0, le=0.5)


class ReshapeSection(Section):
    enabled: bool = True
    method: ReshapeMethod = ReshapeMethod.mesh
    strength: float = Field(1.0, ge=0, le=2)


class FlameSection(Section):
    model: str = ""  # FLAME model file; "" → --flame or $RELIABLESWAP_FLAME
    embedding: str = ""  # landmark embedding; "" → beside the model
    rasterizer: Rasterizer = Rasterizer.auto


class QCSection(Section):
    enabled: bool = False  # identity keep/leak/margin (the [identity] judge), pose error and seam per fake
    # drop pairs whose fakes have a smaller identity margin, in the judge's units (implies enabled);
    # with QC on and no value: 0, i.e. a fake whose identity is closer to its attribute donor is dropped
    min_id_margin: float | None = None
    # with QC on, drop pairs whose fakes' re-measured head pose is further than this (degrees, the
    # largest of yaw/pitch/roll) from their attribute donor's: such a fake is not in its target's
    # pose (a turn the identity face's texture could not follow), and a swapper would learn that
    max_pose_err: float = Field(15.0, gt=0, le=180)

    @property
    def id_margin_bound(self) -> float | None:
        """The margin below which a pair is dropped: ``min_id_margin``, else 0 with QC on, else none."""
        return self.min_id_margin if self.min_id_margin is not None else (0.0 if self.enabled else None)


class OutputSection(Section):
    format: OutputFormat = OutputFormat.folder
    quality: int = Field(95, ge=1, le=100)  # JPEG quality
    shard_size: int = Field(1000, ge=1, le=100_000)  # webdataset: triplets per shard
    encoder: JpegEncoder = JpegEncoder.auto  # who encodes the JPEGs (bytes differ between encoders)


class Recipe(Section):
    """Shared behaviour of both kinds."""

    KIND: ClassVar[str]

    def with_overrides(self, values: dict[str, Any]) -> "Recipe":
        """A new recipe with ``{"section.key": value}`` set (None values are left alone), validated."""
        d = self.model_dump(mode="python")
        for dotted, v in values.items():
            if v is None:
                continue
            sec, _, key = dotted.partition(".")
            if key:
                d[sec][key] = v
            else:
                d[sec] = v
        return validate_recipe(type(self), d, "command-line flags")

    def to_toml(self) -> str:
        """TOML text that loads back to an equal recipe."""
        d = self.model_dump(mode="json", exclude_none=True)
        lines = [f"kind = {_toml(d.pop('kind'))}", f"name = {_toml(d.pop('name'))}"]
        for sec, kv in d.items():
            lines.append(f"\n[{sec}]")
            lines += [f"{k} = {_toml(v)}" for k, v in kv.items()]
        return "\n".join(lines) + "\n"


class TripletRecipe(Recipe):
    """Everything ``pairs`` and ``triplets`` do (defaults = ``recipes/cycle.toml``)."""

    KIND: ClassVar[str] = "triplets"
    kind: Literal["triplets"] = "triplets"
    name: str = "cycle"
    pairs: PairsSection = Field(default_factory=PairsSection)
    identity: IdentityJudgeSection = Field(default_factory=IdentityJudgeSection)
    reenact: ReenactSection = Field(default_factory=ReenactSection)
    appearance: AppearanceSection = Field(default_factory=AppearanceSection)
    masks: MasksSection = Field(default_factory=MasksSection)
    restore: RestoreSection = Field(default_factory=RestoreSection)
    blend: BlendSection = Field(default_factory=BlendSection)
    reshape: ReshapeSection = Field(default_factory=ReshapeSection)
    flame: FlameSection = Field(default_factory=FlameSection)
    qc: QCSection = Field(default_factory=QCSection)
    output: OutputSection = Field(default_factory=OutputSection)
    weights: WeightsSection = Field(default_factory=WeightsSection)

    @property
    def learned(self) -> list[tuple[str, str]]:
        """``(step, backend)`` of every step that runs a network from the user's weight files."""
        out = []
        if self.reenact.backend in ("lia", "liveportrait"):
            out.append(("reenact", self.reenact.backend))
        if self.masks.backend != MaskBackend.geometry:
            out.append(("masks", self.masks.backend.value))
        if self.restore.backend != RestoreBackend.none:
            out.append(("restore", self.restore.backend.value))
        return out

    @property
    def uses_flame(self) -> bool:
        return self.reenact.backend == "flame" or (self.reshape.enabled and self.reshape.method == ReshapeMethod.flame)

    @property
    def uses_mesh(self) -> bool:
        """Whether synthesis needs the faces' 468-point meshes (stored by prep, else measured)."""
        return self.reenact.backend == "mesh"

    @model_validator(mode="after")
    def _mesh_steps_together(self) -> "TripletRecipe":
        if self.reshape.enabled and self.reshape.method == ReshapeMethod.mesh and self.reenact.backend != "mesh":
            if "method" not in self.reshape.model_fields_set:  # the default follows the reenactor: 2D
                self.reshape.method = ReshapeMethod.tps
            else:
                raise ValueError("[reshape] method = \"mesh\" needs [reenact] backend = \"mesh\"")
        if self.reenact.backend == "mesh" and self.reshape.enabled and self.reshape.method == ReshapeMethod.flame:
            raise ValueError("[reshape] method = \"flame\" goes with [reenact] backend \"tps\" or \"flame\", not \"mesh\"")
        return self

    @property
    def qc_on(self) -> bool:
        return self.qc.enabled or self.qc.min_id_margin is not None

    def steps(self) -> dict[str, Any]:
        """The synthesis steps' parameters, as stored with each triplet."""
        d = self.model_dump(mode="json")
        return {k: d[k] for k in ("reenact", "appearance", "masks", "restore", "blend", "reshape")}


# -- training recipes ---------------------------------------------------------------------------

class ModelSection(Section):
    swapper: Annotated[str, StringConstraints(pattern=rf"^(faceshifter|{CLASS_SPEC})$")] = "faceshifter"
    size: int = Field(256, ge=8, le=1024)  # faceshifter: image side (a power of two)
    base: int = Field(32, ge=1, le=512)  # faceshifter: first encoder channels
    max_ch: int = Field(512, ge=1, le=4096)
    d_scales: int = Field(2, ge=1, le=5)
    d_base: int = Field(32, ge=1, le=512)
    value_range: tuple[float, float] = (0.0, 1.0)  # user class: the range it takes and returns
    input_size: int = Field(0, ge=0, le=2048)  # user class: the side it expects (0 = the data's)
    condition: Condition = Condition.pair
    kwargs: dict[str, Any] = Field(default_factory=dict)  # user class: constructor arguments

    @field_validator("size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError("must be a power of two")
        return v

    @field_validator("value_range")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if tuple(v) not in ((0.0, 1.0), (-1.0, 1.0)):
            raise ValueError("must be [0, 1] or [-1, 1]")
        return v


class IdentitySection(Section):
    # sface: the identity judge, 128-D, from a wheel, differentiable; dlib: 128-D, no gradient (weak);
    # arcface: the user's insightface iresnet (512-D, checkpoint below)
    kind: IdentityKind = IdentityKind.sface
    checkpoint: str = ""  # arcface: insightface arcface_torch backbone.pth


class DataSection(Section):
    use_real: bool = True  # types 2–5 per triplet (False: the official 4–5)
    rec_code: list[Annotated[int, Field(ge=1, le=5)]] = Field(default_factory=lambda: [1, 2, 3, 4, 5])
    same_rate: float = Field(0.2, ge=0, le=1)
    vanilla_rate: float = Field(0.2, ge=0, le=1)
    image_size: int = Field(256, ge=16, le=1024)
    batch: int = Field(8, ge=1, le=4096)
    holdout: int = Field(8, ge=0)  # triplet folders kept out of training for the cycle-L1 evaluation


class AugmentSection(Section):
    """Occlusion augmentation: an occluder pasted onto the target and the same pixels onto its
    reference (:mod:`triplets.occlusion`), so the swapper learns to keep what lies in front of a face."""

    occluders: list[OccluderKind] = Field(default_factory=list)  # [] = off
    rate: float = Field(0.3, ge=0, le=1)  # share of samples that get one


class LossSection(Section):
    cycle: float = Field(1.0, ge=0)  # pixel L1 on types 2–5 (official: 0.05 next to FaceShifter's losses)
    same: float = Field(0.0, ge=0)  # L1 on type 1
    perceptual: float = Field(0.0, ge=0)  # needs a feature extractor (Python API)
    identity: float = Field(0.0, ge=0)  # needs identity.kind = arcface
    adv: float = Field(1.0, ge=0)  # FaceShifter weights
    att: float = Field(10.0, ge=0)
    id: float = Field(5.0, ge=0)
    rec: float = Field(10.0, ge=0)


class OptimSection(Section):
    lr: float = Field(4e-4, gt=0, le=1)
    lr_d: float = Field(4e-4, gt=0, le=1)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.0, 0.999)
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float = Field(0.0, ge=0)  # 0 = off


class TrainSection(Section):
    steps: int = Field(1000, ge=1)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(100, ge=0)  # 0 = never
    ckpt_every: int = Field(100, ge=1)
    eval_every: int = Field(0, ge=0)  # 0: at start and end only
    amp: bool = True  # CUDA only


class TrainRecipe(Recipe):
    """Everything ``finetune`` does."""

    KIND: ClassVar[str] = "train"
    kind: Literal["train"] = "train"
    name: str = "faceshifter"
    model: ModelSection = Field(default_factory=ModelSection)
    identity: IdentitySection = Field(default_factory=IdentitySection)
    data: DataSection = Field(default_factory=DataSection)
    augment: AugmentSection = Field(default_factory=AugmentSection)
    loss: LossSection = Field(default_factory=LossSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)


# -- loading ------------------------------------------------------------------------------------

def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    return repr(v)


def _key(loc: tuple) -> str:
    parts = [str(p) for p in loc]
    if len(parts) >= 2:
        return f"[{parts[0]}] {'.'.join(parts[1:])}"
    return parts[0] if parts else "recipe"


def validate_recipe(cls: type[Recipe], d: dict[str, Any], source: str) -> Recipe:
    """``cls`` from a TOML dict, or :class:`RecipeError` naming ``source`` and the key."""
    kind = d.get("kind")
    if kind != cls.KIND:
        got = "has no kind key" if kind is None else f"is kind = {kind!r}"
        raise RecipeError(f"{source}: {got}, but this command needs a recipe with kind = {cls.KIND!r}")
    try:
        return cls.model_validate(d)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        msg = "unknown key (not in this kind of recipe)" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a rule across sections: its message names the keys
            raise RecipeError(f"{source}: {msg}") from None
        shown = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {err['input']!r})"[:80]
        raise RecipeError(f"{source}: {_key(err['loc'])}: {msg}{shown}") from None


def load_recipe(path: str | os.PathLike | None, cls: type[Recipe]) -> Recipe:
    """The recipe at ``path`` or of a built-in name (None → the built-in defaults of ``cls``)."""
    if path is None:
        return cls()
    path = resolve_recipe(path)
    try:
        text = read_bounded(path, MAX_RECIPE_BYTES).decode("utf-8")
        d = tomllib.loads(text)
    except UnreadableFile as e:
        raise RecipeError(str(e)) from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not valid TOML (not UTF-8 text)") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested deeper than {MAX_DEPTH} levels") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from None
    if nesting_depth(d) > MAX_DEPTH:
        raise RecipeError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    return validate_recipe(cls, d, str(path))
