"""``reliableswap finetune``: fine-tune a swapper with its own loss plus ReliableSwap's cycle
supervision (the loop is :class:`reliableswap.train.loop.Trainer`). Resumable with ``--resume``;
data parallel under torchrun; rank 0 writes the summary."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from reliableswap.device import check_batch_memory, resolve_device
from reliableswap.jobs import Job, SettingsMismatch, take_lock
from reliableswap.recipes import TrainRecipe
from reliableswap.train.loop import Trainer
from reliableswap.train.losses import CycleSupervision
from reliableswap.errors import UserError


#: What a run writes in its folder (``--overwrite`` removes these, nothing else).
RUN_FILES = ("checkpoints", "samples", "tensorboard", "metrics.jsonl", "summary.json", "rejects.jsonl", "train.txt",
             "heldout.txt", "held_occluded.jsonl", ".finetune")


#: Image-sized float32 tensors one training sample keeps alive in a step, at the least: the batch
#: (source, target, reference), the result, the losses' intermediates and their gradients. The
#: swapper's own activations come on top, so this is a floor that refuses the impossible early.
TENSORS_PER_SAMPLE = 12


def train_bytes_per_sample(recipe: TrainRecipe) -> int:
    """A lower bound of the memory one sample of ``recipe``'s batch takes in a step (bytes)."""
    side = max(recipe.data.image_size, recipe.model.size if recipe.model.swapper == "faceshifter" else recipe.model.input_size)
    return TENSORS_PER_SAMPLE * 3 * 4 * side * side


def run_finetune(recipe: TrainRecipe, triplets: str | os.PathLike, out: str | os.PathLike, *, faces: str | os.PathLike | None = None,
                 resume: bool = False, checkpoint: str | os.PathLike | None = None, device: str = "auto",
                 progress: bool = False, supervision: CycleSupervision | None = None, overwrite: bool = False) -> dict:
    """Fine-tune into the run folder ``out``; returns the summary (also ``OUT/summary.json`` from rank 0).

    The recipe (all but ``train.steps``, which a resumed run may extend) is pinned in the run
    folder: resuming with another recipe is refused, and so is starting afresh in a folder that
    already holds a run (pass ``resume`` to continue it, ``overwrite`` to remove the old run's
    files first, or use another folder).
    """
    run = Path(out)
    check_batch_memory(recipe.data.batch, train_bytes_per_sample(recipe), resolve_device(device), flag="[data] batch")
    used = [n for n in RUN_FILES if (run / n).exists()]
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if used and not resume:
        if not overwrite:
            raise SettingsMismatch(f"{run} already holds a run ({', '.join(used)}): pass --resume to continue it, "
                                   "--overwrite to start again in it, or use another --out")
        if int(os.environ.get("RANK", "0")) == 0:
            lock = take_lock(run, "finetune", "finetune")  # a run still in progress keeps its files
            try:
                for n in used:
                    p = run / n
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            finally:
                lock.release()
    settings = recipe.model_dump(mode="json")
    settings["train"].pop("steps")
    trainer = Trainer(recipe, Path(triplets), run, Path(faces) if faces else None, Path(checkpoint) if checkpoint else None,
                      device, supervision)
    with Job("finetune", run, settings, "steps", device=str(trainer.dev), progress=progress and trainer.main,
             lock=trainer.main) as job:
        start = trainer.resume() if resume else 0
        res = trainer.fit(start, job.progress)
        trainer.close()
        r, bs, world = recipe, recipe.data.batch, trainer.world
        details = {
            "recipe": recipe.model_dump(mode="json"), "world_size": world, "backend": trainer.backend,
            "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp else False,
            "steps": res["step"], "resumed_from": start, "skipped_non_finite": res["skipped"],
            "train_triplets": trainer.tri._n, "heldout_triplets": trainer.held._n if trainer.held else 0,
            "vanilla_faces": len(trainer.faces.paths) if trainer.faces else 0,
            "eval": {"cycle_l1_start": res["eval_start"], "cycle_l1_end": res["eval_end"],
                     "note": None if trainer.held is not None else "no held-out split (shards, or holdout = 0)"}
            | ({"occluder_l1_start": res["occluder_start"], "occluder_l1_end": res["occluder_end"]}
               if trainer.held_occluded is not None else {}),
            "samples_per_s": round(res["ran"] * bs * world / res["wall"], 2) if res["wall"] > 0 and res["ran"] else None,
            **trainer.info,
        }
        if not trainer.main:
            return {"details": details}
        return job.finish(n_in=r.train.steps, written=res["step"], written_this_run=res["ran"], skipped=start, rejects=[],
                          details=details, wall=res["wall"])
