"""The synthesis pipeline: reenact → appearance → blend → reshape, from a recipe, batched.

For a batch of pairs (a, b) one call renders both fakes: ``st`` (a's identity on b) and ``ts``
(b's identity on a), by running the chain on the identity batch [a; b] against the attribute
batch [b; a].
"""

from __future__ import annotations

import torch
from kornia.color import rgb_to_lab

from reliableswap.errors import UserError
from reliableswap.choices import Appearance, BlendMethod, GlassesRule, ReshapeMethod
from reliableswap.faces import mesh as fm
from reliableswap.faces.hands import HandLandmarker
from reliableswap.faces.models import WHEEL_MODELS, wheel_model
from reliableswap.faces.occluders import MIN_RAYS, glasses_mask, glasses_score
from reliableswap.faces.ibug68 import INNER, MIRROR68
from reliableswap.faces.masks import face_mask
from reliableswap.faces.pose import head_pose
from reliableswap.flame.flow import reenact_map, shape_flow
from reliableswap.flame.layer import Flame, FlameParams
from reliableswap.geometry.grid import warp_backward
from reliableswap.recipes import TripletRecipe
from reliableswap.nets.weights import require, weights_dir
from reliableswap.synth import appearance, blend, learned, meshswap
from reliableswap.synth.learned import FaceParser, LearnedReenactor, Restorer
from reliableswap.synth.reenact import load_reenactor
from reliableswap.synth.reshape import reshape


def mirror_flags(lm: torch.Tensor, lm_ref: torch.Tensor) -> torch.Tensor:
    """B bool: the faces (B×68×2) whose yaw is closer to the reference's once flipped."""
    yaw = head_pose(lm)[:, 0]
    yaw_ref = head_pose(lm_ref)[:, 0]
    return (yaw + yaw_ref).abs() < (yaw - yaw_ref).abs()


def mirror_toward(img: torch.Tensor, lm: torch.Tensor, lm_ref: torch.Tensor, mesh: torch.Tensor | None = None,
                  flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Mirror the faces whose yaw is closer to the reference's once flipped (B×3×H×W, B×68×2 and,
    when given, their B×468×3 meshes; ``flip``: :func:`mirror_flags` when the caller has them).
    Returns ``(img, lm, mesh)``."""
    flip = mirror_flags(lm, lm_ref) if flip is None else flip
    if not bool(flip.any()):
        return img, lm, mesh
    w = img.shape[-1]
    lm_f = lm[:, MIRROR68].clone()
    lm_f[..., 0] = w - 1 - lm_f[..., 0]
    f4 = flip.view(-1, 1, 1, 1)
    if mesh is not None:
        mesh = torch.where(flip.view(-1, 1, 1), fm.mirror_mesh(mesh, w), mesh)
    return torch.where(f4, img.flip(-1), img), torch.where(flip.view(-1, 1, 1), lm_f, lm), mesh


def check_models(recipe: TripletRecipe, load: bool = True) -> None:
    """Every model file the recipe needs is there (the face-mesh file, the learned backends'
    weight files), else ``MissingWeightsError`` naming the file and the command that gets it.
    ``load``: also read, check and keep the learned networks loaded (``WeightsError`` on an
    unusable file), as ``triplets`` does before it writes anything."""
    root = weights_dir(recipe.weights.dir)
    for step, backend in recipe.learned:
        require(backend, root, step)
    if recipe.uses_mesh:
        fm.mesh_model_path()
    if recipe.uses_mesh and recipe.masks.hands:
        for m in WHEEL_MODELS["hands"]:
            wheel_model(m, recipe.weights.dir or None)
    if load:
        for _, backend in recipe.learned:
            learned.load_nets(backend, root)


class Synthesizer:
    """Renders fakes from aligned crops with 68 landmarks (crop pixels), on the crops' device.

    With a FLAME recipe (reenact backend ``flame`` and/or reshape method ``flame``) pass the loaded
    ``flame`` model, and per-face FLAME parameters to :meth:`render` / :meth:`cycle`.
    """

    def __init__(self, recipe: TripletRecipe, flame: Flame | None = None):
        self.r = recipe
        self.flame = flame
        if recipe.uses_flame and flame is None:
            raise UserError("this recipe uses FLAME (reenact backend or reshape method 'flame'): pass --flame PATH")
        check_models(recipe, load=False)  # a missing model file stops the run here; networks load when first needed
        root, amp = weights_dir(recipe.weights.dir), recipe.weights.amp
        steps = dict(recipe.learned)  # the steps that run a network from the user's weight files
        if recipe.reenact.backend in ("flame", "mesh"):
            self.reenactor = None
        elif "reenact" in steps:
            self.reenactor = LearnedReenactor(steps["reenact"], root, recipe.reenact.stitching, amp)
        else:
            self.reenactor = load_reenactor(recipe.reenact.backend, recipe.reenact.identity_layout)
        self.parser = FaceParser(root, amp) if "masks" in steps else None
        self.restorer = Restorer(steps["restore"], root, recipe.restore.strength, amp) if "restore" in steps else None
        self.hands: HandLandmarker | None = None  # loaded when first needed ([masks] hands)

    def keep_target(self, face: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """With parsing masks (``self.parser``): B×1×S×S weight of what stays the target's (hair,
        glasses, hands… of either the reenacted ``face`` or the ``target``)."""
        labels = self.parser(torch.cat([face, target]))
        keep = learned.class_mask(labels, learned.KEEP_TARGET, self.r.masks.blur)
        n = face.shape[0]
        return torch.maximum(keep[:n], keep[n:])

    @staticmethod
    def measure_mesh(img: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
        """468-point meshes of aligned crops B×3×S×S with their 68 landmarks (for faces whose
        prep stored none) → B×468×3."""
        return fm.load_face_mesh(str(img.device)).from_landmarks68(img, lm)[0].to(img.dtype)

    def hand_masks(self, images: torch.Tensor) -> torch.Tensor | None:
        """B×1×S×S soft masks of the hands in B crops (``[masks] hands``), else None."""
        if not self.r.masks.hands:
            return None
        if self.hands is None:
            self.hands = HandLandmarker(images.device, self.r.weights.dir or None)
        return self.hands.masks(images).to(images.dtype)

    @torch.no_grad()
    def render_mesh(self, img_id: torch.Tensor, lm_id: torch.Tensor, img_attr: torch.Tensor, lm_attr: torch.Tensor,
                    mesh_id: torch.Tensor, mesh_attr: torch.Tensor, hands_id: torch.Tensor | None = None,
                    hands_attr: torch.Tensor | None = None, glasses_id: torch.Tensor | None = None,
                    glasses_attr: torch.Tensor | None = None, hair_id: torch.Tensor | None = None,
                    hair_attr: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The mesh path of :meth:`render` (see ``reliableswap.synth.meshswap``); adds ``mesh``
        (B×468×3, the fake's face mesh, its eyelids where the face mesh reads them, as in a prep's
        stored meshes; the render itself puts them where the 68 points see them) and ``kept`` (B, fraction of the reshape displacement kept
        to stay fold-free) to the outputs. ``hands_id``/``hands_attr``: B×1×S×S hand masks of the
        two crops (measured here with ``[masks] hands`` when None): the attribute face's hand stays
        in the fake, the identity face's hand is never pasted into it (``source_hand`` B×1×S×S:
        where the render would have shown it, left out of the mask). ``glasses_id``/``glasses_attr``:
        B×1×S×S glasses-frame masks (measured here with ``[masks] glasses`` when None): the
        identity face's frame is replaced by its skin around it (``source_glasses`` B×1×S×S bool:
        the pixels filled), and with ``keep`` the attribute face's frame stays in front of the new
        face. ``glasses_left`` (B bool): the identity face wore glasses, the attribute face does
        not, and the fake still reads as wearing them (:func:`glasses_score`): the caller rejects it.
        ``hair_id``/``hair_attr``: B×1×S×S masks of hair over the face that prep stored from a face
        parser (``prep --occluders bisenet``), or None: the attribute face's stays in the fake, the
        identity face's is never pasted (it joins the hands in ``source_hand``); the forehead
        colour rule applies either way."""
        r = self.r
        h, w = img_attr.shape[-2:]
        if r.masks.hands:
            hands_id = self.hand_masks(img_id) if hands_id is None else hands_id
            hands_attr = self.hand_masks(img_attr) if hands_attr is None else hands_attr
        if r.masks.glasses != GlassesRule.off:
            glasses_id = glasses_mask(img_id, mesh_id)[0] if glasses_id is None else glasses_id
            glasses_attr = glasses_mask(img_attr, mesh_attr)[0] if glasses_attr is None else glasses_attr
        if r.reenact.mirror:
            flip = mirror_flags(lm_id, lm_attr)
            img_id, lm_id, mesh_id = mirror_toward(img_id, lm_id, lm_attr, mesh_id, flip)
            hands_id, glasses_id, hair_id = (None if m is None else torch.where(flip.view(-1, 1, 1, 1), m.flip(-1), m)
                                             for m in (hands_id, glasses_id, hair_id))
        # the lids where the 68 points see them (the mesh reads a squint as an open eye)
        mesh_id, native_attr = meshswap.refine_eyelids(mesh_id, lm_id), mesh_attr
        mesh_attr = meshswap.refine_eyelids(mesh_attr, lm_attr)
        mesh_ab = meshswap.reenact_mesh(mesh_id, mesh_attr)
        # the fake's mesh as its readers know a face mesh (its 68 points, the glasses rays, the QC's
        # mouth check), with b's lids where the face mesh reads them: on the lashes
        mesh_out = meshswap.reenact_mesh(mesh_id, native_attr)
        flow = torch.zeros(img_attr.shape[0], 2, h, w, dtype=img_attr.dtype, device=img_attr.device)
        kept = torch.zeros(img_attr.shape[0], dtype=img_attr.dtype, device=img_attr.device)
        background = img_attr
        mesh_reshape = r.reshape.enabled and r.reshape.method == ReshapeMethod.mesh
        if mesh_reshape:
            flow, kept = meshswap.mesh_reshape_flow(mesh_attr, mesh_ab, h, r.reshape.strength)
            background = warp_backward(img_attr, flow, "border")
        backend = r.flame.rasterizer.value
        occluded_a = _union(hands_id, hair_id)  # what covers a's face and must not come along: its hands, stored hair
        # a's texture is read through its lips as the image shows them (a grin's mesh lips sit on the teeth)
        rend = meshswap.render_mesh(img_id, meshswap.refine_lips(img_id, mesh_id, backend), img_attr, mesh_attr, mesh_ab, backend,
                                    occluded_a=occluded_a, fill_a=glasses_id)
        face, covered, labels = rend["face"], rend["covered"], rend["labels"]
        if self.restorer is not None:
            face = torch.where(covered, self.restorer(torch.where(covered, face, background)), face)
        labels_b = meshswap.region_map(mesh_attr, h, backend)[2]
        m_src = meshswap.skin_mask(labels, covered & ~rend["hidden"])
        m_ref = meshswap.skin_mask(labels_b)
        # what covers either face (hair over the forehead, glasses, hands) stays b's: a's occluders
        # are found on the render, b's on b (then moved by the reshape flow like b itself)
        lab_face, lab_b = rgb_to_lab(face.clamp(0, 1).float()), rgb_to_lab(img_attr.clamp(0, 1).float())  # each used thrice
        occ = meshswap.occluders(face, labels, m_src, lab=lab_face)
        occ_b = meshswap.occluders(img_attr, labels_b, m_ref, lab=lab_b)

        def on_b(m: torch.Tensor | None) -> torch.Tensor | None:
            """A mask of b moved with b by the reshape flow."""
            return warp_backward(m, flow, "zeros") if mesh_reshape and m is not None else m

        occ_b = on_b(occ_b)
        method = r.appearance.method
        if method != Appearance.none:
            if method == Appearance.skin:
                recoloured, _ = meshswap.skin_transfer(face, img_attr, m_src, m_ref, r.appearance.large_gap, lab_face, lab_b)
            else:
                recoloured = appearance.transfer(method.value, face, img_attr, m_src, m_ref)
            face = torch.where((labels == fm.MOUTH_R) | rend["eyes_from_b"], face, recoloured)  # b's own mouth and eyes stay as they are
        face = torch.where(covered, face, background)
        mask = meshswap.face_oval_mask(mesh_ab, h, r.blend.erode, r.blend.forehead, r.blend.feather)
        mask = mask * (1 - torch.maximum(occ, occ_b))
        # brows, eyes and lips are always a's: no trim, erosion or dark forehead hair takes them
        mask = torch.maximum(mask, meshswap.feature_mask(labels)) * covered
        # hands and a parser's hair are real occluders, over any feature: b's stay, a's never come
        covers = _union(_union(on_b(hands_attr), on_b(hair_attr)), rend.get("occluded"))
        if covers is not None:
            mask = mask * (1 - covers)
        frame_b = None
        if glasses_attr is not None and r.masks.glasses == GlassesRule.keep:  # b's frame stays in front of a's eyes
            frame_b = on_b(glasses_attr)
            mask = mask * (1 - frame_b)
        if self.parser is not None:
            mask = mask * (1 - self.keep_target(face, background))  # face is composited on the background above
        if r.blend.method == BlendMethod.multiband:
            fake = blend.multiband_blend(face, background, mask, r.blend.levels)
        else:
            fake = blend.poisson_blend(face, background, mask)
        if frame_b is not None:  # a frame is a few pixels wide: the blend's low bands would wash it out, so it goes on last
            fake = fake * (1 - frame_b) + background * frame_b
        lm_out = fm.mesh_to_68(mesh_out).to(lm_attr.dtype)
        if r.reshape.enabled and r.reshape.method == ReshapeMethod.tps:
            fake, flow, lm_out = reshape(fake, lm_out, lm_id, r.reshape.strength)
        out = {"fake": fake, "landmarks": lm_out, "mask": mask, "flow": flow, "mesh": mesh_out, "kept": kept}
        if occluded_a is not None:
            out["source_hand"] = rend["occluded"]  # where the render sampled the identity face's hand (or stored hair)
        if glasses_id is not None:
            out["source_glasses"] = rend.get("filled", torch.zeros_like(covered))  # where a's frame was filled
            # the fill could not clean it: the fake still reads as wearing glasses that only a wore
            only_a = (glasses_id.flatten(1).amax(1) > 0) & (glasses_attr.flatten(1).amax(1) == 0)
            out["glasses_left"] = only_a & (glasses_score(fake, mesh_out) >= MIN_RAYS) if bool(only_a.any()) else only_a
        return out

    def blend_mask(self, lm: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Soft region where the reenacted face replaces the target (B×1×H×W)."""
        c = lm[:, INNER].mean(1, keepdim=True)
        shrunk = c + (lm - c) * (1 - self.r.blend.erode)
        return face_mask(shrunk, h, w, forehead=self.r.blend.forehead, feather=self.r.blend.feather)

    @torch.no_grad()
    def render(self, img_id: torch.Tensor, lm_id: torch.Tensor, img_attr: torch.Tensor, lm_attr: torch.Tensor,
               p_id=None, p_attr=None, mesh_id: torch.Tensor | None = None, mesh_attr: torch.Tensor | None = None,
               hands_id: torch.Tensor | None = None, hands_attr: torch.Tensor | None = None,
               glasses_id: torch.Tensor | None = None, glasses_attr: torch.Tensor | None = None,
               hair_id: torch.Tensor | None = None, hair_attr: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One direction: identity of ``img_id`` on the attributes of ``img_attr``.

        Args:
            img_id, img_attr: B×3×S×S in [0, 1]; lm_id, lm_attr: B×68×2;
            p_id, p_attr: FLAME parameters of both (``FlameParams``, B rows) for FLAME recipes;
            mesh_id, mesh_attr: B×468×3 face meshes for mesh recipes (measured here when None);
            hands_id, hands_attr: B×1×S×S hand masks for mesh recipes with ``[masks] hands``
            (measured here when None); glasses_id, glasses_attr: B×1×S×S glasses-frame masks for
            mesh recipes with ``[masks] glasses`` (measured here when None); hair_id, hair_attr:
            B×1×S×S masks of hair over the face a face parser found (mesh recipes), or None.
        Returns:
            dict with ``fake`` B×3×S×S, ``landmarks`` B×68×2 (where the fake's landmarks are),
            ``mask`` B×1×S×S (blend region), ``flow`` B×2×S×S (reshape backward flow, zeros if off).

        FLAME path: the target is first reshaped by the dense shape flow (b's outline takes a's
        shape: M2 → M12), then a's face is warped densely onto FLAME(β_a, θ_b, ψ_b) under b's
        camera — the same geometry M12 — and blended in, so face and outline agree.
        """
        if self.r.uses_mesh:
            mesh_id = self.measure_mesh(img_id, lm_id) if mesh_id is None else mesh_id
            mesh_attr = self.measure_mesh(img_attr, lm_attr) if mesh_attr is None else mesh_attr
            return _finite(self.render_mesh(img_id, lm_id, img_attr, lm_attr, mesh_id, mesh_attr, hands_id, hands_attr,
                                                  glasses_id, glasses_attr, hair_id, hair_attr))
        h, w = img_attr.shape[-2:]
        zero = torch.zeros(img_attr.shape[0], 2, h, w, dtype=img_attr.dtype, device=img_attr.device)
        flame_shape = self.r.reshape.enabled and self.r.reshape.method == ReshapeMethod.flame
        flow = zero
        sf = None
        if flame_shape:
            # one M12 rasterization serves the reshape and, with FLAME reenactment, the reenact warp
            sf = shape_flow(self.flame, p_id, p_attr, h, self.r.flame.rasterizer.value, forward=False, reenact=self.reenactor is None)
            flow = self.r.reshape.strength * sf["backward"].to(img_attr.dtype)
            img_attr = warp_backward(img_attr, flow, "border")
            lm_attr = sf["p12"].to(lm_attr.dtype)
        if self.reenactor is None:
            if sf is None:
                rm = reenact_map(self.flame, p_id, p_attr, h, self.r.flame.rasterizer.value)
                back, lm_back = rm["backward"], rm["landmarks"]
            else:
                back, lm_back = sf["reenact"], sf["p12"]
            reen, lm_reen = warp_backward(img_id, back.to(img_id.dtype), "border"), lm_back.to(lm_id.dtype)
        else:
            if self.r.reenact.mirror:
                img_id, lm_id, _ = mirror_toward(img_id, lm_id, lm_attr)
            reen, lm_reen = self.reenactor(img_id, lm_id, img_attr, lm_attr)
        if self.restorer is not None:
            reen = self.restorer(reen)
        mask = self.blend_mask(lm_reen, h, w)
        if self.parser is not None:
            mask = mask * (1 - self.keep_target(reen, img_attr))
        m_attr = self.blend_mask(lm_attr, h, w)
        method = self.r.appearance.method.value
        # "skin" needs the mesh's regions: without a mesh it is LCT over the 68-point face masks
        reen = appearance.transfer("lct" if method == "skin" else method, reen, img_attr, mask, m_attr)
        if self.r.blend.method == BlendMethod.multiband:
            fake = blend.multiband_blend(reen, img_attr, mask, self.r.blend.levels)
        else:
            fake = blend.poisson_blend(reen, img_attr, mask)
        lm_out = lm_reen
        if self.r.reshape.enabled and not flame_shape:
            fake, flow, lm_out = reshape(fake, lm_reen, lm_id, self.r.reshape.strength)
        return _finite({"fake": fake, "landmarks": lm_out, "mask": mask, "flow": flow})

    def cycle(self, img_a, lm_a, img_b, lm_b, p_a=None, p_b=None, mesh_a=None, mesh_b=None,
              hands_a=None, hands_b=None, glasses_a=None, glasses_b=None, hair_a=None, hair_b=None) -> dict[str, torch.Tensor]:
        """Both fakes of B pairs in one batched call: ``st`` (a on b) and ``ts`` (b on a).
        ``p_a``, ``p_b``: FLAME parameters (FLAME recipes only); ``mesh_a``, ``mesh_b``: stored
        B×468×3 meshes (mesh recipes; measured when None); ``hands_a``, ``hands_b``: B×1×S×S masks
        of the hands prep stored (mesh recipes with ``[masks] hands``; detected when None);
        ``glasses_a``, ``glasses_b``: B×1×S×S glasses-frame masks prep stored (``[masks] glasses``;
        measured when None); ``hair_a``, ``hair_b``: B×1×S×S masks of hair over the face that prep
        stored from a face parser (mesh recipes; None: the forehead colour rule alone)."""
        p_id = p_attr = None
        if p_a is not None:
            p_id, p_attr = FlameParams.cat([p_a, p_b]), FlameParams.cat([p_b, p_a])
        if self.r.uses_mesh:
            mesh_a = self.measure_mesh(img_a, lm_a) if mesh_a is None else mesh_a
            mesh_b = self.measure_mesh(img_b, lm_b) if mesh_b is None else mesh_b
        m_id = m_attr = None
        if mesh_a is not None:
            m_id, m_attr = torch.cat([mesh_a, mesh_b]), torch.cat([mesh_b, mesh_a])
        n = img_a.shape[0]
        h = g = hr = None  # each crop's masks, (a's, b's), found once for both directions
        if self.r.uses_mesh and self.r.masks.hands:
            h = self.hand_masks(torch.cat([img_a, img_b])) if hands_a is None else torch.cat([hands_a, hands_b]).to(img_a.dtype)
        if self.r.uses_mesh and self.r.masks.glasses != GlassesRule.off:
            g = glasses_mask(torch.cat([img_a, img_b]), torch.cat([mesh_a, mesh_b]))[0] if glasses_a is None \
                else torch.cat([glasses_a, glasses_b]).to(img_a.dtype)
        if self.r.uses_mesh and hair_a is not None:
            hr = torch.cat([hair_a, hair_b]).to(img_a.dtype)
        (h_id, h_attr), (g_id, g_attr), (r_id, r_attr) = (_both_ways(x, n) for x in (h, g, hr))
        out = self.render(torch.cat([img_a, img_b]), torch.cat([lm_a, lm_b]), torch.cat([img_b, img_a]), torch.cat([lm_b, lm_a]),
                          p_id, p_attr, m_id, m_attr, h_id, h_attr, g_id, g_attr, r_id, r_attr)
        return {k + "_" + d: v[s] for k, v in out.items() for d, s in (("st", slice(0, n)), ("ts", slice(n, None)))}


def _union(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
    """The union (pixelwise max) of two optional soft masks of one shape; None when both are."""
    if x is None or y is None:
        return y if x is None else x
    return torch.maximum(x, y.to(x.dtype))


def _both_ways(x: torch.Tensor | None, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``x`` (2n rows: a's then b's) as the identity side and the attribute side of both
    directions, (a, b) then (b, a): ``(x, x with its halves swapped)``, or ``(None, None)``."""
    if x is None:
        return None, None
    return x, torch.cat([x[n:], x[:n]])


def _finite(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clamp the fakes to [0, 1]; a fake with any non-finite value becomes all-NaN, so the caller
    rejects that pair with a reason instead of writing a partly broken image."""
    fake = out["fake"]
    if not torch.isfinite(fake).all():
        bad = (~torch.isfinite(fake)).flatten(1).any(1)
        fake = torch.where(bad.view(-1, 1, 1, 1), torch.full_like(fake, float("nan")), fake)
    out["fake"] = fake.clamp(0, 1)
    return out
