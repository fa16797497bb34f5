"""``reliableswap pairs``: faces of a prep folder → ``pairs.jsonl`` (+ ``<stem>.summary.json``).

Pairing settings come from a recipe's ``[pairs]`` section (flags override them); see
:func:`reliableswap.pairs.make_pairs`. A re-run rewrites the file.

Pairs never join one person with themself: faces that carry neither an identity label nor a
``prep --embed`` descriptor get dlib's 128-D descriptor computed here, from their crop and
landmarks, and cached beside the output (``embeddings.jsonl``: face id, crop SHA-256,
descriptor), so a re-run computes only what changed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from reliableswap.faces.embed import DlibEmbedder
from reliableswap.images import MAX_IMAGE_BYTES, decode_checked
from reliableswap.jobs import Job, NothingUsable, bad_records, reject
from reliableswap.pairs import make_pairs
from reliableswap.recipes import PairsSection
from triplets.records import ContractError, EmbeddingRecord, FaceRecord, FaceSet, PairRecord, read_inside

EMBEDDINGS = EmbeddingRecord.FILE


def fill_embeddings(faces: FaceSet, cache: Path) -> tuple[list[FaceRecord], list[dict], int, int]:
    """Every face with an identity label or a descriptor: the missing descriptors computed (dlib,
    on the crop) or taken from ``cache``. Returns ``(faces, rejects, computed, cached)``; a face
    whose crop cannot be read is left out with a reason."""
    need = [f for f in faces.faces if f.identity is None and f.embedding is None]
    if not need:
        return faces.faces, [], 0, 0
    # a cache line that breaks the contract is simply recomputed
    cached = {r.id: r for r in EmbeddingRecord.read_valid(cache)[0]} if cache.is_file() else {}
    embedder, out, rejects, computed = None, {}, [], 0
    for f in need:
        try:
            data = read_inside(faces.folder, f.image, f.where, "image", MAX_IMAGE_BYTES)  # read once: hashed and decoded
            sha = hashlib.sha256(data).hexdigest()
            if f.id in cached and cached[f.id].sha256 == sha:
                out[f.id] = cached[f.id]
                continue
            embedder = embedder or DlibEmbedder()
            emb = embedder(decode_checked(data, (f.size, f.size)), np.asarray([f.landmarks68], np.float32))[0]
        except (OSError, ValueError, ContractError) as e:
            rejects.append(reject(f.id, f"no descriptor: {type(e).__name__}: {e}".splitlines()[0]))
            continue
        out[f.id] = EmbeddingRecord(id=f.id, sha256=sha, embedding=[round(float(v), 5) for v in emb])
        computed += 1
    if computed:
        EmbeddingRecord.write(cache, out.values())
    done = [f if f.id not in out else f.model_copy(update={"embedding": out[f.id].embedding}) for f in faces.faces
            if f.identity is not None or f.embedding is not None or f.id in out]
    return done, rejects, computed, len(out) - computed


def run_pairs(folder: str | os.PathLike, out: str | os.PathLike, cfg: PairsSection = PairsSection(),
              progress: bool = False) -> dict:
    """Write ``out`` (pairs.jsonl); returns the summary (also ``<out stem>.summary.json``)."""
    out = Path(out)
    faces = FaceSet.load(folder, flame=False, strict=False)
    with Job("pairs", out.parent, cfg.model_dump(mode="json"), "pairs", shared=out.stem, resumable=False,
             progress=progress) as job:
        job.progress(0, 1)
        with job.stage("embed"):
            usable, no_desc, computed, cached = fill_embeddings(faces, out.parent / EMBEDDINGS)
        with job.stage("pair"):
            pairs = make_pairs(usable, cfg)
        if not pairs:
            first = f"; {len(faces.problems)} lines refused, the first: {faces.problems[0]}" if faces.problems else ""
            raise NothingUsable(f"no eligible pair among {len(faces)} faces (all one identity, or poses too far apart){first}")
        PairRecord.write(out, pairs)
        job.progress(1, 1)
        return job.finish(n_in=len(faces) + len(faces.problems), written=len(pairs), written_this_run=len(pairs),
                          rejects=bad_records(faces.problems) + no_desc,
                          details={"descriptors_computed": computed, "descriptors_cached": cached})
