"""Derive the face-mesh tables in ``reliableswap/faces/mesh_topology.json`` from real faces.

For every face of a prep folder the 468-point mesh is measured (``FaceMesh``); the meshes are
aligned by 3D similarity (Procrustes, iterated to their mean), and the mean frontal face gives:

* ``MEAN``: 468×3 canonical points (interocular distance 1, x to the image right, y down,
  z smaller = nearer), origin between the eyes;
* ``TRIANGLES``: a Delaunay triangulation of the frontal (x, y) of the open-mouth faces' mean
  (so the inner-lip ring bounds a real opening; ring edges that Delaunay misses at the thin
  mouth corners are recovered by edge flips, and every ring edge is checked to be a triangle edge),
  restricted to the face outline, eye and mouth openings included (labelled by region in
  ``faces/mesh.py``);
* ``MESH_TO_68``: the mesh vertex nearest each of dlib's 68 landmarks on average (distances in
  interocular units).

Usage: ``.venv/bin/python scripts/mesh_topology.py PREP_FOLDER`` (the tables in the repository
come from ``prep`` of the shared faces: 57 faces). Deterministic for the same folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.spatial import Delaunay

from reliableswap.faces import mesh as fm
from reliableswap.contracts import FaceRecord

OUT = Path(__file__).resolve().parents[1] / "reliableswap" / "faces" / "mesh_topology.json"


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Similarity-transformed ``src`` (N×3) best matching ``dst``."""
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    u, sig, vt = np.linalg.svd(d.T @ s)
    e = np.eye(3)
    e[2, 2] = np.sign(np.linalg.det(u @ vt))
    r = u @ e @ vt
    scale = (sig * np.diag(e)).sum() / (s ** 2).sum()
    return scale * s @ r.T + md


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _crosses(p, a, b, c, d) -> bool:
    """Whether segments ab and cd properly intersect (points by index into p)."""
    if len({a, b, c, d}) < 4:
        return False
    return (_cross(p[a], p[b], p[c]) * _cross(p[a], p[b], p[d]) < 0) and (_cross(p[c], p[d], p[a]) * _cross(p[c], p[d], p[b]) < 0)


def force_edges(tri: np.ndarray, pts: np.ndarray, constraints: list[tuple[int, int]]) -> np.ndarray:
    """Edge flips until every constraint edge is a triangle edge (Sloan's constrained-Delaunay
    recovery, for the few ring edges plain Delaunay misses at the thin mouth corners)."""
    tris = [tuple(t) for t in tri]
    for a, b in constraints:
        for _ in range(1000):
            if any(a in t and b in t for t in tris):
                break
            for i, t in enumerate(tris):
                for c, d in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
                    if not _crosses(pts, a, b, c, d):
                        continue
                    j = next((j for j, u in enumerate(tris) if j != i and c in u and d in u), None)
                    if j is None:
                        continue
                    e = next(v for v in t if v not in (c, d))
                    f = next(v for v in tris[j] if v not in (c, d))
                    if _crosses(pts, e, f, c, d):  # convex quad: flip cd → ef
                        tris[i], tris[j] = (e, f, c), (e, f, d)
                        break
                else:
                    continue
                break
        else:
            raise SystemExit(f"could not recover edge {(a, b)}")
    return np.asarray(tris)


def main(folder: str) -> None:
    recs = FaceRecord.read(Path(folder) / "faces.jsonl")
    imgs = torch.stack([torch.from_numpy(np.array(Image.open(Path(folder) / r.image).convert("RGB"))).permute(2, 0, 1).float() / 255
                        for r in recs])
    lm = torch.tensor([r.landmarks68 for r in recs], dtype=torch.float64)
    mesh, _ = fm.FaceMesh().eval().from_landmarks68(imgs, lm)
    m = mesh.double().numpy()
    # 68 correspondence
    xy = m[..., :2]
    iod = np.linalg.norm(lm[:, 36:42].mean(1).numpy() - lm[:, 42:48].mean(1).numpy(), axis=-1)
    d = np.linalg.norm(xy[:, None] - lm.numpy()[:, :, None], axis=-1) / iod[:, None, None]
    to68 = d.mean(0).argmin(-1)
    # canonical mean: Procrustes to the most frontal face, then to the running mean
    yaw = np.array([abs(r.pose.yaw) + abs(r.pose.pitch) for r in recs])
    ref = m[int(yaw.argmin())]
    for _ in range(5):
        aligned = np.stack([umeyama(f, ref) for f in m])
        ref = aligned.mean(0)
    eyes = ref[fm.RIGHT_EYE].mean(0), ref[fm.LEFT_EYE].mean(0)
    mean = (ref - (eyes[0] + eyes[1]) / 2) / np.linalg.norm(eyes[1] - eyes[0])
    # triangulate the frontal (x, y) of the open-mouth faces' mean, so the inner-lip ring bounds a
    # real opening and its edges are triangle edges; keep triangles inside the outline
    open_ = (fm.mouth_open_ratio(mesh) > 0.25).numpy()
    tmean = np.stack([umeyama(f, ref) for f in m[open_]]).mean(0)
    tmean = (tmean - (tmean[fm.RIGHT_EYE].mean(0) + tmean[fm.LEFT_EYE].mean(0)) / 2)
    tri = Delaunay(tmean[:, :2]).simplices
    rings = (fm.LIPS_INNER, fm.RIGHT_EYE, fm.LEFT_EYE)
    tri = force_edges(tri, tmean[:, :2], [(a, b) for ring in rings for a, b in zip(ring, ring[1:] + ring[:1])])
    cent = tmean[tri, :2].mean(1)
    keep = fm.inside_polygon(tmean[fm.FACE_OVAL, :2], cent)
    tri = np.sort(tri[keep], axis=1)
    tri = tri[np.lexsort(tri.T[::-1])]
    edges = {tuple(sorted(e)) for t in tri for e in ((t[0], t[1]), (t[1], t[2]), (t[0], t[2]))}
    for name, ring in (("inner lips", fm.LIPS_INNER), ("right eye", fm.RIGHT_EYE), ("left eye", fm.LEFT_EYE)):
        missing = [(a, b) for a, b in zip(ring, ring[1:] + ring[:1]) if tuple(sorted((a, b))) not in edges]
        if missing:
            raise SystemExit(f"{name}: ring edges {missing} are not triangle edges (the opening would be crossed)")
    # one row a line, 4 decimals (the tables reliableswap/faces/mesh_topology.py reads)
    rows = [f"[{p[0]:.4f}, {p[1]:.4f}, {p[2]:.4f}]" for p in mean]
    tris = [f"[{a}, {b}, {c}]" for a, b, c in tri]
    text = ('{\n "mesh_to_68": ' + json.dumps(to68.tolist()) + ',\n "mean": [\n' + ",\n".join("  " + r for r in rows)
            + '\n ],\n "triangles": [\n' + ",\n".join("  " + t for t in tris) + "\n ]\n}\n")
    OUT.write_text(text)
    err = d.mean(0)[np.arange(68), to68]
    print(f"{len(recs)} faces; {len(tri)} triangles; 68-point agreement: mean {err.mean():.3f}, max {err.max():.3f} interocular")


if __name__ == "__main__":
    main(sys.argv[1])
