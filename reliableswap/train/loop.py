"""The fine-tuning loop: a swapper's own loss plus ReliableSwap's cycle supervision.

Each step draws a batch mixing triplets (types 2–5, or 4–5) and vanilla pairs of real faces (type 0,
with same-identity reconstructions, type 1), runs the swapper, adds :class:`CycleSupervision` to the
swapper's own generator loss (FaceShifter's when it is the reference AEI-Net), steps AdamW, then the
discriminator when the swapper has one. Under ``torchrun`` every process draws its own batch and
gradients are averaged across processes with ``all_reduce`` before each optimizer step (data
parallel, DDP's semantics, for any swapper and any call pattern of its losses). On CUDA it runs under
autocast (bf16 where supported, else fp16 with a gradient scaler).

Files in RUN: ``metrics.jsonl`` (+ TensorBoard events when ``tensorboard`` is installed),
``held_occluded.jsonl`` (with ``[augment] occluders``: what was pasted where on each held-out sample),
``samples/step-N.png`` (rows: source | target | result | reference), ``checkpoints/step-N.safetensors``
(weights) + ``step-N.state.pt`` (optimizers, loaded with ``weights_only``) + ``latest.json``, all
written atomically. Resuming continues from ``latest.json``: batches and random numbers depend only
on (seed, step, rank), so the resumed run follows the same trajectory.
"""

from __future__ import annotations

import errno
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors.torch import save as safetensors_bytes
from torch.utils.data import default_collate

from reliableswap.checkpoints import state_bytes, torch_load
from reliableswap.device import resolve_device
from reliableswap.errors import UserError
from reliableswap.faces.hands import occluder_sources
from reliableswap.images import encode_image, to_uint8
from reliableswap.recipes import TrainRecipe
from reliableswap.train.build import build_swapper, load_weights, parameters_of
from reliableswap.train.data import FacePairs, Mixture, split_triplets
from reliableswap.train.losses import CycleSupervision
from triplets.dataset import TripletDataset
from triplets.jsonl import atomic_write_bytes, atomic_write_json, open_regular, read_json_file
from triplets.occlusion import Occlusion
from triplets.records import ContractError, resolve_inside


def init_distributed() -> tuple[int, int]:
    """``(rank, world)``: joins torchrun's process group (NCCL on CUDA, else gloo) when WORLD_SIZE > 1,
    or under torchrun with ``RELIABLESWAP_DIST=always`` (one process still goes through the
    process group and its all-reduce: how the NCCL path is checked on a single GPU)."""
    under_torchrun = "MASTER_ADDR" in os.environ and "RANK" in os.environ
    wanted = int(os.environ.get("WORLD_SIZE", "1")) > 1 or (under_torchrun and os.environ.get("RELIABLESWAP_DIST") == "always")
    if wanted and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_grads(params: list[torch.Tensor], world: int) -> None:
    """Average gradients over the processes with one flat all_reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not dist.is_initialized() or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` is finite on every process."""
    ok = torch.tensor([float(torch.isfinite(x).all())], device=x.device)
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


@torch.no_grad()
def evaluate(swapper, data: TripletDataset | None, device: torch.device, batch: int, occluded: bool = False) -> float | None:
    """Mean cycle L1 (result vs the real face) over held-out triplets (types 4 and 5); ``occluded``:
    only inside the occluders pasted onto them (the reference carries the same occluder): does the
    swapper keep what lies in front of the face?"""
    if data is None:
        return None
    was = swapper.training
    swapper.eval()
    tot, n = 0.0, 0.0
    for i in range(0, len(data), batch):
        b = default_collate([data[j] for j in range(i, min(i + batch, len(data)))])
        out = swapper(b["source"].to(device), b["target"].to(device)).float()
        err = (out - b["reference"].to(device)).abs()
        if occluded:
            m = b["occluder_mask"].to(device)
            tot, n = tot + float((err * m).sum()), n + float(m.sum()) * out.shape[1]
        else:
            tot, n = tot + float(err.flatten(1).mean(1).sum()), n + out.shape[0]
    swapper.train(was)
    return tot / n if n else None


def sample_grid(path: Path, batch: dict, result: torch.Tensor, n: int = 4) -> None:
    """PNG rows: source | target | result | reference."""
    k = min(n, result.shape[0])
    rows = [torch.cat([batch["source"][i], batch["target"][i], result[i].detach().float().clamp(0, 1).cpu(),
                       batch["reference"][i]], -1) for i in range(k)]
    atomic_write_bytes(path, encode_image(to_uint8(torch.cat(rows, -2)[None])[0], ".png"))


#: Largest metrics.jsonl read back on resume.
MAX_METRICS_BYTES = 1 << 30


#: Largest step a training state may record.
MAX_STEP = 10**9


def check_optimizer_state(opt: torch.optim.Optimizer, sd: Any, where: str, name: str) -> None:
    """Refuse (:class:`ContractError` naming ``where`` and the key) an optimizer state that does not
    fit ``opt``: other parameter groups, or a per-parameter tensor (Adam's ``exp_avg``…) whose shape
    is not its parameter's, or values that are not finite."""
    try:
        groups, state = sd["param_groups"], sd["state"]
        ids = [list(g["params"]) for g in groups]
    except (KeyError, TypeError) as e:
        raise ContractError(where, name, f"not an optimizer state ({type(e).__name__}: {e})") from None
    params = [list(g["params"]) for g in opt.param_groups]
    if [len(i) for i in ids] != [len(p) for p in params]:
        raise ContractError(where, name, f"holds {[len(i) for i in ids]} parameters per group, the model has {[len(p) for p in params]}")
    if not isinstance(state, dict):
        raise ContractError(where, f"{name}.state", "not a mapping")
    shape_of = {pid: p.shape for gi, gp in zip(ids, params) for pid, p in zip(gi, gp)}
    for pid, entry in state.items():
        if pid not in shape_of or not isinstance(entry, dict):
            raise ContractError(where, f"{name}.state.{str(pid)[:20]}", "names no parameter of the model")
        for k, v in entry.items():
            if not isinstance(v, torch.Tensor):
                continue
            if v.dim() > 0 and v.shape != shape_of[pid]:
                raise ContractError(where, f"{name}.state.{pid}.{k}", f"has shape {tuple(v.shape)}, its parameter {tuple(shape_of[pid])}")
            if v.dim() == 0 and k == "step" and not 0 <= float(v) <= MAX_STEP:
                raise ContractError(where, f"{name}.state.{pid}.{k}", f"{float(v):g} is not a step count")
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise ContractError(where, f"{name}.state.{pid}.{k}", "holds NaN or infinite values")


class Metrics:
    """``metrics.jsonl`` (+ TensorBoard when installed), cut back to the resumed step."""

    def __init__(self, run: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = run / "metrics.jsonl", enabled
        self.tb = None
        if not enabled:
            return
        keep = []
        if resume_step and self.path.is_file():  # drop lines past the resumed step: the log matches the trajectory
            keep = [line for line in self._lines() if line.get("step", 0) <= resume_step]
        atomic_write_bytes(self.path, "".join(json.dumps(line) + "\n" for line in keep).encode())
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run / "tensorboard"))
        except Exception:  # noqa: BLE001 — tensorboard not installed
            self.tb = None

    def _lines(self) -> list[dict]:
        """The log's records; a line that is not a JSON object (a torn write) is left out."""
        out = []
        with open_regular(self.path, MAX_METRICS_BYTES) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("step", 0), int):
                    out.append(rec)
        return out

    def log(self, rec: dict) -> None:
        """Append one line whole: a failed write (a full disk) is cut back to the last whole line."""
        if not self.enabled:
            return
        data = (json.dumps(rec) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            end = os.fstat(fd).st_size
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
            except OSError as e:
                os.ftruncate(fd, end)
                raise OSError(e.errno, f"cannot write {self.path} ({e.strerror or e}); a resume continues from the last checkpoint") from None
        finally:
            os.close(fd)
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])


class Trainer:
    """Data, swapper, optimizers and supervision for one run folder (see the module doc)."""

    def __init__(self, recipe: TrainRecipe, triplets: Path, run: Path, faces: Path | None = None,
                 checkpoint: Path | None = None, device: str = "auto", supervision: CycleSupervision | None = None):
        self.r, self.run = recipe, Path(run)
        self.rank, self.world = init_distributed()
        self.backend = dist.get_backend() if dist.is_initialized() else None
        self.main = self.rank == 0
        if device == "auto" and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self.dev = resolve_device(device)
        self.run.mkdir(parents=True, exist_ok=True)
        if self.backend:
            dist.barrier()
        torch.manual_seed(recipe.train.seed)
        self._data(Path(triplets), faces)
        self._model(checkpoint, supervision)

    def _data(self, triplets: Path, faces: Path | None) -> None:
        r = self.r
        train_src, held_src = split_triplets(triplets, r.data.holdout, self.run) if self.main else (None, None)
        if self.backend:
            obj = [(train_src, held_src)]
            dist.broadcast_object_list(obj, 0)
            train_src, held_src = obj[0]
        size = r.data.image_size
        self.tri = TripletDataset(train_src, use_real=r.data.use_real, rec_code=r.data.rec_code, same_rate=r.data.same_rate,
                                  vanilla_rate=0.0 if faces else r.data.vanilla_rate, image_size=size, seed=r.train.seed)
        self.held = TripletDataset(held_src, use_real=False, image_size=size) if held_src else None
        occ = self._occlusion(faces)
        self.tri.occlusion = occ
        # the held-out triplets once more, each with an occluder (fixed seed): the pixel error inside it
        self.held_occluded = (TripletDataset(held_src, use_real=False, image_size=size, occlusion=Occlusion(occ.sources, 1.0))
                              if occ is not None and held_src else None)
        self.faces = FacePairs(Path(faces), size, r.data.same_rate, r.train.seed, occlusion=occ) if faces else None
        self.mix = Mixture(self.tri, self.faces, r.data.vanilla_rate, r.train.seed)

    def _occlusion(self, faces: Path | None) -> Occlusion | None:
        """The recipe's ``[augment]``: hands cut out of the prep folder, procedural objects textured
        from the triplets' real faces."""
        kinds = self.r.augment.occluders
        if not kinds:  # (rate 0 with occluders named: no augmentation, but the occluded held-out evaluation: a baseline)
            return None
        return Occlusion(occluder_sources(kinds, faces, self.tri.real_image, "[augment] occluders ="), self.r.augment.rate)

    def _model(self, checkpoint: Path | None, supervision: CycleSupervision | None) -> None:
        r, dev = self.r, self.dev
        self.swapper, enc = build_swapper(r, dev)
        model = self.model = self.swapper.model
        self.info: dict[str, Any] = {}
        if checkpoint is not None:
            missing, unexpected = model.load_state_dict(load_weights(checkpoint), strict=False)
            self.info["checkpoint"] = {"path": str(checkpoint), "missing_keys": len(missing), "unexpected_keys": len(unexpected)}
        self.g_params = parameters_of(model, "generator_parameters") or [p for p in model.parameters() if p.requires_grad]
        self.d_params = parameters_of(model, "discriminator_parameters") if hasattr(model, "discriminator_loss") else None
        if self.backend:  # identical start on every process
            for p in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(p.data, 0)
        o = r.optim
        self.opt_g = torch.optim.AdamW(self.g_params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.opt_d = torch.optim.AdamW(self.d_params, lr=o.lr_d, betas=tuple(o.betas), weight_decay=o.weight_decay) \
            if self.d_params else None
        self.amp = r.train.amp and dev.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        self.sup = (supervision or CycleSupervision(
            w_cycle=r.loss.cycle, w_same=r.loss.same, w_perceptual=r.loss.perceptual, w_identity=r.loss.identity,
            rec_code=r.data.rec_code, identity=enc if r.loss.identity else None)).to(dev)

    # -- checkpoints ------------------------------------------------------------------------
    @property
    def latest(self) -> Path:
        return self.run / "checkpoints" / "latest.json"

    def save(self, step: int) -> Path:
        """``checkpoints/step-N.safetensors`` + ``step-N.state.pt`` + ``latest.json``, atomically."""
        ck = self.run / "checkpoints"
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        atomic_write_bytes(ck / f"step-{step:07d}.safetensors", safetensors_bytes(state, metadata={"step": str(step)}))
        buf = io.BytesIO()
        torch.save({"step": step, "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict() if self.opt_d else None,
                    "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}, buf)
        atomic_write_bytes(ck / f"step-{step:07d}.state.pt", buf.getvalue())
        atomic_write_json(self.latest, {"step": step, "weights": f"step-{step:07d}.safetensors",
                                        "state": f"step-{step:07d}.state.pt"})
        return ck / f"step-{step:07d}.safetensors"

    def resume(self) -> int:
        """Load ``latest.json``'s weights and optimizer state (its paths stay inside ``checkpoints/``)."""
        if not self.latest.is_file():
            raise UserError(f"--resume: no checkpoint in {self.run / 'checkpoints'}")
        where = str(self.latest)
        try:
            meta = read_json_file(self.latest)
            weights, state = str(meta["weights"]), str(meta["state"])
        except (ValueError, KeyError, TypeError) as e:
            raise ContractError(where, "", f"not a checkpoint pointer ({type(e).__name__}: {e})") from None
        ck = self.latest.parent
        self.model.load_state_dict(load_weights(resolve_inside(ck, weights, where, "weights")))
        state_path = resolve_inside(ck, state, where, "state")
        st = torch_load(state_path, 3 * state_bytes(self.model))
        where = str(state_path)
        if not isinstance(st, dict) or not {"step", "opt_g"} <= set(st):
            raise ContractError(where, "", "not a training state (step, opt_g, opt_d, scaler)")
        step = st["step"]
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
            raise ContractError(where, "step", f"must be a whole number in [0, {MAX_STEP}] (got {str(step)[:40]})")
        if isinstance(meta.get("step"), int) and meta["step"] != step:
            raise ContractError(where, "step", f"{step} differs from latest.json's {meta['step']}")
        for name, opt in (("opt_g", self.opt_g), ("opt_d", self.opt_d)):
            if opt is not None and st.get(name) is not None:
                check_optimizer_state(opt, st[name], where, name)
                opt.load_state_dict(st[name])
        if st.get("scaler") is not None:
            try:
                self.scaler.load_state_dict(st["scaler"])
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise ContractError(where, "scaler", f"not a gradient scaler state ({type(e).__name__})") from None
        return step

    # -- steps ------------------------------------------------------------------------------
    def step(self, step: int) -> tuple[dict[str, Any], dict, torch.Tensor]:
        """One optimizer step (G, then D); returns ``(logs, batch, result)``."""
        r, dev = self.r, self.dev
        torch.manual_seed(r.train.seed * 1_000_003 + step * 1009 + self.rank)
        batch = self.mix.batch(step, self.rank, r.data.batch)
        bdev = {k: v.to(dev, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        logs: dict[str, Any] = {"step": step}
        with torch.autocast(dev.type, dtype=self.amp_dtype, enabled=self.amp):
            result = self.swapper(bdev["source"], bdev["target"])
            loss, sup_logs = self.sup(bdev, result.float())
            if hasattr(self.model, "generator_loss"):
                loss_own, own_logs = self.model.generator_loss(bdev, result.float())
                loss = loss + loss_own
                logs.update(own_logs)
        logs.update(sup_logs)
        self.opt_g.zero_grad(set_to_none=True)
        if not all_finite(loss.detach()):
            logs["skipped"] = "non-finite loss"
            return logs, batch, result
        self.scaler.scale(loss).backward()
        average_grads(self.g_params, self.world)
        if r.optim.grad_clip:
            self.scaler.unscale_(self.opt_g)
            torch.nn.utils.clip_grad_norm_(self.g_params, r.optim.grad_clip)
        self.scaler.step(self.opt_g)
        if self.opt_d is not None:
            self._step_d(bdev, result, logs)
        self.scaler.update()
        logs["loss"] = float(loss.detach())
        return logs, batch, result

    def _step_d(self, bdev: dict, result: torch.Tensor, logs: dict[str, Any]) -> None:
        self.opt_d.zero_grad(set_to_none=True)
        with torch.autocast(self.dev.type, dtype=self.amp_dtype, enabled=self.amp):
            loss_d, d_logs = self.model.discriminator_loss(bdev, result.float())
        logs.update(d_logs)
        if all_finite(loss_d.detach()):
            self.scaler.scale(loss_d).backward()
            average_grads(self.d_params, self.world)
            self.scaler.step(self.opt_d)
        else:
            logs["skipped_d"] = "non-finite loss"

    def evaluate(self) -> float | None:
        return evaluate(self.swapper, self.held, self.dev, self.r.data.batch)

    def evaluate_occluded(self) -> float | None:
        return evaluate(self.swapper, self.held_occluded, self.dev, self.r.data.batch, occluded=True)

    def record_occlusion(self) -> None:
        """``RUN/held_occluded.jsonl``: what was pasted where on each held-out occluded sample (the
        sample's index and type code, the occluder's kind and its box: top, left, height, width)."""
        data = self.held_occluded
        rows = []
        for j in range(len(data)):
            s = data[j]
            rows.append({"index": j, "type_code": int(s["type_code"]), "occluder": s["occluder"],
                         "box": [int(v) for v in s["occluder_box"]]})
        atomic_write_bytes(self.run / "held_occluded.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())

    def fit(self, start: int, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Steps ``start+1 … train.steps`` with logging, samples, evaluation and checkpoints."""
        r, main = self.r, self.main
        metrics = Metrics(self.run, start, main)
        eval_start = self.evaluate() if start == 0 else None
        occ_start = self.evaluate_occluded() if start == 0 else None
        if main and occ_start is not None:
            self.record_occlusion()
        if main and eval_start is not None:
            metrics.log({"step": 0, "eval/cycle_l1": eval_start} | ({"eval/occluder_l1": occ_start} if occ_start is not None else {}))
        skipped = 0
        t0 = time.perf_counter()
        self.swapper.train()
        step = start
        for step in range(start + 1, r.train.steps + 1):
            logs, batch, result = self.step(step)
            if "skipped" in logs:
                skipped += 1
                metrics.log(logs)
                continue
            if main and (step % r.train.log_every == 0 or step == r.train.steps):
                logs["steps_per_s"] = round((step - start) / (time.perf_counter() - t0), 3)
                metrics.log(logs)
            if main and r.train.sample_every and step % r.train.sample_every == 0:
                sample_grid(self.run / "samples" / f"step-{step:07d}.png", batch, result)
            if r.train.eval_every and step % r.train.eval_every == 0:
                ev = self.evaluate()
                if main:
                    metrics.log({"step": step, "eval/cycle_l1": ev})
            if main and (step % r.train.ckpt_every == 0 or step == r.train.steps):
                self.save(step)
            if self.backend and step % r.train.ckpt_every == 0:
                dist.barrier()
            if progress and main:
                progress(step, r.train.steps)
        wall = time.perf_counter() - t0
        eval_end = self.evaluate()
        occ_end = self.evaluate_occluded()
        if main:
            metrics.log({"step": step, "eval/cycle_l1": eval_end} | ({"eval/occluder_l1": occ_end} if occ_end is not None else {}))
        return {"step": step, "ran": max(step - start, 0), "skipped": skipped, "wall": wall,
                "eval_start": eval_start, "eval_end": eval_end, "occluder_start": occ_start, "occluder_end": occ_end}

    def close(self) -> None:
        if self.backend:
            dist.barrier()
            dist.destroy_process_group()
