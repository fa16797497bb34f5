"""Triplet synthesis, one module per ReliableSwap step, all batched tensor code on any device.

reenact → appearance → blend → reshape → quality; :mod:`pipeline` chains them from a recipe.
"""
