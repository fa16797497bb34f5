"""Face-mesh tables, read from ``mesh_topology.json`` beside this module (generated from real faces
by ``scripts/mesh_topology.py``: do not edit it by hand).

MEAN: canonical frontal 468×3 mesh (interocular 1, origin between the eyes, z smaller = nearer);
TRIANGLES: its triangulation inside the face outline; MESH_TO_68: vertex nearest each iBUG-68 point.
"""

from __future__ import annotations

import json
from importlib.resources import files

_TABLES = json.loads((files("reliableswap.faces") / "mesh_topology.json").read_text(encoding="utf-8"))

MESH_TO_68: list[int] = _TABLES["mesh_to_68"]
MEAN: list[tuple[float, float, float]] = [tuple(p) for p in _TABLES["mean"]]
TRIANGLES: list[tuple[int, int, int]] = [tuple(t) for t in _TABLES["triangles"]]
