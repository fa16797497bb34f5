"""Quality checks of fakes: identity keep/leak/margin (the identity judge, SFace by default), pose
error, seam score; fold-over of the reshape flow; for mesh recipes, the mouth check (the fake's
measured mouth opening against the one it was rendered with).

Identity, in the judge's units (:mod:`reliableswap.judge`): ``keep`` = score(fake, identity
donor), ``leak`` = score(fake, attribute donor), ``margin`` = keep − leak, positive when the fake
looks more like its identity donor. The fake is aligned by its re-measured landmarks.
"""

from __future__ import annotations

import numpy as np
import torch

from reliableswap.faces.landmarks import DlibLandmarks
from reliableswap.faces.mesh import load_face_mesh, mouth_open_ratio
from reliableswap.faces.pose import expression_error, eye_openness_error, head_pose
from reliableswap.geometry.grid import jacobian_determinant
from reliableswap.images import to_uint8
from reliableswap.judge import Judge, keep_leak_margin, load_judge
from reliableswap.synth.learned import FACE, FaceParser, class_mask


class QualityChecker:
    """Per fake: ``id_keep``, ``id_leak``, ``id_margin`` (the judge's), ``pose_err`` (deg, max over
    yaw/pitch/roll), ``expr_err`` (68-point expression landmarks after a similarity on the rigid
    points, interocular units; the fake's re-measured against its attribute donor's), ``eye_err``
    (the larger of the two eyes' eye-aspect-ratio differences, same landmarks) and ``seam``; with the
    reshape ``flow``, ``fold`` (smallest Jacobian determinant: ≤ 0 means the warp folds); with the
    fake's expected mesh, ``mouth_err`` (|measured − expected| inner-lip gap / mouth width); with a
    face ``parser`` (``[masks] backend = "bisenet"``), ``face_parse``: the share of the blend mask
    that the parser reads as face (skin, brows, eyes, nose, mouth, lips) on the fake — low when the
    pasted face looks like no face."""

    def __init__(self, parser: FaceParser | None = None, judge: Judge | str = "sface", device: str | torch.device = "cpu") -> None:
        self.judge = load_judge(judge, device) if isinstance(judge, str) else judge
        self.landmarks = DlibLandmarks()
        self.parser = parser

    def embed(self, images: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
        """B×3×S×S images with B×68×2 landmarks → B×D identity embeddings (the judge's)."""
        with torch.no_grad():
            return self.judge.embed(images, lm)

    def __call__(self, fake: torch.Tensor, lm_fake: torch.Tensor, emb_id: torch.Tensor, emb_attr: torch.Tensor,
                 lm_attr: torch.Tensor, img_attr: torch.Tensor, mask: torch.Tensor, flow: torch.Tensor | None = None,
                 mesh_expected: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        ims = to_uint8(fake)
        # re-measure the fake's landmarks with dlib (box from the expected ones) for the pose error
        measured = self.landmarks.remeasure(ims, lm_fake.detach().cpu().numpy())
        ident = keep_leak_margin(self.judge, self.embed(fake, torch.from_numpy(measured)), emb_id, emb_attr)
        pose_f = head_pose(torch.from_numpy(measured).double())
        pose_a = head_pose(lm_attr.detach().cpu().double())
        pose_err = (pose_f - pose_a).abs().amax(-1).numpy()
        expr_err = expression_error(torch.from_numpy(measured).double(), lm_attr.detach().cpu().double()).numpy()
        eye_err = eye_openness_error(torch.from_numpy(measured), lm_attr.detach().cpu()).numpy()
        out = {"id_keep": ident["keep"], "id_leak": ident["leak"], "id_margin": ident["margin"], "pose_err": pose_err,
               "expr_err": expr_err, "eye_err": eye_err, "seam": seam_score(fake, img_attr, mask).cpu().numpy()}
        if flow is not None:
            out["fold"] = jacobian_determinant(flow).flatten(1).amin(1).cpu().numpy()
        if self.parser is not None:
            face = class_mask(self.parser(fake), FACE)
            out["face_parse"] = ((face * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1e-6)).cpu().numpy()
        if mesh_expected is not None:
            lm_m = torch.from_numpy(measured).to(fake.device, fake.dtype)
            got = load_face_mesh(str(fake.device)).from_landmarks68(fake, lm_m)[0]
            out["mouth_err"] = (mouth_open_ratio(got) - mouth_open_ratio(mesh_expected)).abs().cpu().numpy()
        return out


def qc_aggregates(qcs: list[dict]) -> dict:
    """Mean/min/max of every QC figure over triplets (one dict of figures each), and the share of
    pairs whose two identity margins are both positive."""
    agg: dict = {}
    if not qcs or not qcs[0]:
        return agg
    for key in qcs[0]:
        v = np.asarray([q[key] for q in qcs], np.float64)
        agg[key] = {"mean": round(float(v.mean()), 4), "min": round(float(v.min()), 4), "max": round(float(v.max()), 4)}
    if "id_margin_st" in qcs[0]:
        m = np.asarray([min(q["id_margin_st"], q["id_margin_ts"]) for q in qcs])
        agg["positive_id_margin_rate"] = round(float((m > 0).mean()), 4)
    return agg


def seam_score(fake: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Extra edge energy along the blend boundary: mean |∇fake| − mean |∇target| over the band
    where the mask is between 0.1 and 0.9 (≈ 0 for an invisible seam). B values."""
    def grad(x: torch.Tensor) -> torch.Tensor:
        g = x.mean(1, keepdim=True)
        gx = torch.nn.functional.pad(g[..., :, 1:] - g[..., :, :-1], (0, 1))
        gy = torch.nn.functional.pad(g[..., 1:, :] - g[..., :-1, :], (0, 0, 0, 1))
        return (gx ** 2 + gy ** 2).sqrt()

    band = ((mask > 0.1) & (mask < 0.9)).to(fake.dtype)
    n = band.sum((1, 2, 3)).clamp_min(1)
    return ((grad(fake) - grad(target)) * band).sum((1, 2, 3)) / n
