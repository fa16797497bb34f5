"""Training data for ``finetune``: triplets (with a held-out split) mixed with vanilla pairs of real faces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from reliableswap.errors import UserError
from triplets.dataset import TripletDataset
from triplets.layout import FILES, SAME, VANILLA
from triplets.occlusion import Occlusion
from triplets.records import ManifestRecord, resolve_inside
from reliableswap.contracts import FaceSet


def split_triplets(triplets: Path, holdout: int, run: Path) -> tuple[Path, Path | None]:
    """Write ``run/train.txt`` and ``run/heldout.txt`` (the last ``holdout`` triplet folders, sorted)
    when ``triplets`` is a folder output; shards are used whole (no held-out split)."""
    man = triplets / ManifestRecord.FILE
    if not man.is_file() or list(triplets.glob("*.tar")):
        return triplets, None
    folders = sorted({str(resolve_inside(triplets, r.folder, r.where, "folder").resolve())
                      for r in ManifestRecord.read(man) if r.folder is not None})
    folders = [f for f in folders if all((Path(f) / n).is_file() for n in FILES.values())]
    if holdout <= 0 or len(folders) <= holdout:
        return triplets, None
    (run / "train.txt").write_text("\n".join(folders[:-holdout]) + "\n")
    (run / "heldout.txt").write_text("\n".join(folders[-holdout:]) + "\n")
    return run / "train.txt", run / "heldout.txt"


class FacePairs(Dataset):
    """Vanilla pairs (type 0: two different faces, no reference) and, with ``same_rate``, same-face
    reconstructions (type 1) from a ``prep`` folder's crops. Deterministic per ``(seed, index)``."""

    def __init__(self, folder: Path, image_size: int, same_rate: float = 0.0, seed: int = 0, occlusion: Occlusion | None = None):
        self.occlusion = occlusion
        faces = FaceSet.load(folder, flame=False)
        self.paths = [faces.image_path(f) for f in faces]
        self.labels = [f.identity or f.id for f in faces]
        if len(self.paths) < 2:
            raise UserError(f"{folder}: need at least two faces for vanilla pairs")
        self.size, self.same_rate, self.seed = image_size, same_rate, seed

    def __len__(self) -> int:
        return len(self.paths) * (len(self.paths) - 1)

    def _img(self, i: int) -> torch.Tensor:
        img = Image.open(self.paths[i]).convert("RGB")
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(255.0)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        n = len(self.paths)
        a = int(rng.integers(n))
        t = self._img(a)
        if rng.random() < self.same_rate:
            s, ref, code = t, t, SAME
        else:
            b = (a + 1 + int(rng.integers(n - 1))) % n
            for _ in range(8):  # prefer another identity when labels say so
                if self.labels[b] != self.labels[a]:
                    break
                b = (a + 1 + int(rng.integers(n - 1))) % n
            s, ref, code = self._img(b), torch.zeros_like(t), VANILLA
        extra = {}
        if self.occlusion is not None:  # as TripletDataset: onto the target and (type 1) its reference
            t, occ_ref, extra = self.occlusion.apply(self.seed, index, t, ref if code == SAME else None, (0.0, 1.0))
            ref = occ_ref if code == SAME else ref
        return {"source": s, "target": t, "reference": ref, "type_code": torch.tensor(code, dtype=torch.int64),
                "same": torch.tensor(code == SAME), "has_reference": torch.tensor(code == SAME), **extra}


class Mixture:
    """Batches for step ``k`` of rank ``r`` drawn with ``np.random.default_rng([seed, k, r])``: the same
    step always sees the same samples, so a resumed run continues the same trajectory."""

    def __init__(self, triplets: TripletDataset, faces: FacePairs | None, vanilla_rate: float, seed: int):
        self.triplets, self.faces, self.vanilla_rate, self.seed = triplets, faces, vanilla_rate, seed

    def batch(self, step: int, rank: int, size: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, rank])
        items = []
        for _ in range(size):
            if self.faces is not None and rng.random() < self.vanilla_rate:
                items.append(self.faces[int(rng.integers(len(self.faces)))])
            else:
                items.append(self.triplets[int(rng.integers(len(self.triplets)))])
        return default_collate(items)
