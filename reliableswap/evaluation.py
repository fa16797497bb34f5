"""Metrics of face swapping, batched (B×3×H×W in [0, 1], landmarks B×68×2):

* identity: cosine similarity of the swap's descriptor to its source's, and retrieval — is the
  source (its identity) the nearest of all sources in the evaluation (top-1 / top-5);
* attributes: pose error (degrees, L2 of yaw/pitch/roll from the 68 landmarks) and expression
  error (68-point expression landmarks after a similarity on the rigid points, in interocular
  units) between the swap and its target;
* reconstruction: PSNR and SSIM of swap(target, target) against the target;
* realism: FID, the Fréchet distance between Gaussians fitted to the Inception ``pool3`` features
  of the swaps and of the real targets (:func:`frechet_distance`; the network is
  :class:`reliableswap.nets.inception.FIDInceptionV3` with the user's weight file).

Descriptors are dlib's 128-D (offline) or ArcFace's (``--arcface`` weights). Landmarks of swaps
are measured with dlib's predictor in a box from the target's landmarks (a swap keeps the
target's pose).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from kornia.metrics import ssim as kornia_ssim

from reliableswap.faces import mesh as fm
from reliableswap.faces.landmarks import DlibLandmarks
from reliableswap.faces.pose import expression_error, head_pose
from reliableswap.images import to_uint8



def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B×C×H×W in [0, 1] → B (dB; inf for identical images)."""
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM (11×11 Gaussian window) per image: B."""
    return kornia_ssim(a.float(), b.float(), 11).flatten(1).mean(1)


def frechet_distance(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """FID between two sets of features, ``N×D`` and ``M×D``: ‖μx − μy‖² + tr Σx + tr Σy − 2 tr(ΣxΣy)^½,
    in float64 with unbiased covariances (as pytorch-fid).

    tr(ΣxΣy)^½ is the sum of the square roots of ΣxΣy's eigenvalues, which are real and ≥ 0 (a
    product of two PSD matrices). With fewer samples than dimensions (every small-sample FID) they
    are the squared singular values of ``Xc·Ycᵀ / √((N−1)(M−1))`` (centred features), so the trace
    is that N×M matrix's nuclear norm: exact, no ``sqrtm`` of a D×D matrix, no ε on the diagonals.
    Otherwise it is computed from the symmetric ``Σx^½ Σy Σx^½`` (``eigh``). Both equal
    ``scipy.linalg.sqrtm``'s trace to round-off where that is well conditioned (tested), and stay
    exact where it is not. Values are comparable only at equal sample counts: FID is biased
    upwards for small sets. Round-off below 0 is returned as 0."""
    x, y = (np.asarray(t.detach().cpu() if isinstance(t, torch.Tensor) else t, np.float64) for t in (x, y))
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"frechet_distance needs two N×D sets of at least 2 samples, got {x.shape} and {y.shape}")
    mu = x.mean(0) - y.mean(0)
    xc, yc = x - x.mean(0), y - y.mean(0)
    nx, ny = len(x) - 1, len(y) - 1
    if len(x) * len(y) <= x.shape[1] ** 2:
        root_trace = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt(nx * ny)
    else:
        cx, cy = xc.T @ xc / nx, yc.T @ yc / ny
        w, v = np.linalg.eigh(cx)
        half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        root_trace = np.sqrt(np.clip(np.linalg.eigvalsh(half @ cy @ half), 0, None)).sum()
    # a distance: two identical sets give 0, not the round-off's −3e-14
    return max(0.0, float(mu @ mu + (xc * xc).sum() / nx + (yc * yc).sum() / ny - 2 * root_trace))


def kernel_inception_distance(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID between two sets of features (``N×D``, ``M×D``): the unbiased MMD² with the cubic
    polynomial kernel k(a, b) = (a·b / D + 1)³, averaged over ``subsets`` random subsets of
    ``min(subset_size, N, M)`` samples each (as Bińkowski et al. and torch-fidelity). Unbiased, so
    it suits the few hundred images users have, unlike FID. Returns ``(mean, std)`` over subsets."""
    x, y = (np.asarray(t.detach().cpu() if isinstance(t, torch.Tensor) else t, np.float64) for t in (x, y))
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"kernel_inception_distance needs two N×D sets of at least 2 samples, got {x.shape} and {y.shape}")
    d, m = x.shape[1], min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets if m < max(len(x), len(y)) else 1):  # all samples of both: one exact value
        a = x[rng.choice(len(x), m, replace=False)] if m < len(x) else x
        b = y[rng.choice(len(y), m, replace=False)] if m < len(y) else y
        kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((a, a), (b, b), (a, b)))
        vals.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of B×D descriptors → B."""
    return F.cosine_similarity(a.float(), b.float(), dim=1)


def retrieval_hits(queries: torch.Tensor, gallery: torch.Tensor, gallery_ids: list[str], true_ids: list[str],
                   ks: tuple[int, ...] = (1, 5)) -> dict[int, torch.Tensor]:
    """For each query (Q×D), whether its true identity is among the identities of the k most
    similar gallery descriptors (G×D, cosine): ``{k: Q bool}``."""
    sim = F.normalize(queries.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T  # Q×G
    order = sim.argsort(dim=1, descending=True).cpu().numpy()
    out = {}
    for k in ks:
        hits = [true_ids[q] in {gallery_ids[j] for j in order[q, :k]} for q in range(len(true_ids))]
        out[k] = torch.tensor(hits)
    return out


def pose_error(lm: torch.Tensor, lm_ref: torch.Tensor) -> torch.Tensor:
    """Degrees: L2 norm of the (yaw, pitch, roll) difference, B."""
    return (head_pose(lm.double()) - head_pose(lm_ref.double())).norm(dim=-1).float()


class SwapMeter:
    """Measures swaps: landmarks and identity descriptors (``encoder``: B×3×H×W → B×D).

    ``landmarks``: ``dlib`` re-measures dlib's 68 points on the swap in the box of the target's;
    ``mesh`` measures MediaPipe's 468-point face mesh (Apache-2.0) on both the swap and the target,
    its region placed by the target's stored points, and reads the 68 points off it
    (:func:`reliableswap.faces.mesh.mesh_to_68`): no dlib model file is involved in the figures."""

    def __init__(self, encoder: Callable[[torch.Tensor], torch.Tensor], landmarks: str = "dlib",
                 measure: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None = None):
        self.encoder = encoder
        self.kind = landmarks
        self.measure = measure  # (swap, target) → {"pose_err": B, "expr_err": B, more per-swap figures}: replaces landmarks
        self.landmarks = DlibLandmarks() if landmarks == "dlib" and measure is None else None

    def measure_landmarks(self, images: torch.Tensor, lm_hint: torch.Tensor) -> torch.Tensor:
        """B×68×2 landmarks of ``images`` searched in the box of ``lm_hint``."""
        if self.kind == "mesh":
            net = fm.load_face_mesh(str(images.device))
            return fm.mesh_to_68(net.from_landmarks68(images, lm_hint.to(images.device))[0]).to(lm_hint)
        return torch.from_numpy(self.landmarks.remeasure(to_uint8(images), lm_hint.detach().cpu().numpy())).to(lm_hint)

    def __call__(self, swap: torch.Tensor, source_desc: torch.Tensor, target: torch.Tensor, lm_target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per swap (B): ``id_cos``, ``pose_err``, ``expr_err`` (and what ``measure`` adds); plus
        ``desc`` (B×D) for retrieval."""
        if self.measure is not None:
            desc = self.encoder(swap).float().cpu()
            return {"id_cos": cosine(desc, source_desc), **{k: v.float().cpu() for k, v in self.measure(swap, target).items()},
                    "desc": desc}
        lm = self.measure_landmarks(swap, lm_target)
        if self.kind == "mesh":  # the reference measured the same way as the swap
            lm_target = self.measure_landmarks(target, lm_target)
        desc = self.encoder(swap).float().cpu()
        return {"id_cos": cosine(desc, source_desc), "pose_err": pose_error(lm.cpu(), lm_target.cpu()),
                "expr_err": expression_error(lm.cpu(), lm_target.cpu()), "desc": desc}
