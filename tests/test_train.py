"""Cycle-supervised fine-tuning: CycleSupervision semantics, the adapter, ArcFace loading, and the
finetune loop (held-out improvement, resume equivalence, NaN guard, torchrun with 2 CPU processes)
on real triplets built from ../shared/data/faces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from reliableswap.errors import UserError
from reliableswap.train.losses import CycleSupervision
from reliableswap.train.swapper import SwapperAdapter
from triplets.layout import TYPE_TABLE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_triplets(prepped, tmp_path_factory):
    """16 cycle triplets synthesized from the shared real faces (2D recipe)."""
    from reliableswap.commands.triplets import run_triplets
    from reliableswap.pairs import make_pairs
    from reliableswap.recipes import PairsSection
    from triplets.records import FaceRecord, PairRecord

    src, _ = prepped
    d = tmp_path_factory.mktemp("train_triplets")
    faces = FaceRecord.read(src / "faces.jsonl")
    PairRecord.write(d / "pairs.jsonl", make_pairs(faces, PairsSection(n=16, max_yaw_diff=30.0)))
    run_triplets(src, d / "pairs.jsonl", d / "tri", device="cpu", batch=8)
    return src, d / "tri"


def _batch(codes, has_ref, size=8):
    g = torch.Generator().manual_seed(0)
    b = len(codes)
    return {"source": torch.rand(b, 3, size, size, generator=g), "target": torch.rand(b, 3, size, size, generator=g),
            "reference": torch.rand(b, 3, size, size, generator=g), "type_code": torch.tensor(codes),
            "has_reference": torch.tensor(has_ref), "same": torch.tensor([c == 1 for c in codes])}


def test_loss_zero_when_result_is_reference_and_type0_ignored():
    batch = _batch([0, 1, 2, 3, 4, 5], [False, True, True, True, True, True])
    sup = CycleSupervision(w_cycle=1.0, w_same=1.0)
    result = batch["reference"].clone()
    result[0] = torch.rand(3, 8, 8) * 100  # type 0 has no reference: anything goes
    loss, logs = sup(batch, result)
    assert loss.item() == 0.0 and logs["sup/n_cycle"] == 4 and logs["sup/n_same"] == 1
    result[3] += 0.5  # a referenced type now differs: exactly its L1 share
    loss, _ = sup(batch, result)
    assert loss.item() == pytest.approx(0.5 / 4, rel=1e-6)


def test_type_code_masking_matches_official_table(real_triplets):
    """Masks follow (type code ∈ rec_code, has a reference); on real dataset samples the reference
    is the official table's image."""
    from triplets.dataset import TripletDataset

    _, tri = real_triplets
    for rec_code in [(1, 2, 3, 4, 5), (4, 5), (1,)]:
        ds = TripletDataset(tri, use_real=True, rec_code=rec_code, same_rate=0.2, vanilla_rate=0.2, seed=3)
        items = [ds[i] for i in range(40)]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        cyc, same = CycleSupervision(rec_code=rec_code).masks(batch)
        codes = batch["type_code"].tolist()
        assert cyc.tolist() == [c in rec_code and c in TYPE_TABLE for c in codes]
        assert same.tolist() == [c == 1 and 1 in rec_code for c in codes]
        assert {0, 1} & set(codes) and {2, 3, 4, 5} & set(codes)


def test_gradients_reach_only_the_swapper():
    from reliableswap.testing.swappers import TinyIdentityGenerator

    swapper = SwapperAdapter(TinyIdentityGenerator(id_dim=3), (0.0, 1.0), 8, "identity", identity=lambda x: x.mean((2, 3)))
    feats = nn.Conv2d(3, 4, 3)
    ident = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    sup = CycleSupervision(w_cycle=1.0, w_perceptual=1.0, w_identity=1.0, features=feats, identity=ident)
    batch = _batch([2, 4, 1, 0], [True, True, True, False])
    for k in ("source", "target", "reference"):
        batch[k].requires_grad_(True)
    loss, _ = sup(batch, swapper(batch["source"], batch["target"]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in swapper.model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in list(feats.parameters()) + list(ident.parameters()))
    assert batch["reference"].grad is None and batch["source"].grad is None


def test_adapter_feeds_value_range_and_size():
    seen = {}

    def model(s, t):
        seen["range"] = (float(s.min()), float(s.max()))
        seen["size"] = s.shape[-1]
        return t

    a = SwapperAdapter(model, (-1.0, 1.0), 32)
    x = torch.zeros(2, 3, 64, 64)
    x[..., 32:] = 1.0
    out = a(x, x)
    assert seen["size"] == 32 and seen["range"][0] < -0.99 and seen["range"][1] > 0.99
    assert out.shape == x.shape and 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_arcface_checkpoint_loads_strictly(tmp_path):
    from reliableswap.train.arcface import DEPTHS, IResNet, load_arcface

    torch.manual_seed(0)
    net = IResNet(DEPTHS[18]).eval()
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / "backbone.pth")
    enc = load_arcface(tmp_path / "backbone.pth")
    x = torch.rand(2, 3, 112, 112)
    enc.crop = 1.0
    ref = torch.nn.functional.normalize(net(x * 2 - 1), dim=-1)
    assert torch.allclose(enc(x), ref, atol=1e-5)
    assert not any(p.requires_grad for p in enc.parameters())
    with pytest.raises(UserError, match="backbone.pth"):
        load_arcface(tmp_path / "missing" / "backbone.pth")


def _tiny(steps: int, **over):
    from reliableswap.recipes import TrainRecipe, load_recipe

    r = load_recipe(ROOT / "recipes" / "tiny.toml", TrainRecipe)
    return r.with_overrides({"train.steps": steps, **{k.replace("__", "."): v for k, v in over.items()}})


def test_tiny_finetune_lowers_heldout_cycle_l1(real_triplets, tmp_path):
    from reliableswap.commands.finetune import run_finetune

    faces, tri = real_triplets
    s = run_finetune(_tiny(100), tri, tmp_path / "run", faces=faces)
    ev = s["details"]["eval"]
    assert s["details"]["heldout_triplets"] == 4 and s["counts"]["written_this_run"] == 100
    assert ev["cycle_l1_end"] < 0.8 * ev["cycle_l1_start"], ev
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("sup/cycle" in m for m in lines) and any("g/adv" in m for m in lines)
    assert (tmp_path / "run" / "samples" / "step-0000050.png").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step-0000100.safetensors").is_file()


def test_resume_continues_the_same_trajectory(real_triplets, tmp_path):
    from safetensors.torch import load_file

    from reliableswap.commands.finetune import run_finetune

    faces, tri = real_triplets
    run_finetune(_tiny(6, train__ckpt_every=3), tri, tmp_path / "straight", faces=faces)
    run_finetune(_tiny(3, train__ckpt_every=3), tri, tmp_path / "resumed", faces=faces)
    s = run_finetune(_tiny(6, train__ckpt_every=3), tri, tmp_path / "resumed", faces=faces, resume=True)
    assert s["details"]["resumed_from"] == 3 and s["counts"]["written_this_run"] == 3
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-0000006.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-0000006.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_skips_the_step(real_triplets, tmp_path, monkeypatch):
    """A user swapper (module:Class) that returns NaN on some calls: the step is skipped, logged,
    and training goes on."""
    from reliableswap.commands.finetune import run_finetune

    (tmp_path / "nanswap.py").write_text(
        "import torch\nfrom reliableswap.testing.swappers import TinySwapper\n"
        "class NaNSwapper(TinySwapper):\n"
        "    calls = 0\n"
        "    def forward(self, s, t):\n"
        "        NaNSwapper.calls += 1\n"
        "        out = super().forward(s, t)\n"
        "        return out * float('nan') if NaNSwapper.calls in (3, 5) else out\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _, tri = real_triplets
    r = _tiny(8, model__value_range=[-1.0, 1.0], data__holdout=0, model__swapper="nanswap:NaNSwapper")
    s = run_finetune(r, tri, tmp_path / "run")
    assert s["details"]["skipped_non_finite"] == 2 and s["details"]["steps"] == 8
    skipped = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "skipped" in line]
    assert [m["step"] for m in skipped] == [3, 5]


def test_torchrun_two_cpu_processes(real_triplets, tmp_path):
    faces, tri = real_triplets
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "reliableswap.cli", "finetune",
           "--recipe", str(ROOT / "recipes" / "tiny.toml"), "--triplets", str(tri), "--faces", str(faces),
           "--out", str(tmp_path / "ddp"), "--steps", "4", "--device", "cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert s["details"]["world_size"] == 2 and s["details"]["steps"] == 4
    assert (tmp_path / "ddp" / "checkpoints" / "step-0000004.safetensors").is_file()
