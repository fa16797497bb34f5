"""The contracts of the commands' own files: a prep folder's faces and FLAME fits
(:mod:`.faces`), the embeddings ``pairs`` caches (:mod:`.embeddings`) and every command's
``summary.json`` (:mod:`.summary`). What a trainer reads (pairs, manifests, flows, rejects, the
official layout, TripletDataset) stays in the light :mod:`triplets` package, whose record base
these build on; this package imports nothing else of ``reliableswap``."""

from reliableswap.contracts.embeddings import EmbeddingRecord
from reliableswap.contracts.faces import (OCCLUDER_CHANNELS, FaceRecord, FaceSet, FlameRecord, OccluderArea, Occluders, Origin,
                                          Pose, Quality)
from reliableswap.contracts.summary import Counts, Summary, Throughput, Timings

__all__ = ["OCCLUDER_CHANNELS", "Counts", "EmbeddingRecord", "FaceRecord", "FaceSet", "FlameRecord", "OccluderArea", "Occluders",
           "Origin", "Pose", "Quality", "Summary", "Throughput", "Timings"]
