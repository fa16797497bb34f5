"""Occluder masks per crop (hands, glasses frames, hair over the forehead) stored by prep beside
faces.jsonl, and synthesis that respects them: on the shared photos, glasses are found on the two
FFHQ faces that wear them and on no London-set face; the identity donor's frame never comes along
into a fake; with ``glasses = "keep"`` the attribute donor's frame stays, untouched; the masks prep
stored give the same fakes as the masks measured on the fly; a mask path or file out of bounds is
refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from kornia.color import rgb_to_lab

from reliableswap.faces.hands import hand_mask
from reliableswap.faces.occluders import MIN_RAYS, decode_masks, glasses_mask, glasses_score
from reliableswap.geometry.grid import warp_backward
from reliableswap.images import load_rgb, read_crop, to_tensor
from reliableswap.recipes import TripletRecipe
from reliableswap.synth import meshswap as ms
from reliableswap.synth.pipeline import Synthesizer
from reliableswap.contracts import FaceSet
from triplets.records import PairRecord

GLASSES = ("ffhq_00005", "ffhq_00009")  # a man with glasses and a microphone; a young man with glasses, turned


def _faces(prepped):
    faces = FaceSet.load(prepped[0])
    return faces, list(faces)


def _batch(faces, rs):
    return (to_tensor([read_crop(faces, r) for r in rs]), torch.tensor([r.landmarks68 for r in rs], dtype=torch.float32),
            torch.tensor([r.mesh468 for r in rs], dtype=torch.float32))


def test_glasses_are_found_on_the_faces_that_wear_them_and_on_no_other(prepped):
    faces, recs = _faces(prepped)
    with_glasses = [r for r in recs if any(g in r.origin.path for g in GLASSES)]
    without = [r for r in recs if "/london_set/" in r.origin.path or any(f"ffhq_0000{k}" in r.origin.path for k in (1, 2, 4, 6, 8))]
    assert len(with_glasses) == 2 and len(without) >= 14
    img, _, mesh = _batch(faces, with_glasses + without)
    mask, score = glasses_mask(img, mesh)
    n = len(with_glasses)
    assert bool((score[:n] >= MIN_RAYS).all()) and bool((score[n:] < MIN_RAYS).all()), score
    assert float(mask[n:].amax()) == 0.0
    # the frame lies round the eyes and over the nose bridge, a small part of the crop
    assert bool(((mask[:n] > 0.5).float().mean((1, 2, 3)) > 0.01).all()) and float((mask[:n] > 0.5).float().mean()) < 0.1
    for k in range(n):
        ys = torch.nonzero(mask[k, 0] > 0.5)[:, 0].float()
        eye_y = mesh[k, [33, 263], 1].mean()
        assert abs(float(ys.median()) - float(eye_y)) < 0.12 * img.shape[-1]


def test_the_identity_donor_s_frame_never_comes_into_the_fake(prepped):
    """A glasses wearer gives its identity to bare faces: where the fake would have shown its
    frame, it now shows skin (lighter than the dark frame, close to the skin around it)."""
    faces, recs = _faces(prepped)
    src = next(r for r in recs if GLASSES[0] in r.origin.path)
    others = [r for r in recs if "/london_set/" in r.origin.path][:3]
    ia, la, ma = _batch(faces, [src] * len(others))
    ib, lb, mb = _batch(faces, others)
    fill = Synthesizer(TripletRecipe().with_overrides({"masks.glasses": "fill"})).render_mesh(ia, la, ib, lb, ma, mb)
    off = Synthesizer(TripletRecipe().with_overrides({"masks.glasses": "off"})).render_mesh(ia, la, ib, lb, ma, mb)
    frame = fill["source_glasses"] & (fill["mask"] > 0.9)
    assert int(frame.sum()) > 300
    ell_fill = rgb_to_lab(fill["fake"])[:, :1]
    ell_off = rgb_to_lab(off["fake"])[:, :1]
    # the frame (dark) is gone: its dark pixels are much lighter now, and fewer are left dark (the frame edges the mask missed feed the fill)
    skin = float(ell_off[(fill["mask"] > 0.9) & ~frame].median())
    dark = frame & (ell_off < skin - 15)
    assert int(dark.sum()) > 100
    assert float((ell_fill - ell_off)[dark].mean()) > 10
    assert float((ell_fill[frame] < skin - 15).float().mean()) < 0.6 * float((ell_off[frame] < skin - 15).float().mean())
    # no ghost: below the eyes the fake reads as bare (the frame's soft rim, left outside the
    # mask, read as 0.23 of the rays without the fill's 1 px growth). The rays' ring starts just
    # outside the face mesh's own eye contour, which sits on the lashes; with the lids moved to the
    # 68 points' (the default) this man's lower lash line is rendered into that ring (0.27 of the
    # rays, no rim in sight: the sheet), so the rim is checked on renders with the mesh's own lids
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ms, "refine_eyelids", lambda mesh, _: mesh)
        native = {rule: Synthesizer(TripletRecipe().with_overrides({"masks.glasses": rule})).render_mesh(ia, la, ib, lb, ma, mb)
                  for rule in ("fill", "off")}
    assert float(glasses_score(native["fill"]["fake"], native["fill"]["mesh"]).max()) <= 0.15
    assert float(glasses_score(native["off"]["fake"], native["off"]["mesh"]).min()) >= 0.4
    g_fill, g_off = glasses_score(fill["fake"], fill["mesh"]), glasses_score(off["fake"], off["mesh"])
    assert float(g_fill.max()) < 0.4 * MIN_RAYS and bool((g_fill < 0.5 * g_off).all()), (g_fill, g_off)
    # nothing else moved: outside the filled frame (and its blend) the two fakes agree
    far = torch.nn.functional.max_pool2d(fill["source_glasses"].float(), 43, 1, 21) < 0.5
    assert float((fill["fake"] - off["fake"]).abs().amax(1, keepdim=True)[far].max()) < 0.05


def test_keep_leaves_the_attribute_donor_s_frame_untouched(prepped):
    """``keep``: the target's glasses frame lies over the finished fake, pixel for pixel; with
    ``fill`` (the default) it is painted over."""
    faces, recs = _faces(prepped)
    tgt = next(r for r in recs if GLASSES[0] in r.origin.path)
    others = [r for r in recs if "/london_set/" in r.origin.path][:3]
    ia, la, ma = _batch(faces, others)
    ib, lb, mb = _batch(faces, [tgt] * len(others))
    g_b = glasses_mask(ib, mb)[0]
    out = Synthesizer(TripletRecipe().with_overrides({"masks.glasses": "keep"})).render_mesh(ia, la, ib, lb, ma, mb)
    where = warp_backward(g_b, out["flow"], "zeros") > 0.99
    background = warp_backward(ib, out["flow"], "border")
    assert int(where.sum()) > 300
    assert float((out["fake"] - background).abs().amax(1, keepdim=True)[where].mean()) < 0.02
    fill = Synthesizer(TripletRecipe().with_overrides({"masks.glasses": "fill"})).render_mesh(ia, la, ib, lb, ma, mb)
    assert float((fill["fake"] - background).abs().amax(1, keepdim=True)[where].mean()) > 0.05  # painted over without keep


def test_prep_stores_the_masks_and_triplets_read_them_back(prepped, tmp_path):
    faces, recs = _faces(prepped)
    rec = next(r for r in recs if GLASSES[0] in r.origin.path)
    assert rec.occluders is not None and rec.occluders.mask.startswith("occluders/")
    stored = decode_masks(torch.from_numpy(load_rgb(faces.folder / rec.occluders.mask)))
    assert stored.shape == (3, rec.size, rec.size)
    assert rec.occluders.area.hands > 0.02 and rec.occluders.area.glasses > 0.01 and set(rec.occluders.sources) == {"hands", "glasses", "hair"}
    img, _, mesh = _batch(faces, [rec])
    assert float((stored[1] - glasses_mask(img, mesh)[0][0, 0]).abs().max()) <= 1 / 255 + 1e-6
    drawn = hand_mask(torch.tensor(rec.hands, dtype=torch.float32), torch.zeros(len(rec.hands), dtype=torch.long), 1, (rec.size, rec.size))
    assert float((stored[0] - drawn[0, 0]).abs().max()) <= 1 / 255 + 1e-6
    assert all(r.occluders is not None for r in recs)
    # the same fakes from the stored masks as from masks measured on the crops
    from reliableswap.commands.triplets import ChunkReader

    other = next(r for r in recs if "/london_set/" in r.origin.path)
    ia, la, ma = _batch(faces, [rec, other])
    ib, lb, mb = _batch(faces, [other, rec])
    reader = ChunkReader.__new__(ChunkReader)
    reader.faces = faces
    ga = torch.from_numpy(np.stack([reader.glasses(rec), reader.glasses(other)]))[:, None]
    syn = Synthesizer(TripletRecipe())
    live = syn.cycle(ia, la, ib, lb, mesh_a=ma, mesh_b=mb)
    read = syn.cycle(ia, la, ib, lb, mesh_a=ma, mesh_b=mb, glasses_a=ga, glasses_b=ga.flip(0))
    assert float((live["fake_st"] - read["fake_st"]).abs().mean()) < 2e-3
    assert float((live["fake_ts"] - read["fake_ts"]).abs().mean()) < 2e-3


def test_prep_takes_glasses_and_hair_from_bisenet_when_asked(faces_dir, tmp_path, monkeypatch, capsys):
    """``prep --landmarks mesh --occluders bisenet`` (random BiSeNet weights in the published
    layout: the plumbing, not the quality): the stored glasses channel is the parser's ``eye_g``
    class, the hair channel its hair and hat classes over the face mesh, and the record names
    BiSeNet; without the weights file, or without the mesh, one line at start-up and nothing written."""
    from reliableswap.cli import main
    from reliableswap.synth.learned import FaceParser, class_mask
    from reliableswap.synth.meshswap import region_map
    from reliableswap.testing.nets import write_random_weights

    from reliableswap.faces.models import FACE_MESH_MODEL, WHEEL_MODELS, wheel_model

    image = faces_dir / "ffhq" / "ffhq_00005_512.png"
    for m in (FACE_MESH_MODEL, *WHEEL_MODELS["hands"]):  # the mesh and hand files stay where they are
        monkeypatch.setenv(m.env, str(wheel_model(m)))
    monkeypatch.setenv("RELIABLESWAP_WEIGHTS", str(tmp_path / "empty"))
    assert main(["prep", str(image), "--out", str(tmp_path / "none"), "--landmarks", "mesh", "--occluders", "bisenet"]) == 2
    assert "79999_iter.pth" in capsys.readouterr().err and not (tmp_path / "none" / "faces.jsonl").exists()
    assert main(["prep", str(image), "--out", str(tmp_path / "dlib"), "--occluders", "bisenet"]) == 2
    assert "--landmarks mesh" in capsys.readouterr().err
    write_random_weights("bisenet", tmp_path / "w")
    monkeypatch.setenv("RELIABLESWAP_WEIGHTS", str(tmp_path / "w"))
    other = image.with_name("ffhq_00009_512.png")
    assert main(["prep", str(image), str(other), "--out", str(tmp_path / "p"), "--landmarks", "mesh", "--occluders", "bisenet",
                 "--workers", "1"]) == 0
    faces = FaceSet.load(tmp_path / "p")
    rec = next(r for r in faces if "ffhq_00005" in r.origin.path)
    assert rec.occluders.sources["glasses"].startswith("BiSeNet") and rec.occluders.sources["hair"].startswith("BiSeNet")
    stored = decode_masks(torch.from_numpy(load_rgb(faces.folder / rec.occluders.mask)))
    img, _, mesh = _batch(faces, [rec])
    parsed = FaceParser(tmp_path / "w", amp=False)(img)
    on_face = region_map(mesh, rec.size)[2] >= 0
    assert torch.equal(stored[1], class_mask(parsed, ("eye_g",))[0, 0])
    assert torch.equal(stored[2], (class_mask(parsed, ("hair", "hat")) * on_face)[0, 0])
    assert 0 < float(on_face.float().mean()) < 1
    # triplets read the parser's hair back (the masks of random weights: the plumbing)
    ids = [r.id for r in faces]
    PairRecord.write(tmp_path / "pairs.jsonl", [PairRecord(a=ids[0], b=ids[1])])
    # (glasses off: random weights find no frame, and a frame left on the fake would reject the pair)
    (tmp_path / "r.toml").write_text('kind = "triplets"\n[masks]\nglasses = "off"\n')
    assert main(["triplets", str(tmp_path / "p"), "--pairs", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "t"),
                 "--recipe", str(tmp_path / "r.toml")]) == 0


def test_stored_hair_over_the_face_stays_the_attribute_donor_s_and_never_comes_from_the_identity_donor(prepped):
    """Hair a face parser stored over a face (here a lock painted as a mask over the right eye and
    cheek of real London-set faces): as the attribute donor's, the fake keeps the target's pixels
    there; as the identity donor's, none of it enters the fake's blend mask."""
    from reliableswap.faces import mesh as fm
    from reliableswap.faces.masks import soft_polygon_mask

    faces, recs = _faces(prepped)
    london = [r for r in recs if "/london_set/" in r.origin.path][:6]
    ia, la, ma = _batch(faces, london[:3])
    ib, lb, mb = _batch(faces, london[3:])
    s = ia.shape[-1]

    def lock(mesh):  # the right eye, its brow and the cheek below it
        pts = mesh[:, fm.RIGHT_EYE + fm.RIGHT_BROW, :2]
        lo, hi = pts.amin(1) - 4, pts.amax(1) + torch.tensor([4.0, 30.0])
        poly = torch.stack([lo, torch.stack([hi[:, 0], lo[:, 1]], -1), hi, torch.stack([lo[:, 0], hi[:, 1]], -1)], 1)
        return soft_polygon_mask(poly, s, s, torch.full((len(mesh),), 0.5))

    hair_b, none_a = lock(mb), torch.zeros(3, 1, s, s)
    syn = Synthesizer(TripletRecipe().with_overrides({"reenact.mirror": False}))
    out = syn.cycle(ia, la, ib, lb, mesh_a=ma, mesh_b=mb, hair_a=none_a, hair_b=hair_b)
    plain = syn.cycle(ia, la, ib, lb, mesh_a=ma, mesh_b=mb)
    where = warp_backward(hair_b, out["flow_st"], "zeros") > 0.99
    background = warp_backward(ib, out["flow_st"], "border")
    assert int(where.sum()) > 500
    assert float((out["fake_st"] - background).abs().amax(1, keepdim=True)[where].mean()) < 0.02
    assert float((plain["fake_st"] - background).abs().amax(1, keepdim=True)[where].mean()) > 0.05  # painted over without it
    # the other way (ts: b gives its identity to a): b's lock never enters the mask
    taken = out["source_hand_ts"] > 0.5
    assert int(taken.sum()) > 300
    assert float(out["mask_ts"][taken].max()) < 0.5


def test_a_mask_path_outside_the_folder_or_a_wrong_mask_is_refused(prepped, tmp_path):
    from reliableswap import cli

    src = prepped[0]
    bad = tmp_path / "prep"
    shutil.copytree(src, bad)
    lines = (bad / "faces.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["occluders"]["mask"] = "../../etc/passwd"
    (bad / "faces.jsonl").write_text("\n".join([json.dumps(rec)] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"faces.jsonl:1: occluders.mask"):
        FaceSet.load(bad)
    # a mask of the wrong size: that pair is skipped with a reason, the others are made
    ok = tmp_path / "prep2"
    shutil.copytree(src, ok)
    faces = FaceSet.load(ok)
    recs = [r for r in faces if "/london_set/" in r.origin.path][:3]
    recs[1] = next(r for r in faces if GLASSES[1] in r.origin.path)  # a mask that is read: its face wears glasses
    small = np.zeros((8, 8, 3), np.uint8)
    import cv2

    cv2.imwrite(str(ok / recs[1].occluders.mask), small)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"schema": "reliableswap.pairs/1", "a": a.id, "b": b.id})
                             + "\n" for a, b in ((recs[1], recs[2]), (recs[0], recs[2]))))
    out = tmp_path / "tri"
    code = cli.main(["triplets", str(ok), "--pairs", str(pairs), "--out", str(out), "--batch", "2"])
    assert code == 0
    rejects = (out / "rejects.jsonl").read_text()
    assert "occluders/" in rejects and len(rejects.splitlines()) == 1
    assert json.loads((out / "summary.json").read_text())["counts"]["written"] == 1


def test_a_killed_prep_s_mask_temps_are_swept_on_the_rerun(faces_dir, tmp_path):
    """Masks are written atomically beside the crops; what a killed writer left in occluders/ (a
    dead process's temp) is removed when the run resumes, as in faces/."""
    from reliableswap.choices import LandmarkBackend
    from reliableswap.commands.prep import PrepConfig, run_prep

    cfg = PrepConfig(landmarks=LandmarkBackend.mesh, identity_from_folder=True)
    out = tmp_path / "prep"
    run_prep([faces_dir / "cc0_one_person"], out, cfg)
    masks = sorted((out / "occluders").rglob("*.png"))
    assert masks and all(m.parent.name == "cc0_one_person" for m in masks)
    stale = [out / "occluders" / ".a.png.999999.x.tmp", masks[0].parent / ".b.png.999999.y.tmp"]
    for s in stale:
        s.write_bytes(b"partial")
    run_prep([faces_dir / "cc0_one_person"], out, cfg)
    assert not any(s.exists() for s in stale) and sorted((out / "occluders").rglob("*.png")) == masks
