"""``reliableswap pairs``: faces of a prep folder → ``pairs.jsonl`` (+ ``<stem>.summary.json``).

Pairing settings come from a recipe's ``[pairs]`` section (flags override them); see
:func:`reliableswap.pairs.make_pairs`. Instant, so not resumable: a re-run rewrites the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from reliableswap.jobs import Job, NothingUsable, bad_records
from reliableswap.pairs import has_identity_info, make_pairs
from reliableswap.recipes import PairsSection
from triplets.records import FaceSet, PairRecord

NO_IDENTITY = ("faces carry neither identity labels nor embeddings: pairs may join one person with themself "
               "(use prep --embed or --identity-from-folder)")


def run_pairs(folder: str | os.PathLike, out: str | os.PathLike, cfg: PairsSection = PairsSection(),
              progress: bool = False) -> dict:
    """Write ``out`` (pairs.jsonl); returns the summary (also ``<out stem>.summary.json``)."""
    out = Path(out)
    faces = FaceSet.load(folder, flame=False, strict=False)
    with Job("pairs", out.parent, cfg.model_dump(mode="json"), "pairs", shared=out.stem, resumable=False,
             progress=progress) as job:
        job.progress(0, 1)
        with job.stage("pair"):
            pairs = make_pairs(faces.faces, cfg)
        if not pairs:
            first = f"; {len(faces.problems)} lines refused, the first: {faces.problems[0]}" if faces.problems else ""
            raise NothingUsable(f"no eligible pair among {len(faces)} faces (all one identity, or poses too far apart){first}")
        PairRecord.write(out, pairs)
        job.progress(1, 1)
        return job.finish(n_in=len(faces) + len(faces.problems), written=len(pairs), written_this_run=len(pairs),
                          rejects=bad_records(faces.problems),
                          details={"warning": None if has_identity_info(faces.faces) else NO_IDENTITY})
