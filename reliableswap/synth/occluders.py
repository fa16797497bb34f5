"""The occluder masks of aligned crops, as prep stores them beside ``faces.jsonl`` and triplets
reads them back: hands (MediaPipe's 21 points, :func:`reliableswap.faces.hands.hand_mask`), glasses
frames (:func:`reliableswap.faces.occluders.glasses_mask`) and hair over the forehead (the mesh
path's colour rule, :func:`reliableswap.synth.meshswap.occluders`), one soft mask each. With a
face parser (BiSeNet, from the user's weights: ``prep --occluders bisenet``) glasses are its
``eye_g`` class and hair its ``hair`` and ``hat`` classes wherever they cover the face's mesh.

Crops are B×3×S×S in [0, 1], meshes B×468×3 crop pixels; masks B×1×S×S or B×3×S×S in [0, 1].
"""

from __future__ import annotations

import torch

from reliableswap.faces.hands import hand_mask
from reliableswap.faces.occluders import glasses_mask
from reliableswap.synth import meshswap
from reliableswap.synth.learned import FaceParser, class_mask

#: What found each mask, as the record's ``sources`` names it.
SOURCES = {"hands": "MediaPipe hand landmarker (mediapipe 0.10.21 wheel), bones and palm",
           "glasses": "face mesh eye rings + crop edges", "hair": "face mesh forehead + skin colour"}
#: ... with a face parser.
PARSER_SOURCES = SOURCES | {"glasses": "BiSeNet face parsing (79999_iter.pth): eye_g",
                            "hair": "BiSeNet face parsing (79999_iter.pth): hair, hat over the face mesh"}


def stored_hand_masks(hands: list[list], size: tuple[int, int]) -> torch.Tensor:
    """B×1×H×W hand masks drawn from the hands prep stored (per face: a list of 21×2 point lists)."""
    pts = [torch.tensor(h, dtype=torch.float32) for hs in hands for h in hs]
    image = torch.tensor([i for i, hs in enumerate(hands) for _ in hs], dtype=torch.long)
    lm = torch.stack(pts) if pts else torch.zeros(0, 21, 2)
    return hand_mask(lm, image, len(hands), size)


@torch.no_grad()
def crop_occluders(img: torch.Tensor, mesh: torch.Tensor, hands: list[list], parser: FaceParser | None = None) -> torch.Tensor:
    """B×3×S×S masks (hands, glasses, hair) of B crops with their meshes and stored hands (per
    crop a list of 21×2 point lists); ``parser``: glasses and hair from its classes instead."""
    s = img.shape[-1]
    mesh = mesh.to(img.device, torch.float32)
    h = stored_hand_masks(hands, (s, s)).to(img.device)
    labels = meshswap.region_map(mesh, s, "torch")[2]
    if parser is not None:
        parsed = parser(img)
        g = class_mask(parsed, ("eye_g",))
        hair = class_mask(parsed, ("hair", "hat")) * (labels >= 0)
    else:
        g = glasses_mask(img, mesh)[0]
        hair = meshswap.occluders(img, labels, meshswap.skin_mask(labels))
    return torch.cat([h, g.to(h.dtype), hair.to(h.dtype)], 1).clamp(0, 1)
