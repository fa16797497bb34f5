"""``reliableswap inspect``: a contact sheet of a prep, triplets or flows folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2

from reliableswap.images import MAX_SIDE, read_folder_image, save_image
from reliableswap.viz import faces_sheet, grid, triplets_sheet
from triplets.records import ContractError, FaceSet, FlowRecord
from triplets.schema import FLOWS_SCHEMA
from reliableswap.errors import UserError


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


def run_inspect(folder: str | os.PathLike, sheet: str | os.PathLike, n: int = 16) -> Path:
    """Render ``sheet`` for ``folder`` (what it holds decides which sheet)."""
    folder, sheet = Path(folder), Path(sheet)
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
