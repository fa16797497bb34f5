"""``reliableswap finetune``: fine-tune a swapper with its own loss plus ReliableSwap's cycle supervision.

Each step draws a batch mixing triplets (types 2–5, or 4–5) and vanilla pairs of real faces (type 0,
with same-identity reconstructions, type 1), runs the swapper, adds :class:`CycleSupervision` to the
swapper's own generator loss (FaceShifter's when it is the reference AEI-Net), steps AdamW, then the
discriminator when the swapper has one. Under ``torchrun`` every process draws its own batch and
gradients are averaged across processes with ``all_reduce`` before each optimizer step (data
parallel, DDP's semantics, for any swapper and any call pattern of its losses). On CUDA it runs under
autocast (bf16 where supported, else fp16 with a gradient scaler).

Files in RUN: ``metrics.jsonl`` (+ TensorBoard events when ``tensorboard`` is installed),
``samples/step-N.png`` (rows: source | target | result | reference), ``checkpoints/step-N.safetensors``
(weights) + ``step-N.state.pt`` (optimizers, loaded with ``weights_only``) + ``latest.json``, all
written atomically; ``summary.json``. ``--resume`` continues from ``latest.json``: batches and random
numbers depend only on (seed, step, rank), so the resumed run follows the same trajectory.
"""

from __future__ import annotations

import io
import json
import os
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from reliableswap import __version__
from reliableswap.io import sections_from_dict
from reliableswap.train.data import FacePairs, Mixture, split_triplets
from reliableswap.train.losses import CycleSupervision
from reliableswap.train.swapper import SwapperAdapter, load_class
from triplets.dataset import TripletDataset
from triplets.jsonl import atomic_write_bytes, atomic_write_json
from triplets.schema import SUMMARY_SCHEMA


@dataclass
class ModelCfg:
    swapper: str = "faceshifter"  # faceshifter | "package.module:Class"
    size: int = 256  # faceshifter: image side
    base: int = 32  # faceshifter: first encoder channels
    max_ch: int = 512
    d_scales: int = 2
    d_base: int = 32
    value_range: list = field(default_factory=lambda: [0.0, 1.0])  # user class: the range it takes and returns
    input_size: int = 0  # user class: the side it expects (0 = the data's)
    condition: str = "pair"  # user class: pair → C(source, target); identity → C(target, id(source))
    kwargs: dict = field(default_factory=dict)  # user class: constructor arguments


@dataclass
class IdentityCfg:
    kind: str = "dlib"  # dlib (128-D, offline, no gradient) | arcface (512-D iresnet checkpoint)
    checkpoint: str = ""  # arcface: insightface arcface_torch backbone.pth


@dataclass
class DataCfg:
    use_real: bool = True  # types 2–5 per triplet (False: the official 4–5)
    rec_code: list = field(default_factory=lambda: [1, 2, 3, 4, 5])
    same_rate: float = 0.2  # FaceShifter's same-identity reconstruction rate
    vanilla_rate: float = 0.2  # share of vanilla pairs (from --faces, else other triplets' images)
    image_size: int = 256
    batch: int = 8
    holdout: int = 8  # triplet folders kept out of training for the cycle-L1 evaluation


@dataclass
class LossCfg:
    cycle: float = 1.0  # CycleSupervision pixel L1 on types 2–5 (official: 0.05 next to FaceShifter's losses)
    same: float = 0.0  # CycleSupervision L1 on type 1 (FaceShifter's own reconstruction term covers it)
    perceptual: float = 0.0  # needs a feature extractor (Python API)
    identity: float = 0.0  # needs identity.kind = arcface
    adv: float = 1.0  # FaceShifter weights
    att: float = 10.0
    id: float = 5.0
    rec: float = 10.0


@dataclass
class OptimCfg:
    lr: float = 4e-4
    lr_d: float = 4e-4
    betas: list = field(default_factory=lambda: [0.0, 0.999])
    weight_decay: float = 1e-4
    grad_clip: float = 0.0  # 0 = off


@dataclass
class TrainCfg:
    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    sample_every: int = 100
    ckpt_every: int = 100
    eval_every: int = 0  # 0: at start and end only
    amp: bool = True  # CUDA only


@dataclass
class TrainRecipe:
    name: str = "faceshifter"
    model: ModelCfg = field(default_factory=ModelCfg)
    identity: IdentityCfg = field(default_factory=IdentityCfg)
    data: DataCfg = field(default_factory=DataCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)

    @classmethod
    def load(cls, path: str | Path) -> "TrainRecipe":
        with open(path, "rb") as f:
            d = tomllib.load(f)
        d.setdefault("name", Path(path).stem)
        return sections_from_dict(cls, d)


# -- construction ------------------------------------------------------------------------------

def build_identity(cfg: IdentityCfg, device: torch.device):
    """(encoder, dim, differentiable)."""
    if cfg.kind == "dlib":
        from reliableswap.train.arcface import DlibEncoder

        return DlibEncoder(), 128, False
    if cfg.kind == "arcface":
        from reliableswap.train.arcface import load_arcface

        if not cfg.checkpoint:
            raise ValueError("identity.kind = arcface needs identity.checkpoint (an insightface arcface_torch backbone.pth)")
        enc = load_arcface(cfg.checkpoint, device=device)
        return enc, enc.net.fc.out_features, True
    raise ValueError(f"identity.kind must be dlib or arcface, got {cfg.kind!r}")


def build_swapper(r: TrainRecipe, device: torch.device, identity=None):
    """The trainable swapper wrapped in :class:`SwapperAdapter` (and its identity encoder)."""
    if identity is None:
        identity = build_identity(r.identity, device)
    enc, dim, diff = identity
    m = r.model
    if m.swapper == "faceshifter":
        from reliableswap.train.aei import FaceShifter

        model = FaceShifter(enc, dim, m.size, m.base, m.max_ch, m.d_scales, m.d_base, diff,
                            r.loss.adv, r.loss.att, r.loss.id, r.loss.rec)
        return SwapperAdapter(model, (0.0, 1.0), m.size).to(device), enc
    model = load_class(m.swapper)(**m.kwargs)
    return SwapperAdapter(model, tuple(m.value_range), m.input_size or None, m.condition, enc).to(device), enc


def _params(model, name: str):
    f = getattr(model, name, None)
    return list(f()) if callable(f) else None


# -- checkpoints -------------------------------------------------------------------------------

def _save_checkpoint(run: Path, step: int, swapper: torch.nn.Module, opt_g, opt_d, scaler) -> Path:
    from safetensors.torch import save as st_save

    ck = run / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in swapper.model.state_dict().items()}
    atomic_write_bytes(ck / f"step-{step:07d}.safetensors", st_save(state, metadata={"step": str(step)}))
    buf = io.BytesIO()
    torch.save({"step": step, "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict() if opt_d else None,
                "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}, buf)
    atomic_write_bytes(ck / f"step-{step:07d}.state.pt", buf.getvalue())
    atomic_write_json(ck / "latest.json", {"step": step, "weights": f"step-{step:07d}.safetensors",
                                           "state": f"step-{step:07d}.state.pt"})
    return ck / f"step-{step:07d}.safetensors"


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Swapper weights from ``.safetensors`` or a torch file (``weights_only`` loading)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "generator"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


# -- the loop ----------------------------------------------------------------------------------

def _dist() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _average_grads(params: list[torch.Tensor], world: int) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def _all_finite(x: torch.Tensor, world: int) -> bool:
    ok = torch.tensor([float(torch.isfinite(x).all())], device=x.device)
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


@torch.no_grad()
def evaluate(swapper, data: TripletDataset | None, device: torch.device, batch: int) -> float | None:
    """Mean cycle L1 (result vs the real face) over held-out triplets (types 4 and 5)."""
    if data is None:
        return None
    was = swapper.training
    swapper.eval()
    tot, n = 0.0, 0
    for i in range(0, len(data), batch):
        b = default_collate([data[j] for j in range(i, min(i + batch, len(data)))])
        out = swapper(b["source"].to(device), b["target"].to(device)).float()
        tot += float((out - b["reference"].to(device)).abs().flatten(1).mean(1).sum())
        n += out.shape[0]
    swapper.train(was)
    return tot / max(n, 1)


def _sample_grid(path: Path, batch: dict, result: torch.Tensor, n: int = 4) -> None:
    from reliableswap.io import encode_image, to_uint8

    k = min(n, result.shape[0])
    rows = [torch.cat([batch["source"][i], batch["target"][i], result[i].detach().float().clamp(0, 1).cpu(),
                       batch["reference"][i]], -1) for i in range(k)]
    atomic_write_bytes(path, encode_image(to_uint8(torch.cat(rows, -2)[None])[0], ".png"))


class _Metrics:
    def __init__(self, run: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = run / "metrics.jsonl", enabled
        self.tb = None
        if not enabled:
            return
        if self.path.is_file():  # drop lines past the resumed step: the log matches the trajectory
            keep = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_bytes(self.path, ("\n".join(keep) + "\n" if keep else "").encode())
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run / "tensorboard"))
        except Exception:  # noqa: BLE001 — tensorboard not installed
            self.tb = None

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])


def run_finetune(recipe: TrainRecipe, triplets: Path, run: Path, faces: Path | None = None, steps: int | None = None,
                 resume: bool = False, checkpoint: Path | None = None, swapper_spec: str | None = None,
                 device: str = "auto", progress: Callable[[int, int], None] | None = None,
                 supervision: CycleSupervision | None = None) -> dict:
    """Fine-tune; returns the summary (also ``run/summary.json`` from rank 0)."""
    r = recipe
    if swapper_spec:
        r.model.swapper = swapper_spec
    if steps is not None:
        r.train.steps = steps
    rank, world = _dist()
    if device == "auto":
        dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    main = rank == 0
    run.mkdir(parents=True, exist_ok=True)
    if world > 1:
        dist.barrier()
    torch.manual_seed(r.train.seed)
    train_src, held_src = split_triplets(Path(triplets), r.data.holdout, run) if main else (None, None)
    if world > 1:
        obj = [(train_src, held_src)]
        dist.broadcast_object_list(obj, 0)
        train_src, held_src = obj[0]
    size = r.data.image_size
    tri = TripletDataset(train_src, use_real=r.data.use_real, rec_code=r.data.rec_code, same_rate=r.data.same_rate,
                         vanilla_rate=0.0 if faces else r.data.vanilla_rate, image_size=size, seed=r.train.seed)
    held = TripletDataset(held_src, use_real=False, image_size=size) if held_src else None
    fp = FacePairs(Path(faces), size, r.data.same_rate, r.train.seed) if faces else None
    mix = Mixture(tri, fp, r.data.vanilla_rate, r.train.seed)

    swapper, enc = build_swapper(r, dev)
    model = swapper.model
    info: dict[str, Any] = {}
    if checkpoint is not None:
        missing, unexpected = model.load_state_dict(load_weights(checkpoint), strict=False)
        info["checkpoint"] = {"path": str(checkpoint), "missing_keys": len(missing), "unexpected_keys": len(unexpected)}
    g_params = _params(model, "generator_parameters") or [p for p in model.parameters() if p.requires_grad]
    d_params = _params(model, "discriminator_parameters") if hasattr(model, "discriminator_loss") else None
    if world > 1:  # identical start on every process
        for p in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(p.data, 0)
    b1, b2 = r.optim.betas
    opt_g = torch.optim.AdamW(g_params, lr=r.optim.lr, betas=(b1, b2), weight_decay=r.optim.weight_decay)
    opt_d = torch.optim.AdamW(d_params, lr=r.optim.lr_d, betas=(b1, b2), weight_decay=r.optim.weight_decay) if d_params else None
    amp = r.train.amp and dev.type == "cuda"
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
    sup = supervision or CycleSupervision(
        w_cycle=r.loss.cycle, w_same=r.loss.same, w_perceptual=r.loss.perceptual, w_identity=r.loss.identity,
        rec_code=r.data.rec_code, identity=enc if r.loss.identity else None)
    sup = sup.to(dev)

    start = 0
    latest = run / "checkpoints" / "latest.json"
    if resume:
        if not latest.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {run / 'checkpoints'}")
        meta = json.loads(latest.read_text())
        model.load_state_dict(load_weights(run / "checkpoints" / meta["weights"]))
        st = torch.load(run / "checkpoints" / meta["state"], map_location="cpu", weights_only=True)
        opt_g.load_state_dict(st["opt_g"])
        if opt_d is not None and st["opt_d"] is not None:
            opt_d.load_state_dict(st["opt_d"])
        if st["scaler"] is not None:
            scaler.load_state_dict(st["scaler"])
        start = int(st["step"])
    metrics = _Metrics(run, start, main)
    bs = r.data.batch
    eval_start = evaluate(swapper, held, dev, bs) if start == 0 else None
    if main and eval_start is not None:
        metrics.log({"step": 0, "eval/cycle_l1": eval_start})
    skipped = 0
    t0 = time.perf_counter()
    swapper.train()
    step = start
    for step in range(start + 1, r.train.steps + 1):
        torch.manual_seed(r.train.seed * 1_000_003 + step * 1009 + rank)
        batch = mix.batch(step, rank, bs)
        bdev = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        logs: dict[str, Any] = {"step": step}
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
            result = swapper(bdev["source"], bdev["target"])
            loss_sup, l1 = sup(bdev, result.float())
            loss = loss_sup
            if hasattr(model, "generator_loss"):
                loss_own, l2 = model.generator_loss(bdev, result.float())
                loss = loss + loss_own
                logs.update(l2)
        logs.update(l1)
        opt_g.zero_grad(set_to_none=True)
        if not _all_finite(loss.detach(), world):
            skipped += 1
            logs["skipped"] = "non-finite loss"
            metrics.log(logs)
            continue
        scaler.scale(loss).backward()
        _average_grads(g_params, world)
        if r.optim.grad_clip:
            scaler.unscale_(opt_g)
            torch.nn.utils.clip_grad_norm_(g_params, r.optim.grad_clip)
        scaler.step(opt_g)
        if opt_d is not None:
            opt_d.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
                loss_d, l3 = model.discriminator_loss(bdev, result.float())
            logs.update(l3)
            if _all_finite(loss_d.detach(), world):
                scaler.scale(loss_d).backward()
                _average_grads(d_params, world)
                scaler.step(opt_d)
            else:
                logs["skipped_d"] = "non-finite loss"
        scaler.update()
        logs["loss"] = float(loss.detach())
        if main and (step % r.train.log_every == 0 or step == r.train.steps):
            logs["steps_per_s"] = round((step - start) / (time.perf_counter() - t0), 3)
            metrics.log(logs)
        if main and r.train.sample_every and step % r.train.sample_every == 0:
            (run / "samples").mkdir(exist_ok=True)
            _sample_grid(run / "samples" / f"step-{step:07d}.png", batch, result)
        if r.train.eval_every and step % r.train.eval_every == 0:
            ev = evaluate(swapper, held, dev, bs)
            if main:
                metrics.log({"step": step, "eval/cycle_l1": ev})
        if main and (step % r.train.ckpt_every == 0 or step == r.train.steps):
            _save_checkpoint(run, step, swapper, opt_g, opt_d, scaler)
        if world > 1 and step % r.train.ckpt_every == 0:
            dist.barrier()
        if progress and main:
            progress(step, r.train.steps)
    wall = time.perf_counter() - t0
    ran = max(step - start, 0)
    eval_end = evaluate(swapper, held, dev, bs)
    if main:
        metrics.log({"step": step, "eval/cycle_l1": eval_end})
    summary = {
        "schema": SUMMARY_SCHEMA, "command": "finetune", "version": __version__, "recipe": asdict(r),
        "device": str(dev), "world_size": world, "amp": amp and str(amp_dtype).replace("torch.", ""),
        "counts": {"steps": step, "steps_this_run": ran, "skipped_non_finite": skipped, "resumed_from": start,
                   "train_triplets": tri._n, "heldout_triplets": held._n if held else 0,
                   "vanilla_faces": len(fp.paths) if fp else 0},
        "eval": {"cycle_l1_start": eval_start, "cycle_l1_end": eval_end,
                 "note": None if held is not None else "no held-out split (shards, or holdout = 0)"},
        "timings": {"wall_s": round(wall, 3)},
        "throughput": {"steps_per_s": round(ran / wall, 3) if wall > 0 and ran else None,
                       "samples_per_s": round(ran * bs * world / wall, 2) if wall > 0 and ran else None},
        **info,
    }
    if main:
        atomic_write_json(run / "summary.json", summary)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary
