"""The dense face mesh (issue 10): the network in torch against the TFLite interpreter, its points
against dlib's, mesh reenactment / rendering / reshaping geometry, and the mesh recipe end to end,
all on the shared real faces."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from reliableswap.faces import mesh as fm
from reliableswap.images import load_rgb
from reliableswap.recipes import RecipeError, TripletRecipe, validate_recipe
from reliableswap.synth import meshswap as ms
from triplets.records import ContractError
from reliableswap.contracts import FaceRecord


@pytest.fixture(scope="module")
def real(prepped):
    """Crops (B×3×256×256), landmarks68 and stored mesh468 of every prepped shared face."""
    out, _ = prepped
    recs = FaceRecord.read(out / "faces.jsonl")
    imgs = torch.stack([torch.from_numpy(load_rgb(out / r.image).copy()).permute(2, 0, 1).float() / 255 for r in recs])
    lm = torch.tensor([r.landmarks68 for r in recs], dtype=torch.float32)
    mesh = torch.tensor([r.mesh468 for r in recs], dtype=torch.float32)
    return recs, imgs, lm, mesh


def iod(lm: torch.Tensor) -> torch.Tensor:
    return (lm[:, 36:42].mean(1) - lm[:, 42:48].mean(1)).norm(dim=-1)


def test_torch_network_equals_tflite_interpreter(real):
    litert = pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert (test extra) not installed")
    from kornia.geometry.transform import warp_affine

    _, imgs, lm, _ = real
    net = fm.FaceMesh().eval()
    x = warp_affine(imgs[:12], fm.roi_from_landmarks68(lm[:12].double()).float(), (fm.INPUT, fm.INPUT), align_corners=True)
    with torch.no_grad():
        coords, flag = net.net(x)
    it = litert.Interpreter(model_path=str(fm.mesh_model_path()))
    it.allocate_tensors()
    inp, outs = it.get_input_details()[0]["index"], it.get_output_details()
    for i in range(len(x)):
        it.set_tensor(inp, x[i:i + 1].permute(0, 2, 3, 1).contiguous().numpy())
        it.invoke()
        ref = {o["name"]: it.get_tensor(o["index"]) for o in outs}
        np.testing.assert_allclose(coords[i].reshape(-1).numpy(), ref["conv2d_20"].reshape(-1), atol=2e-3)  # 192-px units
        np.testing.assert_allclose(flag[i].reshape(-1).numpy(), ref["conv2d_30"].reshape(-1), atol=2e-3)


def test_mesh_agrees_with_dlib_where_points_correspond(real):
    recs, imgs, lm, mesh = real
    assert mesh.shape[1:] == (468, 3) and len(recs) >= 40
    err = (fm.mesh_to_68(mesh) - lm).norm(dim=-1) / iod(lm).unsqueeze(1)  # B×68, interocular units
    assert float(err.mean()) < 0.1
    assert float(err[:, 36:48].mean()) < 0.08  # eyes
    assert float(err[:, 48:68].mean()) < 0.1  # mouth
    assert float(err.mean(1).max()) < 0.25  # no face far off
    # the stored mesh is the network's output on the crop (prep --landmarks mesh)
    again, score = fm.FaceMesh().eval().from_landmarks68(imgs[:6], lm[:6])
    # (prep measured the float crop, here its 8-bit PNG: a tenth of a pixel apart at most)
    assert float((again[..., :2] - mesh[:6, :, :2]).abs().max()) < 0.2 and bool((score > 0.9).all())


def test_mirror_and_topology_tables():
    t = fm.topology()
    m = t["mirror"]
    assert bool((m[m] == torch.arange(468)).all())  # an involution
    assert int((t["labels"] == fm.MOUTH_R).sum()) >= 12 and int((t["labels"] == fm.RIGHT_EYE_R).sum()) == 14
    assert t["faces"].max() < 468 and len(t["faces"]) > 850
    x = torch.rand(2, 468, 3) * 200
    assert torch.allclose(fm.mirror_mesh(fm.mirror_mesh(x, 256), 256), x, atol=1e-4)


def test_reenact_mesh_keeps_shape_takes_pose_and_mouth(real):
    _, _, lm, mesh = real
    a, b = mesh[:20], mesh[20:40]
    assert torch.allclose(ms.reenact_mesh(a, a), a, atol=1e-3)  # nothing to transfer onto itself
    ab = ms.reenact_mesh(a, b)
    from reliableswap.faces.pose import head_pose

    # pose from b: the head pose of M_ab's 68 points is b's, within a few degrees
    pose_err = (head_pose(fm.mesh_to_68(ab).double()) - head_pose(fm.mesh_to_68(b).double())).abs()
    assert float(pose_err.mean()) < 3 and float(pose_err.amax()) < 10
    # shape from a: after the best similarity, M_ab's expression-free part is nearer a's than b's
    t = fm.topology()
    sel = (t["w_mouth"] + t["w_eyes"]) < 0.05

    def residual(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        fitted = ms.similarity3d(x[:, sel], ref[:, sel], torch.ones(int(sel.sum())))
        return (fitted - ref[:, sel]).norm(dim=-1).mean(1)
    assert bool((residual(a, ab) < 0.5 * residual(b, ab)).all())
    # mouth opening from b (relative to the mouth width)
    assert float((fm.mouth_open_ratio(ab) - fm.mouth_open_ratio(b)).abs().mean()) < 0.05


def test_render_onto_own_mesh_gives_the_face_back(real):
    _, imgs, _, mesh = real
    i = slice(0, 8)
    r = ms.render_mesh(imgs[i], mesh[i], imgs[i], mesh[i], mesh[i], "torch")
    cov = r["covered"] & ~r["hidden"]
    err = ((r["face"] - imgs[i]).abs() * cov).sum() / (cov.sum() * 3)
    assert float(err) < 0.01 and float(r["hidden"].float().mean()) < 0.01


def test_hidden_points_are_not_sampled_from_what_covers_them(real):
    """A strongly turned source: the far cheek is hidden; those pixels are flagged and filled."""
    recs, imgs, _, mesh = real
    yaw = torch.tensor([r.pose.yaw for r in recs])
    a = int(yaw.abs().argmax())
    b = int(yaw.abs().argmin())
    mab = ms.reenact_mesh(mesh[a:a + 1], mesh[b:b + 1])
    r = ms.render_mesh(imgs[a:a + 1], mesh[a:a + 1], imgs[b:b + 1], mesh[b:b + 1], mab, "torch")
    assert abs(float(yaw[a])) > 15
    assert int(r["hidden"].sum()) > 0  # some of the frontal target's face is hidden in the turned source
    assert torch.isfinite(r["face"]).all()


def test_slivers_left_out_along_a_turned_outline_are_filled_from_the_identity_face(real):
    """The thin triangles that fold over a turned cheek leave slivers inside the face's outline
    uncovered (a sawtooth along it, where the target showed through): the render covers them,
    sampled from the identity face like hidden points, as skin."""
    recs, imgs, _, mesh = real
    yaw = torch.tensor([r.pose.yaw for r in recs])
    turned = yaw.abs().argsort(descending=True)[:8]  # attribute donors: the most turned heads
    ids = yaw.abs().argsort()[:8]  # identity donors: the most frontal
    mab = ms.reenact_mesh(mesh[ids], mesh[turned])
    s = imgs.shape[-1]
    raw = ms.region_map(mab, s, "torch")[2] >= 0
    gaps = ms.silhouette_gaps(mab, raw)
    assert int(gaps.sum()) > 50  # slivers on these fakes (the demo's faces: 19 of 30 fakes, up to 425 px)
    r = ms.render_mesh(imgs[ids], mesh[ids], imgs[turned], mesh[turned], mab, "torch")
    assert bool(r["covered"][gaps].all()) and bool(r["hidden"][gaps].all())
    assert bool((r["labels"][gaps] == fm.SKIN).all())
    assert int(ms.silhouette_gaps(mab, r["covered"]).sum()) == 0
    # each filled sliver takes the colour of the identity face's skin beside it, not black
    assert float(r["face"].amax(1, keepdim=True)[gaps].min()) > 0.1


def test_the_mesh_s_eyelids_follow_the_68_points_and_nothing_else_moves(real):
    """The face mesh reads a squint as an open eye; ``refine_eyelids`` scales each lid's height to
    the 68 points' lids: only the 28 lid vertices between the corners move, in the image plane,
    and the refined contours' openness follows dlib's eyes far closer than the mesh's own."""
    from reliableswap.faces.pose import eye_aspect_ratio

    _, _, lm, mesh = real
    ref = ms.refine_eyelids(mesh, lm)
    moved = (ref != mesh).any(-1).any(0)
    lids = [v for ring, _ in ms.EYELIDS for v in ring[1:8] + ring[9:16]]
    assert set(torch.nonzero(moved).flatten().tolist()) <= set(lids) and bool(moved.any())
    assert torch.equal(ref[..., 2], mesh[..., 2])
    ear = eye_aspect_ratio(lm).double().flatten()

    def agreement(m: torch.Tensor) -> float:  # correlation of the contours' openness with dlib's, over every eye
        return float(torch.corrcoef(torch.stack([ms.eye_openness(m).double().flatten(), ear]))[0, 1])

    assert agreement(ref) > 0.95 and agreement(mesh) < 0.5  # measured: 0.99 against 0.25


def test_the_lips_cover_the_lips_the_image_shows(real):
    """A grin's mesh lips sit on its teeth (the upper lip lifted above the fitted contour):
    ``refine_lips`` moves only the lip rings and the skin between the upper lip and the nose, in
    the image plane. Over the shared faces whose mesh lips show teeth or the mouth's cavity (more
    than 15 % of the lip), that share falls by a fifth; no face's lips take more of its teeth; lips
    that show none (under 5 %) barely move."""
    _, imgs, lm, mesh = real
    ref = ms.refine_lips(imgs, mesh)
    assert torch.equal(ref[..., 2], mesh[..., 2])
    move = (ref - mesh)[..., :2].norm(dim=-1)  # B×468
    rings = sorted({v for ring in ms.LIP_RINGS for v in ring})
    others = [v for v in range(468) if v not in rings]
    # the skin that follows lies below the nose base's level (towards the mouth), never past it,
    # and moves less than the lips
    nose = mesh[:, ms.SUBNASALE, :2].unsqueeze(1)
    up = torch.nn.functional.normalize(nose[:, 0] - mesh[:, fm.LIPS_OUTER[5], :2], dim=-1).unsqueeze(1)
    skin = move[:, others] > 0  # B×N
    assert bool(skin.any())
    assert bool((((mesh[:, others, :2] - nose) * up).sum(-1)[skin] <= 1e-3).all())
    assert bool((move[:, others] <= move[:, rings].amax(1, keepdim=True) + 1e-4).all())
    labels0 = ms.region_map(mesh, imgs.shape[-1])[2]
    inside = ms.teeth_or_cavity(imgs, *ms.skin_lab_stats(imgs, labels0))

    def share(m: torch.Tensor) -> torch.Tensor:  # B: the lip pixels that read as teeth or cavity
        lips = ms.region_map(m, imgs.shape[-1])[2] == fm.LIPS_R
        return (lips & inside).flatten(1).sum(1) / lips.flatten(1).sum(1).clamp_min(1)

    before, after = share(mesh), share(ref)
    grin, closed = before > 0.15, before < 0.05
    assert int(grin.sum()) >= 5 and int(closed.sum()) >= 5
    assert float(after[grin].mean()) < 0.85 * float(before[grin].mean())  # measured: 0.305 → 0.241 over 36 faces
    assert float((after - before).max()) < 0.01  # no face's lips take more of its teeth (measured: +0.002 at most)
    assert float(move[closed][:, rings].amax()) <= 2.0  # measured: 1.5 px at most


def test_forehead_hair_is_told_from_the_skin_s_plain_part(real):
    """The forehead occluder rule tells hair from skin by the skin's colour. Taken over all the
    mesh's skin, the dark tail of nostrils, lash lines and creases widened the skin's lightness
    spread until brown bangs read as skin: a fifth of the thick fringe of FFHQ face 8 was found.
    From the plain skin (lightness between its 10th and 95th percentiles) the fringe is found
    whole, and the median face's forehead stays clear."""
    recs, imgs, _, mesh = real
    labels = ms.region_map(mesh, imgs.shape[-1])[2]
    hair = ms.occluders(imgs, labels, ms.skin_mask(labels)) > 0.5
    forehead = labels == fm.FOREHEAD_R
    found = (hair & forehead).flatten(1).sum(1) / forehead.flatten(1).sum(1).clamp_min(1)
    by_id = {r.id.rsplit("-", 1)[0]: float(f) for r, f in zip(recs, found)}
    # measured: 0.99 and 0.66 of these two fringes (0.21 and 0.26 before); 0.03 over the median face
    assert by_id["ffhq_00008_512"] > 0.8 and by_id["astronaut_eileen_collins"] > 0.5
    assert float(found.median()) < 0.05


def test_the_skin_transfer_stretches_no_colour_direction_more_than_its_cap(real):
    """The mesh path's colour transfer (LCT on skin pixels) maps the identity face's skin
    deviations through ``C_b^{1/2} C_a^{-1/2}``: between the shared faces that stretches some colour
    direction several times (a pale, even skin brought to a warmer, more varied one: its freckles,
    pores and shading turn to blotches). Capped, no skin pixel's deviation from the skin's
    mean grows more than :data:`meshswap.LCT_MAX_GAIN` times, on the pairs that needed the cap most."""
    from reliableswap.synth.appearance import _sqrtm, linear_transfer, masked_cov

    _, imgs, _, mesh = real
    skin = ms.skin_mask(ms.region_map(mesh, imgs.shape[-1])[2])
    mu, cov = masked_cov(imgs, skin)
    root, inv_root = _sqrtm(cov), _sqrtm(cov, inv=True)
    gain = torch.linalg.matrix_norm(root.unsqueeze(0) @ inv_root.unsqueeze(1), ord=2)  # [a, b]: a's skin onto b's
    gain.fill_diagonal_(0)
    # the cap matters on real faces: measured above it for 57 % of the ordered pairs, up to 99 (a
    # grey photo's skin has next to no spread in colour, which the transfer would blow up)
    assert float((gain > ms.LCT_MAX_GAIN).float().mean()) > 0.3 and float(gain.max()) > 10
    worst = torch.topk(gain.flatten(), 4).indices
    ia, ib = worst // gain.shape[1], worst % gain.shape[1]
    out = linear_transfer(imgs[ia], imgs[ib], skin[ia], skin[ib], max_gain=ms.LCT_MAX_GAIN)
    dev_out = (out - mu[ib].view(-1, 3, 1, 1)).norm(dim=1)
    dev_in = (imgs[ia] - mu[ia].view(-1, 3, 1, 1)).norm(dim=1)
    on = skin[ia, 0] > 0.5
    assert bool((dev_out[on] <= ms.LCT_MAX_GAIN * dev_in[on] + 1e-4).all())
    # without a cap the transfer is the official LCT, unchanged
    plain = linear_transfer(imgs[ia], imgs[ib], skin[ia], skin[ib])
    assert float((plain - out).abs().amax()) > 0.05


def test_the_fake_s_eyes_are_as_open_as_the_target_s(real):
    """The most closed eyes of the shared faces as identity donors onto the most open as targets,
    and the reverse: the fakes' re-measured eye openness (dlib's eye aspect ratio) is closer to the
    target's than with the mesh's own eyelids (measured: 0.166 → 0.130 mean error); where the
    identity face's eyes are too closed to open, the fake's eye openings are the target's."""
    from reliableswap.faces.landmarks import DlibLandmarks
    from reliableswap.faces.pose import eye_aspect_ratio, eye_openness_error
    from reliableswap.images import to_uint8
    from reliableswap.synth.pipeline import Synthesizer

    _, imgs, lm, mesh = real
    order = eye_aspect_ratio(lm).mean(1).argsort()
    closed, wide = order[:6], order[-6:]
    ia, ib = torch.cat([closed, wide]), torch.cat([wide, closed])
    syn = Synthesizer(TripletRecipe().with_overrides({"masks.hands": False}))
    dlib = DlibLandmarks()

    def eye_err() -> torch.Tensor:
        out = syn.render_mesh(imgs[ia], lm[ia], imgs[ib], lm[ib], mesh[ia], mesh[ib])
        got = torch.from_numpy(dlib.remeasure(to_uint8(out["fake"]), out["landmarks"].numpy()))
        return eye_openness_error(got, lm[ib])

    new = eye_err()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ms, "refine_eyelids", lambda m, _: m)
        old = eye_err()
    assert float(new.mean()) < 0.85 * float(old.mean()), (new, old)
    # the squint onto an open eye: the rendered openings sample the target's eyes
    a, b = ms.refine_eyelids(mesh[closed[:1]], lm[closed[:1]]), ms.refine_eyelids(mesh[wide[-1:]], lm[wide[-1:]])
    ab = ms.reenact_mesh(a, b)
    assert bool((ms.eye_openness(a) < ms.EYE_FROM_B * ms.eye_openness(ab)).any())
    r = ms.render_mesh(imgs[closed[:1]], a, imgs[wide[-1:]], b, ab, "torch")
    eyes = (r["labels"] == fm.RIGHT_EYE_R) | (r["labels"] == fm.LEFT_EYE_R)
    assert int(eyes.sum()) > 50 and bool(r["eyes_from_b"][eyes].all())


def _pairs_by_mouth(real, n: int = 6) -> tuple[slice, torch.Tensor, torch.Tensor]:
    """The ``n`` widest-open mouths (identity donors) against the ``n`` most closed (targets)."""
    _, _, _, mesh = real
    order = fm.mouth_open_ratio(mesh).argsort()
    return order[-n:], order[:n]


def test_the_source_brows_eyes_and_lips_are_the_source_s(real):
    """Identity is read from the brows, eyes and lips: in the default recipe's blend mask every
    pixel of the fake's brows, eye openings and lips is the rendered source (mask ≈ 1), whatever
    the forehead trim asks; the brows keep the source's shape (only the target's raise moves them)."""
    from reliableswap.synth.pipeline import Synthesizer

    _, imgs, lm, mesh = real
    ia, ib = _pairs_by_mouth(real)
    for forehead in (0.2, 0.5):
        # hands off: a hand over a mouth is a real occluder and does take the lips (tests/test_hands.py)
        syn = Synthesizer(TripletRecipe().with_overrides({"blend.forehead": forehead, "masks.hands": False}))
        out = syn.render_mesh(imgs[ia], lm[ia], imgs[ib], lm[ib], mesh[ia], mesh[ib])
        labels = ms.region_map(out["mesh"], imgs.shape[-1])[2]
        core = (labels == fm.BROW_R) | (labels == fm.RIGHT_EYE_R) | (labels == fm.LEFT_EYE_R) | (labels == fm.LIPS_R)
        assert int(core.sum()) > 1000
        assert float(out["mask"][core].min()) > 0.95, forehead
    # brow shape: after removing each brow's mean, M_ab's brow is a's (in b's pose), not b's
    a, b = mesh[ia], mesh[ib]
    ab = ms.reenact_mesh(a, b)
    t = fm.topology()
    rigid = ((t["w_mouth"] + t["w_eyes"]) < 0.05).float()
    a_in_b = ms.similarity3d(a, b, rigid)
    for ring in (fm.RIGHT_BROW, fm.LEFT_BROW):
        centred = lambda m: m[:, ring, :2] - m[:, ring, :2].mean(1, keepdim=True)  # noqa: E731
        to_a = (centred(ab) - centred(a_in_b)).norm(dim=-1).mean(1)
        to_b = (centred(ab) - centred(b)).norm(dim=-1).mean(1)
        assert bool((to_a < 0.5 * to_b).all())


def test_the_source_s_teeth_never_land_on_the_fake_s_lips(real):
    """Wide-open source mouths onto closed target mouths: no lip or skin pixel of the render
    samples the source's mouth interior (the mesh opening or the teeth and cavity inside its lips);
    those pixels are filled from the lips around them."""
    _, imgs, _, mesh = real
    ia, ib = _pairs_by_mouth(real)
    a, b = mesh[ia], mesh[ib]
    ab = ms.reenact_mesh(a, b)
    r = ms.render_mesh(imgs[ia], a, imgs[ib], b, ab, "torch")
    assert int(r["into_mouth"].sum()) > 0  # there was something to keep out
    labels_a = ms.region_map(a, imgs.shape[-1])[2]
    inside = ms.mouth_interior(imgs[ia], labels_a, dilate=0)
    lips = (r["labels"] == fm.LIPS_R)
    teeth_like = ms.mouth_interior(r["face"], r["labels"], dilate=0) & lips  # without the rule: 12.7 % on the shared faces
    assert float(inside.float().mean()) > 0
    assert float(teeth_like.sum()) <= 0.02 * float(lips.sum())


def _paint_above_upper_lip(imgs: torch.Tensor, mesh: torch.Tensor, delta_lab: tuple[float, float, float],
                           reach: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """``imgs`` with the band between each mesh's upper lip arc and ``reach`` of its way up to the
    nose base's level painted in the face's skin colour moved by ``delta_lab`` (CIE-LAB), and the band
    (B×1×S×S bool) limited to skin."""
    from kornia.color import lab_to_rgb, rgb_to_lab

    from reliableswap.faces.masks import soft_polygon_mask
    from reliableswap.synth.appearance import masked_stats

    s = imgs.shape[-1]
    poly = ms.upper_lip_band(mesh, reach)
    labels = ms.region_map(mesh, s)[2]
    band = (soft_polygon_mask(poly, s, s, torch.full((len(imgs),), 0.5)) > 0.5) & (labels == fm.SKIN)
    mu, _ = masked_stats(rgb_to_lab(imgs), (labels == fm.SKIN).float())
    colour = lab_to_rgb(mu + torch.tensor(delta_lab).view(1, 3, 1, 1)).clamp(0, 1)
    return torch.where(band, colour.expand_as(imgs), imgs), band


def test_the_source_s_upper_lip_outside_its_mesh_never_lands_on_the_fake_s_skin(real):
    """A grin lifts the upper lip above the fitted mesh contour: that lip, left in the mesh's skin,
    would be rendered above the target's lip as a moustache-like band. Painted into the real
    sources as lip (redder and darker than their skin) above the mesh's lip, it is found and
    never reaches the fake; painted as a moustache (darker, not redder) it is identity and comes
    along."""
    from kornia.color import rgb_to_lab

    _, imgs, _, mesh = real
    ia, ib = _pairs_by_mouth(real)
    a, b = mesh[ia], mesh[ib]
    ab = ms.reenact_mesh(a, b)
    s = imgs.shape[-1]
    labels_a = ms.region_map(a, s)[2]
    lip_a, lip_band = _paint_above_upper_lip(imgs[ia], a, (-15.0, 22.0, 6.0))
    tache_a, tache_band = _paint_above_upper_lip(imgs[ia], a, (-35.0, -4.0, -4.0))
    assert int(lip_band.sum()) > 200 * len(ia)
    found = ms.stray_upper_lip(lip_a, a, labels_a)
    assert float((found & lip_band).sum()) >= 0.95 * float(lip_band.sum())
    # the painted moustache is never taken for lip (only its rim may be, beside the face's own lip)
    tache_inner = -torch.nn.functional.max_pool2d(-tache_band.float(), 3, 1, 1) > 0.5
    assert float((ms.stray_upper_lip(tache_a, a, labels_a) & tache_inner).sum()) <= 0.01 * float(tache_inner.sum())

    def landed(src: torch.Tensor, paint: tuple[float, float, float]) -> float:
        """Share of the fake's skin pixels within 8 LAB units of the painted colour."""
        r = ms.render_mesh(src, a, imgs[ib], b, ab, "torch")
        _, band = _paint_above_upper_lip(imgs[ia], a, paint)  # the same colour, recomputed
        colour = (rgb_to_lab(src) * band).sum((2, 3), keepdim=True) / band.sum((2, 3), keepdim=True)
        skin = (r["labels"] == fm.SKIN) & r["covered"]
        near = (rgb_to_lab(r["face"]) - colour).norm(dim=1, keepdim=True) < 8
        return float((near & skin).sum()) / float(skin.sum())

    assert landed(lip_a, (-15.0, 22.0, 6.0)) < 0.002  # without the rule: 2.6 % of the skin (the band)
    assert landed(tache_a, (-35.0, -4.0, -4.0)) > 0.01  # 2.7 %: kept


def test_a_grey_photo_s_moustache_is_never_taken_for_lip(real):
    """In a black-and-white photo nothing is redder than the skin: the stray-lip rule finds no lip
    there, and the moustaches of the 1927 Solvay conference stay their owners' (the rule's colour
    test once measured redness in units of the skin's a* spread, which is zero in a grey image,
    and filled most of them with skin)."""
    recs, imgs, _, mesh = real
    grey = [i for i, im in enumerate(imgs) if float((im.amax(0) - im.amin(0)).max()) == 0]
    assert len(grey) >= 10 and any("solvay" in recs[i].id for i in grey)
    labels = ms.region_map(mesh[grey], imgs.shape[-1])[2]
    assert int(ms.stray_upper_lip(imgs[grey], mesh[grey], labels).sum()) == 0


@pytest.mark.parametrize("strength", [1.0, 2.0])
def test_mesh_reshape_flow_never_folds(real, strength):
    _, _, _, mesh = real
    a, b = mesh[:24], mesh[24:48]
    flow, kept = ms.mesh_reshape_flow(b, ms.reenact_mesh(a, b), 256, strength)
    from reliableswap.geometry.grid import jacobian_determinant

    det = jacobian_determinant(flow)
    assert float(det.min()) > 0  # one-to-one everywhere
    assert bool((kept > 0).all()) and float(kept.mean()) > 0.5
    assert float(flow.abs().amax()) > 0.5  # it does move the outline
    # the image border stays (anchored by the spline: a fraction of a pixel between anchors)
    assert float(flow[..., :1, :].abs().max()) < 1.0 and float(flow[..., :1, :].abs().max()) < 0.2 * float(flow.abs().amax())


def test_contract_and_recipe_rules():
    base = dict(FaceRecord(id="x", image="faces/x.png", origin={"path": "x.png", "size": (256, 256)}, align="ffhq", size=256,
                                 bbox=(0, 0, 1, 1), landmarks68=[(100.0, 100.0)] * 68, pose={"yaw": 0, "pitch": 0, "roll": 0},
                                 inverse=((1, 0, 0), (0, 1, 0)),
                                 quality={"det_score": 1, "face_px": 100, "sharpness": 1}).to_json())
    with pytest.raises(ContractError, match="mesh468"):
        FaceRecord.parse_line(json.dumps(base | {"mesh468": [[1, 2, 3]] * 467}), "faces.jsonl:1")
    with pytest.raises(ContractError, match="mesh468"):
        FaceRecord.parse_line(json.dumps(base | {"mesh468": [[1e6, 2, 3]] * 468}), "faces.jsonl:1")
    assert FaceRecord.parse_line(json.dumps(base | {"mesh468": [[1, 2, 3]] * 468}), "faces.jsonl:1").mesh468 is not None
    d = TripletRecipe().model_dump(mode="json")
    d["reenact"]["backend"] = "tps"
    with pytest.raises(RecipeError, match="needs"):
        validate_recipe(TripletRecipe, d, "r.toml")


@pytest.mark.slow
def test_mesh_recipe_end_to_end_on_real_faces(prepped, sface_cache, tmp_path):
    """Default recipe (mesh): prep stored meshes → pairs → triplets with QC → inspect sheet."""
    from reliableswap.commands.inspect import run_inspect
    from reliableswap.commands.pairs import run_pairs
    from reliableswap.commands.triplets import run_triplets
    from reliableswap.recipes import PairsSection

    out, _ = prepped
    sface_cache(tmp_path)
    run_pairs(out, tmp_path / "pairs.jsonl", PairsSection(n=10, seed=3))
    recipe = TripletRecipe().with_overrides({"qc.enabled": True})
    s = run_triplets(out, tmp_path / "pairs.jsonl", tmp_path / "trip", recipe, device="cpu", batch=5)
    # the default QC drops pairs whose fake looks more like its attribute donor (SFace), and only
    # those; the default recipe's fakes carry their identity donor's identity, so it drops few
    assert s["counts"]["written"] + s["counts"]["rejected"] == 10 and s["counts"]["written"] >= 9
    assert set(s["counts"]["rejected_by_reason"]) <= {"identity margin below --min-id-margin 0.0"}
    qc = s["details"]["qc"]
    assert qc["positive_id_margin_rate"] == 1.0
    assert qc["id_margin_st"]["mean"] > 0.25 and qc["id_margin_ts"]["mean"] > 0.25
    assert qc["fold_st"]["min"] > 0 and qc["fold_ts"]["min"] > 0
    assert qc["pose_err_st"]["mean"] < 8 and qc["mouth_err_st"]["mean"] < 0.15
    assert run_inspect(tmp_path / "trip", tmp_path / "sheet.png", n=4).is_file()


def test_pairs_compute_missing_descriptors_and_never_pair_one_person(prepped, tmp_path):
    """Faces without labels or descriptors: pairs computes dlib descriptors (cached) itself."""
    from reliableswap.commands.pairs import EMBEDDINGS, run_pairs
    from reliableswap.recipes import PairsSection

    out, _ = prepped
    recs = FaceRecord.read(out / "faces.jsonl")
    person = [r for r in recs if "cc0_one_person" in r.origin.path]
    others = [r for r in recs if "cc0_one_person" not in r.origin.path and "multi_face" not in r.origin.path][:6]
    assert len(person) >= 4
    folder = tmp_path / "prep"
    (folder / "faces").mkdir(parents=True)
    kept = []
    for r in person + others:
        shutil.copy(out / r.image, folder / r.image)
        kept.append(r.model_copy(update={"embedding": None, "identity": None}))
    FaceRecord.write(folder / "faces.jsonl", kept)
    ids = {r.id for r in person}
    for seed in range(3):
        s = run_pairs(folder, tmp_path / "p" / "pairs.jsonl", PairsSection(strategy="random", seed=seed))
        pairs = [json.loads(line) for line in (tmp_path / "p" / "pairs.jsonl").read_text().splitlines()]
        assert pairs and not any(p["a"] in ids and p["b"] in ids for p in pairs)
        assert s["details"]["descriptors_computed"] == (len(kept) if seed == 0 else 0)  # cached after the first
    assert len((tmp_path / "p" / EMBEDDINGS).read_text().splitlines()) == len(kept)


@pytest.mark.parametrize("content", [None, b"garbage", bytes(range(256)) * 80])
def test_unusable_mesh_model_stops_prep_at_start_up_in_one_line(tmp_path, monkeypatch, content):
    """A missing or corrupt face-mesh file (RELIABLESWAP_FACE_MESH) fails before any worker starts,
    naming the file on one line, and writes no output folder."""
    from reliableswap.choices import LandmarkBackend
    from reliableswap.commands.prep import PrepConfig, run_prep
    from reliableswap.faces.models import MissingWeightsError
    from reliableswap.faces.tflite import TfliteError

    model = tmp_path / "model.tflite"
    if content is not None:
        model.write_bytes(content)
    monkeypatch.setenv("RELIABLESWAP_FACE_MESH", str(model))
    (tmp_path / "in").mkdir()
    with pytest.raises((MissingWeightsError, TfliteError)) as e:
        run_prep([tmp_path / "in"], tmp_path / "out", PrepConfig(landmarks=LandmarkBackend.mesh), workers=2)
    assert str(model) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
