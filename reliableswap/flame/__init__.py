"""FLAME: safe model loading, batched LBS, landmark embeddings and landmark fitting.

FLAME model files are licensed (https://flame.is.tue.mpg.de): the user passes a path
(``--flame PATH`` or ``RELIABLESWAP_FLAME``); nothing here ships or downloads them.
"""
