"""``TripletDataset``: ReliableSwap triplets for trainers (torch Dataset), per the official type codes.

Sources: a ``reliableswap triplets`` output folder, its ``manifest.jsonl``, a folder of WebDataset
shards (``*.tar``), an official pickle (a list of triplet folders), or a text file with one folder
a line. Every triplet gives the cycle types 4 and 5 (``use_real=False``, the official default) or
all of 2–5 (``use_real=True``). Optional mixing: ``vanilla_rate`` of the samples are vanilla pairs
(type 0, source and target from two different folders, no reference), and ``same_rate`` of the
samples are same-identity reconstructions (type 1: source = target = reference). ``rec_code``
picks which types carry a reference; the others get a zero reference and ``has_reference`` False.
With ``occlusion`` (:mod:`triplets.occlusion`), an occluder is pasted onto the target and, when the
sample has one, onto its reference (the same pixels in one frame), and ``"occluder_mask"`` is returned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from triplets.layout import DEFAULT_REC_CODE, FILES, SAME, TYPE_TABLE, VANILLA
from triplets.errors import UserError
from triplets.official import read_triplet_pickle
from triplets.imaging import MAX_IMAGE_BYTES, decode_rgb
from triplets.jsonl import read_bounded
from triplets.occlusion import Occlusion
from triplets.records import ManifestRecord, read_inside, resolve_inside
from triplets.webdataset import iter_shard


#: Largest list file of triplet folders read.
MAX_LIST_BYTES = 64 << 20


def _folders_from(path: Path) -> list[Path] | None:
    """Triplet folders named by ``path``, or None when it is (a folder of) WebDataset shards."""
    if path.suffix in (".pkl", ".pickle"):
        return read_triplet_pickle(path)
    if path.suffix == ".txt":
        return [Path(line.strip()) for line in read_bounded(path, MAX_LIST_BYTES).decode().splitlines() if line.strip()]
    if path.name.endswith(".jsonl"):
        recs = ManifestRecord.read(path)
        if recs and all(r.folder is not None for r in recs):  # else: WebDataset shards beside it
            return [resolve_inside(path.parent, r.folder, r.where, "folder") for r in recs]
        return None
    if path.is_dir():
        if (path / "manifest.jsonl").is_file() and not list(path.glob("*.tar")):
            return _folders_from(path / "manifest.jsonl")
        if all((path / f).is_file() for f in FILES.values()):
            return [path]
        if not list(path.glob("*.tar")):
            return sorted(p for p in path.iterdir() if p.is_dir() and all((p / f).is_file() for f in FILES.values()))
    return None


class TripletDataset(Dataset):
    """Samples ``{"source", "target", "reference"}`` (3×H×W float), ``"type_code"`` (int64),
    ``"same"`` (bool, type 1) and ``"has_reference"`` (bool), as the official loader builds them.

    Args:
        path: see module doc.
        use_real: types 2–5 per triplet (4 samples a folder) instead of 4–5 (2 a folder).
        rec_code: type codes whose samples carry a reference.
        same_rate: probability that a sample becomes type 1 (reconstruction of one image).
        vanilla_rate: probability that a sample becomes type 0 (two real faces, no reference).
        image_size: resize to this side (None keeps the stored size).
        value_range: ``(0, 1)`` or ``(-1, 1)``.
        seed: the random choices of index ``i`` depend only on ``(seed, i)``: deterministic.
        occlusion: an :class:`triplets.occlusion.Occlusion`; each sample then also has
            ``"occluder_mask"`` (1×H×W, 0 where nothing was pasted), ``"occluder"`` (its kind, ""
            for none) and ``"occluder_box"`` (top, left, height, width; zeros for none). Its colours are mapped to ``value_range``, so it goes with a ``transform``
            that keeps that range. Its draws use their own generator: the samples' other choices
            are those without it.
    """

    def __init__(self, path: str | Path, use_real: bool = False, rec_code: Sequence[int] = DEFAULT_REC_CODE,
                 same_rate: float = 0.0, vanilla_rate: float = 0.0, image_size: int | None = None,
                 value_range: tuple[float, float] = (0.0, 1.0), seed: int = 0,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, occlusion: Occlusion | None = None):
        path = Path(path)
        self.codes = (2, 3, 4, 5) if use_real else (4, 5)
        self.rec_code = set(rec_code)
        self.same_rate, self.vanilla_rate = float(same_rate), float(vanilla_rate)
        self.image_size, self.value_range, self.seed, self.transform = image_size, value_range, seed, transform
        self.occlusion = occlusion
        folders = _folders_from(path)
        self._mem: list[dict[str, bytes]] | None = None
        if folders is None:
            root = path.parent if path.name.endswith(".jsonl") else path
            shards = sorted(root.glob("*.tar")) if root.is_dir() else [root]
            self._mem = [s for sh in shards for s in iter_shard(sh)]
            self._n = len(self._mem)
        else:
            self.folders = folders
            self._n = len(folders)
        if self._n == 0:
            raise UserError(f"no triplets found in {path}")

    def __len__(self) -> int:
        return self._n * len(self.codes)

    def real_image(self, rng: np.random.Generator) -> torch.Tensor:
        """A real face crop (the source or target of a random triplet), 3×H×W in [0, 1] at the
        dataset's size, untransformed (textures for procedural occluders)."""
        i = int(rng.integers(self._n))
        return self._image(i, "source" if rng.random() < 0.5 else "target", raw=True)

    def _image(self, i: int, key: str, raw: bool = False) -> torch.Tensor:
        if self._mem is not None:
            data = self._mem[i][FILES[key]]
        else:
            data = read_inside(self.folders[i], FILES[key], str(self.folders[i]), key, MAX_IMAGE_BYTES)
        img = Image.fromarray(decode_rgb(data))  # bounded: the header's size is checked before decoding
        if self.image_size and img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
        t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(255.0)
        if raw:
            return t
        lo, hi = self.value_range
        t = t * (hi - lo) + lo
        return self.transform(t) if self.transform else t

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        folder, k = divmod(index, len(self.codes))
        code = self.codes[k]
        rng = np.random.default_rng([self.seed, index])
        if rng.random() < self.vanilla_rate:
            other = (folder + 1 + int(rng.integers(self._n - 1))) % self._n if self._n > 1 else folder
            t = self._image(other, "target")
            if rng.random() < self.same_rate:
                s, code, ref = t, SAME, t
            else:
                s, code, ref = self._image(folder, "source"), VANILLA, None
        elif rng.random() < self.same_rate:
            fake = self._image(folder, "output_ts" if rng.random() < 0.5 else "output_st")
            s = t = ref = fake
            code = SAME
        else:
            ks, kt, kr = TYPE_TABLE[code]
            s, t, ref = self._image(folder, ks), self._image(folder, kt), self._image(folder, kr)
        has_ref = ref is not None and code in self.rec_code
        extra = {}
        if self.occlusion is not None:
            t, occluded_ref, extra = self.occlusion.apply(self.seed, index, t, ref if has_ref else None, self.value_range)
            ref = occluded_ref if has_ref else ref
        if not has_ref:
            ref = torch.zeros_like(t)
        return {
            "source": s, "target": t, "reference": ref,
            "type_code": torch.tensor(code, dtype=torch.int64),
            "same": torch.tensor(code == SAME),
            "has_reference": torch.tensor(has_ref),
            **extra,
        }
