"""Cycle-supervised fine-tuning: add ReliableSwap's triplet supervision to any face swapper.

* :class:`~reliableswap.train.swapper.SwapperAdapter` — feeds any ``swapper(source, target)`` (or an
  identity-conditioned generator ``G(target, id(source))``) in its value range and input size;
* :class:`~reliableswap.train.losses.CycleSupervision` — per-type-code pixel / perceptual / identity /
  same-identity terms for batches of :class:`triplets.TripletDataset`;
* :mod:`~reliableswap.train.aei` — a compact FaceShifter AEI-Net with its own losses;
* :mod:`~reliableswap.train.loop` — the fine-tuning loop (:class:`~reliableswap.train.loop.Trainer`);
* :mod:`~reliableswap.train.build` — swapper, identity encoder and weights from a training recipe.
"""

from reliableswap.train.losses import CycleSupervision
from reliableswap.train.swapper import Swapper, SwapperAdapter

__all__ = ["CycleSupervision", "Swapper", "SwapperAdapter"]
