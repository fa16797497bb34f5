"""Our outputs through the official ReliableSwap trainer's list files: ``triplet.pickle`` (written by
``triplets``) and the vanilla ``(path, quality)`` pickle (``prep --identity-from-folder``).

The official loader itself (ygtxr1997/ReliableSwap ``modules/dataset/dataloader.py``) is not part
of this project; ``test_official_loader_reads_our_files`` runs it when ``RELIABLESWAP_OFFICIAL``
points at a checkout of that repository (its torchvision and occluder imports are stubbed: only
the indexing is exercised), and is skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reliableswap.commands.prep import PrepConfig, run_prep, slug
from reliableswap.commands.triplets import run_triplets
from reliableswap.pairs import make_pairs
from reliableswap.recipes import PairsSection, TripletRecipe, load_recipe
from reliableswap.testing import stub_modules
from triplets import TripletDataset
from triplets.layout import FILES, TYPE_TABLE
from triplets.official import read_triplet_pickle, read_vanilla_pickle
from triplets.records import ManifestRecord, PairRecord
from reliableswap.contracts import FaceSet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def official_files(faces_dir, tmp_path_factory):
    """A prep with identities from folders (two folders) and 6 triplets from it."""
    root = tmp_path_factory.mktemp("official")
    inputs = root / "in"
    for ident, names in (("person_a", ["london_008_neutral", "london_008_smiling"]),
                         ("person_b", ["london_021_neutral", "london_021_smiling"]),
                         ("person_c", ["london_030_neutral", "london_030_smiling"])):
        (inputs / ident).mkdir(parents=True)
        for n in names:
            (inputs / ident / f"{n}.jpg").write_bytes((faces_dir / "london_set" / f"{n}.jpg").read_bytes())
    prep = root / "prep"
    run_prep([inputs], prep, PrepConfig(identity_from_folder=True, largest=True), workers=1)
    fs = FaceSet.load(prep)
    PairRecord.write(root / "pairs.jsonl", make_pairs(fs.faces, PairsSection(n=6, strategy="random")))
    # the 2D recipe: the layout is what these tests read, not what is synthesized
    run_triplets(prep, root / "pairs.jsonl", root / "tri", load_recipe(ROOT / "recipes" / "tps.toml", TripletRecipe), device="cpu", batch=8)
    return prep, root / "tri"


def test_triplet_pickle_lists_our_folders(official_files):
    _, tri = official_files
    folders = read_triplet_pickle(tri / "triplet.pickle")
    recs = ManifestRecord.read(tri / "manifest.jsonl")
    assert [str(f) for f in folders] == [str((tri / r.folder).resolve()) for r in recs] and len(folders) == 6
    assert all(f.is_absolute() and all((f / n).is_file() for n in FILES.values()) for f in folders)
    for use_real, k in ((False, 2), (True, 4)):
        a, b = TripletDataset(tri / "triplet.pickle", use_real=use_real), TripletDataset(tri, use_real=use_real)
        assert len(a) == len(b) == k * len(folders)
        for i in range(len(a)):  # the official indexing: folder i // k, type code 2 + i % 4 or 4 + i % 2
            x, y = a[i], b[i]
            code = int(x["type_code"])
            assert code == (2 + i % 4 if use_real else 4 + i % 2) and code == int(y["type_code"])
            ks, kt, kr = TYPE_TABLE[code]
            ref = np.array(Image.open(folders[i // k] / FILES[kr]).convert("RGB"))
            assert torch.equal(x["reference"], torch.from_numpy(ref).permute(2, 0, 1).float() / 255)
            assert all(torch.equal(x[n], y[n]) for n in ("source", "target", "reference"))


def test_vanilla_pickle_groups_faces_by_identity_folder(official_files):
    prep, _ = official_files
    items = read_vanilla_pickle(prep / "vanilla.pickle")
    fs = FaceSet.load(prep)
    assert len(items) == len(fs) == 6
    by_path = {str(fs.image_path(f).resolve()): f for f in fs}
    for path, quality in items:
        f = by_path[path]
        assert Path(path).is_file() and quality == f.quality.sharpness
        assert path.split("/")[-2] == slug(f.identity) == f.identity  # the official trainer's identity
    assert {p.split("/")[-2] for p, _ in items} == {"person_a", "person_b", "person_c"}


def _official_module(checkout: Path) -> types.ModuleType:
    """modules/dataset/dataloader.py of a ReliableSwap checkout, with its unrelated imports stubbed."""

    class _Compose:
        def __init__(self, ts):
            self.ts = ts

        def __call__(self, x):
            for t in self.ts:
                x = t(x)
            return x

    tv = types.ModuleType("torchvision")
    tv.transforms = types.SimpleNamespace(Compose=_Compose, ToTensor=lambda: (lambda x: x), Normalize=lambda *a, **k: (lambda x: x))
    occ = types.ModuleType("modules.dataset.occluder")
    occ.occlude_with_objects = lambda img, *a, **k: (img, None)
    real = types.ModuleType("RealOcc")
    real.msml_occ = types.ModuleType("RealOcc.msml_occ")
    stubs = {"torchvision": tv, "modules": types.ModuleType("modules"), "modules.dataset": types.ModuleType("modules.dataset"),
             "modules.dataset.occluder": occ, "RealOcc": real, "RealOcc.msml_occ": real.msml_occ}
    with stub_modules(stubs):
        spec = importlib.util.spec_from_file_location("official_dataloader", checkout / "modules" / "dataset" / "dataloader.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


def test_official_loader_reads_our_files(official_files):
    checkout = os.environ.get("RELIABLESWAP_OFFICIAL")
    if not checkout:
        pytest.skip("set RELIABLESWAP_OFFICIAL to a ygtxr1997/ReliableSwap checkout to run its loader on our files")
    prep, tri = official_files
    mod = _official_module(Path(checkout))
    folders = read_triplet_pickle(tri / "triplet.pickle")
    for use_real, k in ((False, 2), (True, 4)):
        ds = mod.TripletTrainDataset(vanilla_pickle=str(prep / "vanilla.pickle"), triplet_pickle=str(tri / "triplet.pickle"),
                                     same_rate=0, image_size=256, transform=None, use_real=use_real)
        assert ds.len_vanilla == 6 and set(ds.ids) == {"person_a", "person_b", "person_c"}
        assert len(ds) == 6 + k * len(folders)
        ours = TripletDataset(tri / "triplet.pickle", use_real=use_real)
        for i in range(k * len(folders)):
            item = ds[6 + i]
            assert int(item["type_code"][0]) == int(ours[i]["type_code"])
            for theirs, key in (("source_image", "source"), ("target_image", "target"), ("refer_image", "reference")):
                assert np.array_equal(item[theirs], (ours[i][key] * 255).round().byte().permute(1, 2, 0).numpy()), (i, key)
        assert int(ds[0]["type_code"][0]) in (0, 1)  # vanilla part: our crops, grouped by identity folder
