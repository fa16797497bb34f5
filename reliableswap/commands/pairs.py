"""``reliableswap pairs``: faces of a prep folder → ``pairs.jsonl`` (+ ``<stem>.summary.json``).

Pairing settings come from a recipe's ``[pairs]`` section (flags override them); see
:func:`reliableswap.pairs.make_pairs`. A re-run rewrites the file.

Pairs never join one person with themself. Two faces are one person when they carry the same
identity label, or when the identity judge (``[identity] judge``) says so: SFace (default) embeds
every face's crop and a cosine of at least 0.363 means the same person; dlib (the weak judge)
compares 128-D descriptors (``prep --embed``'s, or computed here) at a distance below 0.6.
Computed embeddings are cached beside the output (``embeddings.jsonl``: face id, judge, crop
SHA-256, embedding), so a re-run computes only what changed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from reliableswap.images import MAX_IMAGE_BYTES, decode_checked, to_tensor
from reliableswap.jobs import Job, NothingUsable, bad_records, reject
from reliableswap.judge import load_judge
from reliableswap.pairs import make_pairs
from reliableswap.recipes import PairsSection
from triplets.records import ContractError, PairRecord, read_inside
from reliableswap.contracts import EmbeddingRecord, FaceRecord, FaceSet

EMBEDDINGS = EmbeddingRecord.FILE
#: Crops embedded at once by the SFace judge.
EMBED_BATCH = 32


def fill_embeddings(faces: FaceSet, cache: Path, judge: str = "sface") -> tuple[list[FaceRecord], list[dict], int, int]:
    """The faces pairs may use, each with the ``judge``'s embedding in ``embedding`` where the judge
    needs one: with SFace every face, with dlib those with neither an identity label nor a stored
    descriptor. Embeddings are taken from ``cache`` when the crop's bytes are unchanged, else
    computed on the crop. Returns ``(faces, rejects, computed, cached)``; a face whose crop cannot
    be read is left out with a reason."""
    need = faces.faces if judge == "sface" else [f for f in faces.faces if f.identity is None and f.embedding is None]
    if not need:
        return faces.faces, [], 0, 0
    # a cache line that breaks the contract, or another judge's, is simply recomputed
    cached = {r.id: r for r in EmbeddingRecord.read_valid(cache)[0] if r.judge == judge} if cache.is_file() else {}
    model, out, rejects, computed = None, {}, [], 0
    todo: list[tuple[FaceRecord, str, np.ndarray]] = []
    for f in need:
        try:
            data = read_inside(faces.folder, f.image, f.where, "image", MAX_IMAGE_BYTES)  # read once: hashed and decoded
            sha = hashlib.sha256(data).hexdigest()
            if f.id in cached and cached[f.id].sha256 == sha:
                out[f.id] = cached[f.id]
                continue
            todo.append((f, sha, decode_checked(data, (f.size, f.size), name=f.image)))
        except (OSError, ValueError, ContractError) as e:
            rejects.append(reject(f.id, f"no descriptor: {type(e).__name__}: {e}".splitlines()[0]))
    for k in range(0, len(todo), EMBED_BATCH):
        part = todo[k:k + EMBED_BATCH]
        model = model or load_judge(judge)
        with torch.no_grad():
            emb = model.embed(to_tensor([img for _, _, img in part]), torch.tensor([f.landmarks68 for f, _, _ in part], dtype=torch.float32))
        for (f, sha, _), e in zip(part, emb.cpu().numpy()):
            out[f.id] = EmbeddingRecord(id=f.id, judge=judge, sha256=sha, embedding=[round(float(v), 5) for v in e])
            computed += 1
    if computed:
        EmbeddingRecord.write(cache, out.values())
    if judge == "sface":
        done = [f.model_copy(update={"embedding": out[f.id].embedding}) for f in faces.faces if f.id in out]
    else:
        done = [f if f.id not in out else f.model_copy(update={"embedding": out[f.id].embedding}) for f in faces.faces
                if f.identity is not None or f.embedding is not None or f.id in out]
    return done, rejects, computed, len(out) - computed


def run_pairs(faces: str | os.PathLike, out: str | os.PathLike, cfg: PairsSection = PairsSection(), *,
              progress: bool = False, judge: str = "sface") -> dict:
    """Write ``out`` (pairs.jsonl) from the prep folder ``faces``; returns the summary (also
    ``<out stem>.summary.json``). ``judge``: who decides that two unlabelled faces are one person
    (see the module doc)."""
    out = Path(out)
    faces = FaceSet.load(faces, flame=False, strict=False)
    with Job("pairs", out.parent, cfg.model_dump(mode="json") | {"judge": judge}, "pairs", shared=out.stem, resumable=False,
             progress=progress) as job:
        job.progress(0, 1)
        with job.stage("embed"):
            usable, no_desc, computed, cached = fill_embeddings(faces, out.parent / EMBEDDINGS, judge)
        with job.stage("pair"):
            pairs = make_pairs(usable, cfg, judge=judge)
        if not pairs:
            first = f"; {len(faces.problems)} lines refused, the first: {faces.problems[0]}" if faces.problems else ""
            raise NothingUsable(f"no eligible pair among {len(faces)} faces (all one identity, or poses too far apart){first}")
        PairRecord.write(out, pairs)
        job.progress(1, 1)
        return job.finish(n_in=len(faces) + len(faces.problems), written=len(pairs), written_this_run=len(pairs),
                          rejects=bad_records(faces.problems) + no_desc,
                          details={"judge": judge, "descriptors_computed": computed, "descriptors_cached": cached})
