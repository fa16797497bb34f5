"""``reliableswap inspect``: a contact sheet of a prep, triplets or flows folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from reliableswap.choices import OccluderKind
from reliableswap.errors import UserError
from reliableswap.faces.hands import occluder_sources
from reliableswap.images import MAX_SIDE, read_folder_image, save_image, to_uint8
from reliableswap.viz import faces_sheet, grid, triplets_sheet
from triplets.dataset import TripletDataset
from triplets.occlusion import Occlusion
from triplets.records import ContractError, FlowRecord
from reliableswap.contracts import FaceSet
from triplets.schema import FLOWS_SCHEMA


def flows_sheet(folder: Path, out: Path, n: int = 16, width: int = 768) -> Path:
    """The flows' previews (b | flow over b | b reshaped), one a row."""
    rows = []
    for r in FlowRecord.read(folder / FlowRecord.FILE)[:n]:
        if r.preview is None:
            continue
        img = read_folder_image(folder, r.preview, r.where, "preview", max_side=3 * MAX_SIDE)
        rows.append(cv2.resize(img, (width, round(img.shape[0] * width / img.shape[1])), interpolation=cv2.INTER_AREA))
    if not rows:
        raise UserError("no flow previews to show (flows --no-previews?)")
    return save_image(out, grid(rows, 1))


def occlusion_sheet(folder: Path, out: Path, n: int, occluders: list[OccluderKind], faces: Path | None, seed: int = 0) -> Path:
    """What ``[augment] occluders`` feeds a trainer: per row source | target | reference | mask of
    one training sample of the triplet folder, each with an occluder (hands cut out of ``faces``,
    procedural objects), pasted at one place onto the target and its reference."""
    ds = TripletDataset(folder, use_real=True, seed=seed)
    ds.occlusion = Occlusion(occluder_sources(occluders, faces, ds.real_image, "--occluders"), 1.0)
    picks = np.random.default_rng(seed).choice(len(ds), min(n, len(ds)), replace=False)
    rows = []
    for i in sorted(int(k) for k in picks):
        it = ds[i]
        rows.append(torch.cat([it["source"], it["target"], it["reference"], it["occluder_mask"].expand(3, -1, -1)], -1))
    return save_image(out, to_uint8(torch.cat(rows, -2)[None])[0])


def run_inspect(folder: str | os.PathLike, sheet: str | os.PathLike, *, n: int = 16,
                occluders: list[OccluderKind] | None = None, faces: str | os.PathLike | None = None) -> Path:
    """Render ``sheet`` for ``folder`` (what it holds decides which sheet; ``occluders``: a triplet
    folder's training samples with occlusion augmentation instead)."""
    folder, sheet = Path(folder), Path(sheet)
    if occluders:
        return occlusion_sheet(folder, sheet, n, occluders, Path(faces) if faces else None)
    man = folder / "manifest.jsonl"
    if man.is_file():
        with man.open("rb") as f:
            first = f.readline(1 << 20)
        try:
            tag = json.loads(first).get("schema")
        except (ValueError, AttributeError):
            tag = None
        return flows_sheet(folder, sheet, n) if tag == FLOWS_SCHEMA else triplets_sheet(folder, sheet, n)
    if (folder / "faces.jsonl").is_file():
        return faces_sheet(FaceSet.load(folder, flame=False), sheet, n)
    raise ContractError(str(folder), "", "holds neither faces.jsonl nor manifest.jsonl")
