"""Colour/illumination transfer inside masks: Reinhard (LAB), linear colour transfer, sliced OT.

All functions take ``src`` and ``ref`` B×3×H×W in [0, 1] with masks B×1×H×W (weights) and
return ``src`` recoloured so that its masked statistics match ``ref``'s masked statistics.
"""

from __future__ import annotations

import torch
from kornia.color import lab_to_rgb, rgb_to_lab

from reliableswap.geometry.fields import piecewise_linear


def masked_stats(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted per-channel mean and std: B×C×1×1 each."""
    w = m / m.sum((2, 3), keepdim=True).clamp_min(1e-6)
    mu = (x * w).sum((2, 3), keepdim=True)
    var = ((x - mu) ** 2 * w).sum((2, 3), keepdim=True)
    return mu, var.clamp_min(1e-8).sqrt()


def reinhard(src: torch.Tensor, ref: torch.Tensor, m_src: torch.Tensor, m_ref: torch.Tensor,
             max_ratio: float | None = None, lab_src: torch.Tensor | None = None,
             lab_ref: torch.Tensor | None = None) -> torch.Tensor:
    """Reinhard et al. 2001: match LAB mean and std. With ``max_ratio`` the spread is damped: the
    mean moves fully, each channel's std only by a factor within ``[1/max_ratio, max_ratio]``.
    ``lab_src``/``lab_ref``: the images' CIE-LAB when the caller has it already."""
    ls = rgb_to_lab(src.clamp(0, 1)) if lab_src is None else lab_src
    lr = rgb_to_lab(ref.clamp(0, 1)) if lab_ref is None else lab_ref
    mu_s, sd_s = masked_stats(ls, m_src)
    mu_r, sd_r = masked_stats(lr, m_ref)
    if max_ratio is None:
        return lab_to_rgb((ls - mu_s) / sd_s * sd_r + mu_r).clamp(0, 1)
    return lab_to_rgb((ls - mu_s) * (sd_r / sd_s).clamp(1 / max_ratio, max_ratio) + mu_r).clamp(0, 1)


def masked_cov(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean B×C and covariance B×C×C of B×C×H×W."""
    b, c = x.shape[:2]
    w = (m / m.sum((2, 3), keepdim=True).clamp_min(1e-6)).reshape(b, 1, -1)
    xf = x.reshape(b, c, -1)
    mu = (xf * w).sum(-1)
    d = xf - mu.unsqueeze(-1)
    return mu, (d * w) @ d.transpose(1, 2)


def _sqrtm(c: torch.Tensor, inv: bool = False) -> torch.Tensor:
    """Square root (or inverse square root) of B×C×C covariances, in float64 on the CPU: the
    matrices are tiny, and LAPACK converges where batched GPU solvers fail on degenerate ones (a
    flat or grey face region); a small ridge keeps them positive definite."""
    cd = c.detach().to("cpu", torch.float64)
    eye = torch.eye(cd.shape[-1], dtype=torch.float64)
    # a non-finite covariance (a NaN in the face) gets the identity: the NaN reaches the fake, and
    # the pipeline rejects that pair with a reason instead of the solver stopping the batch
    cd = torch.where(torch.isfinite(cd).all((-1, -2), keepdim=True), cd, eye) + 1e-8 * eye
    ev, v = torch.linalg.eigh(cd)
    ev = ev.clamp_min(1e-6)
    d = ev.rsqrt() if inv else ev.sqrt()
    return (v @ torch.diag_embed(d) @ v.transpose(-1, -2)).to(c.device, c.dtype)


def linear_transfer(src: torch.Tensor, ref: torch.Tensor, m_src: torch.Tensor, m_ref: torch.Tensor,
                    max_gain: float | None = None) -> torch.Tensor:
    """Linear colour transfer (the official ReliableSwap 'LCT'): match RGB mean and covariance,
    ``x' = C_r^{1/2} C_s^{-1/2} (x − μ_s) + μ_r``. ``max_gain``: the transform's singular values
    are clamped to at most this (None: the official transfer, unclamped)."""
    b, c, h, w = src.shape
    mu_s, cs = masked_cov(src, m_src)
    mu_r, cr = masked_cov(ref, m_ref)
    t = _sqrtm(cr) @ _sqrtm(cs, inv=True)
    if max_gain is not None:
        u, sv, vh = torch.linalg.svd(t)
        t = u @ torch.diag_embed(sv.clamp(max=max_gain)) @ vh
    x = src.reshape(b, c, -1) - mu_s.unsqueeze(-1)
    return (t @ x + mu_r.unsqueeze(-1)).reshape(b, c, h, w).clamp(0, 1)


def sliced_ot(
    src: torch.Tensor, ref: torch.Tensor, m_src: torch.Tensor, m_ref: torch.Tensor,
    iters: int = 10, samples: int = 4096, seed: int = 0,
) -> torch.Tensor:
    """Sliced-Wasserstein optimal transport of colours (non-learned, as in the AOT idea).

    Each iteration draws a random rotation of RGB, matches the 1-D distributions of masked
    pixels along each axis by quantiles, and moves every source pixel accordingly.
    """
    b, c, h, w = src.shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = src.reshape(b, c, -1)
    r = ref.reshape(b, c, -1)
    qs = torch.linspace(0, 1, 65, device=src.device, dtype=src.dtype)
    ws = m_src.reshape(b, -1).clamp_min(0) + 1e-8
    wr = m_ref.reshape(b, -1).clamp_min(0) + 1e-8
    idx_s = torch.multinomial(ws.float().cpu(), samples, replacement=True, generator=g).to(src.device)
    idx_r = torch.multinomial(wr.float().cpu(), samples, replacement=True, generator=g).to(src.device)
    for _ in range(iters):
        rot, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
        rot = rot.to(src)
        px = rot @ x  # B×C×HW
        pr = rot @ r
        sx = torch.gather(px, 2, idx_s.unsqueeze(1).expand(-1, c, -1))
        sr = torch.gather(pr, 2, idx_r.unsqueeze(1).expand(-1, c, -1))
        qx = torch.quantile(sx, qs, dim=2).permute(1, 2, 0).contiguous()  # B×C×Q
        qr = torch.quantile(sr, qs, dim=2).permute(1, 2, 0).contiguous()
        x = rot.T @ piecewise_linear(px, qx, qr)  # the quantile map qx → qr applied to every pixel
    return x.reshape(b, c, h, w).clamp(0, 1)


METHODS = {"reinhard": reinhard, "lct": linear_transfer, "sot": sliced_ot}


def transfer(method: str, src: torch.Tensor, ref: torch.Tensor, m_src: torch.Tensor, m_ref: torch.Tensor) -> torch.Tensor:
    """Dispatch by name (``none`` returns ``src``)."""
    if method == "none":
        return src
    if method not in METHODS:
        raise ValueError(f"unknown appearance method {method!r} (one of none, {', '.join(METHODS)})")
    return METHODS[method](src, ref, m_src, m_ref)
