"""reliableswap: supervision data for face-swap training.

Images are ``B×3×H×W`` float tensors in [0, 1] on any device; landmarks are ``B×K×2`` pixel
``(x, y)``. numpy/OpenCV appear only at the I/O edges.
"""

__version__ = "0.1.0"
