"""Geometry at the bottom of the house: pure batched torch, no dlib, no OpenCV.

- :mod:`~reliableswap.geometry.affine`: apply / invert / compose 2×3 maps, least-squares similarity;
- :mod:`~reliableswap.geometry.grid`: pixel grids, backward warps by offset fields, sampling at points;
- :mod:`~reliableswap.geometry.tps`: thin-plate splines (sparse displacements → dense fields);
- :mod:`~reliableswap.geometry.raster`: triangle-mesh and polygon rasterization;
- :mod:`~reliableswap.geometry.fields`: harmonic extension of fields, flow colouring.

Points are B×K×2 pixel ``(x, y)`` with pixel centres at integers; images and fields B×C×H×W.
"""

from reliableswap.geometry.affine import (affine_scale, apply_affine, compose_affine, invert_affine, resize_affine,
                                          similarity_lstsq, translate_affine)
from reliableswap.geometry.grid import border_points, jacobian_determinant, pixel_grid, sample_at, warp_backward

__all__ = ["affine_scale", "apply_affine", "border_points", "compose_affine", "invert_affine", "jacobian_determinant",
           "pixel_grid", "resize_affine", "sample_at", "similarity_lstsq", "translate_affine", "warp_backward"]
