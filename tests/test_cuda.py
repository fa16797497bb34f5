"""Every CUDA path against its CPU result: synthesis (TPS, masks, colour, multi-band, reshape),
the rasterizer and shape flows, the FLAME fit, alignment and FAN, the ``triplets``/``fit``/``flows``
commands, and fine-tuning under AMP (bf16, and fp16 with a gradient scaler) and under torchrun
(NCCL). Synthetic faces only (``reliableswap.testing``): the shared photos do not travel to a
GPU machine. Skipped where there is no CUDA device; never needed for ``make test`` to pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reliableswap.testing.faces import synthetic_faces, write_synthetic_prep
from reliableswap.testing.flame import write_embeddings, write_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (the GPU checks run on a lent machine)")]
ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def faces():
    imgs, lms = synthetic_faces(8, 256, seed=1)
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(lms)


@pytest.fixture(scope="module")
def flame_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("flame")
    model = write_model(d / "generic_model.pkl")
    write_embeddings(d)
    return model


def _close(a: torch.Tensor, b: torch.Tensor, mean: float, peak: float, share: float = 0.999) -> None:
    """Mean difference below ``mean`` and a ``share`` of the values within ``peak`` (GPU and CPU
    round differently; a handful of tie pixels in sorting/searching may flip)."""
    d = (a.detach().float().cpu() - b.detach().float().cpu()).abs().flatten()
    q = float(torch.quantile(d[torch.randperm(d.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]], share))
    assert float(d.mean()) < mean and q < peak, (float(d.mean()), q, float(d.max()))


@pytest.mark.parametrize("appearance", ["lct", "reinhard", "sot"])
def test_synthesis_on_cuda_matches_cpu(faces, appearance):
    from reliableswap.recipes import TripletRecipe
    from reliableswap.synth.pipeline import Synthesizer

    imgs, lms = faces
    syn = Synthesizer(TripletRecipe().with_overrides({"appearance.method": appearance}))
    cpu = syn.cycle(imgs[:4], lms[:4], imgs[4:], lms[4:])
    gpu = syn.cycle(imgs[:4].to(CUDA), lms[:4].to(CUDA), imgs[4:].to(CUDA), lms[4:].to(CUDA))
    for k in ("fake_st", "fake_ts"):
        assert gpu[k].device.type == "cuda" and torch.isfinite(gpu[k]).all()
        # TPS solves and bilinear sampling round differently on the GPU; sliced OT's colour map jumps
        # at the plateaus of flat-colour synthetic faces (atoms of the colour distribution)
        _close(gpu[k], cpu[k], 2 / 255, 0.1, 0.99 if appearance == "sot" else 0.999)
    _close(gpu["landmarks_st"], cpu["landmarks_st"], 1e-3, 1e-2)


def test_multiband_and_masks_on_cuda(faces):
    from reliableswap.faces.masks import face_mask
    from reliableswap.synth.blend import multiband_blend

    imgs, lms = faces
    m_cpu = face_mask(lms, 256, 256, forehead=0.1, feather=0.03)
    m_gpu = face_mask(lms.to(CUDA), 256, 256, forehead=0.1, feather=0.03)
    _close(m_gpu, m_cpu, 1e-4, 1e-2)
    _close(multiband_blend(imgs[:4].to(CUDA), imgs[4:].to(CUDA), m_gpu[:4], 6), multiband_blend(imgs[:4], imgs[4:], m_cpu[:4], 6),
           1e-4, 1e-2)


def test_graphed_multiband_replays_the_blend(faces):
    from reliableswap.synth.blend import GraphedMultiband, multiband_blend

    imgs, lms = faces
    fg, bg = imgs[:4].to(CUDA), imgs[4:].to(CUDA)
    mask = torch.rand(4, 1, 256, 256, device=CUDA)
    blend = GraphedMultiband(6)
    for _ in range(2):  # captured once, replayed
        assert torch.allclose(blend(fg, bg, mask), multiband_blend(fg, bg, mask, 6), atol=1e-6)
    assert torch.allclose(blend(fg[:2], bg[:2], mask[:2]), multiband_blend(fg[:2], bg[:2], mask[:2], 6), atol=1e-6)
    assert len(blend._graphs) == 2


def test_alignment_and_fan_on_cuda(faces, tmp_path, monkeypatch):
    from reliableswap.faces.align import align_transform, warp_faces

    imgs, lms = faces
    m = align_transform(lms.double(), 128, "ffhq")
    _close(warp_faces(imgs.to(CUDA), m.to(CUDA).float(), 128), warp_faces(imgs, m.float(), 128), 1e-4, 1e-2)
    from reliableswap.faces.landmarks import FAN_WEIGHTS, FanLandmarks, FanNet

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(FanNet(4).state_dict(), tmp_path / "hub" / "checkpoints" / FAN_WEIGHTS)  # random weights: plumbing only
    rgb = (imgs[0].permute(1, 2, 0) * 255).byte().numpy()
    boxes = np.array([[60.0, 60.0, 196.0, 210.0], [70.0, 50.0, 190.0, 200.0]])
    gpu, cpu = FanLandmarks("cuda"), FanLandmarks("cpu")
    got = gpu(rgb, boxes)
    assert got.shape == (2, 68, 2) and np.isfinite(got).all()
    # random weights give near-tied heatmap peaks: compare the network's heatmaps, not their argmax
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h_gpu, h_cpu = gpu.net(x.to(CUDA))[-1], cpu.net(x)[-1]
    _close(h_gpu, h_cpu, 1e-3 * float(h_cpu.abs().max()), 1e-2 * float(h_cpu.abs().max()))


def test_flame_fit_raster_and_flows_on_cuda(flame_files):
    from reliableswap.flame.fit import fit_landmarks
    from reliableswap.flame.flow import shape_flow
    from reliableswap.flame.layer import FlameParams, load_flame, project
    from reliableswap.geometry.raster import rasterize_torch

    fl_cpu, fl_gpu = load_flame(flame_files), load_flame(flame_files, device="cuda")
    g = torch.Generator().manual_seed(0)
    p = FlameParams.zeros(6)
    p.shape = torch.randn(6, 100, generator=g)
    p.expression = 0.5 * torch.randn(6, 50, generator=g)
    p.global_pose = 0.2 * torch.randn(6, 3, generator=g)
    p.camera[:, 0] = 5.5
    target = project(fl_cpu.landmarks(p), p.camera, 256)
    _, rmse_gpu = fit_landmarks(fl_gpu, target.to(CUDA), 256)
    _, rmse_cpu = fit_landmarks(fl_cpu, target, 256)
    assert float(rmse_gpu.max()) < 0.2 and float(rmse_cpu.max()) < 0.2
    v = fl_cpu.vertices(p)
    uv = project(v, p.camera, 256)
    p2f_c, bary_c = rasterize_torch(uv, v[..., 2], fl_cpu.faces, (256, 256))
    p2f_g, bary_g = rasterize_torch(uv.to(CUDA), v[..., 2].to(CUDA), fl_gpu.faces, (256, 256))
    assert float((p2f_g.cpu() != p2f_c).float().mean()) < 1e-4  # ties resolved the same way on both devices
    _close(bary_g, bary_c, 1e-5, 1e-3)
    pa, pb = p[:3], p[3:]
    pa_g, pb_g = FlameParams(*[t.to(CUDA) for t in vars(pa).values()]), FlameParams(*[t.to(CUDA) for t in vars(pb).values()])
    f_cpu, f_gpu = shape_flow(fl_cpu, pa, pb, 256), shape_flow(fl_gpu, pa_g, pb_g, 256)
    _close(f_gpu["forward"], f_cpu["forward"], 1e-2, 2.0)
    _close(f_gpu["p12"], f_cpu["p12"], 1e-3, 1e-2)


def test_commands_on_cuda_match_cpu(tmp_path, flame_files):
    """``triplets``, ``fit`` and ``flows`` with ``--device cuda`` write what the CPU run writes."""
    from reliableswap.commands.fit import FitJobConfig, run_fit
    from reliableswap.commands.flows import FlowsConfig, run_flows
    from reliableswap.commands.triplets import run_triplets
    from reliableswap.images import load_rgb
    from triplets.records import ManifestRecord, PairRecord
    from reliableswap.contracts import FlameRecord

    prep = write_synthetic_prep(tmp_path / "prep", 8)
    PairRecord.write(tmp_path / "pairs.jsonl", [PairRecord(a=f"synthetic_0_{i:05d}", b=f"synthetic_0_{i + 4:05d}") for i in range(4)])
    s_gpu = run_triplets(prep, tmp_path / "pairs.jsonl", tmp_path / "gpu", device="cuda", batch=4)
    s_cpu = run_triplets(prep, tmp_path / "pairs.jsonl", tmp_path / "cpu", device="cpu", batch=4)
    assert s_gpu["device"] == "cuda" and s_gpu["counts"]["written"] == s_cpu["counts"]["written"] == 4
    assert s_cpu["details"]["jpeg_encoder"] == "opencv"
    from reliableswap.images import gpu_jpeg_available
    from reliableswap.recipes import TripletRecipe

    outs = ["gpu"]
    if gpu_jpeg_available("cuda"):  # nvJPEG: torchvision on the GPU machine
        nv = TripletRecipe().with_overrides({"output.encoder": "nvjpeg"})
        assert run_triplets(prep, tmp_path / "pairs.jsonl", tmp_path / "nv", nv, device="cuda", batch=4)["details"]["jpeg_encoder"] == "nvjpeg"
        outs.append("nv")
    for out in outs:
        for r in ManifestRecord.read(tmp_path / out / "manifest.jsonl"):
            for name in ("source.jpg", "output_st.jpg", "output_ts.jpg"):
                a = load_rgb(tmp_path / out / r.folder / name).astype(float)
                b = load_rgb(tmp_path / "cpu" / r.folder / name).astype(float)
                assert np.abs(a - b).mean() < 3.0, (out, r.folder, name)
    fit = run_fit(prep, flame_files, FitJobConfig(device="cuda"))
    assert fit["counts"]["written"] == 8 and fit["device"] == "cuda"
    assert all(np.isfinite(r.shape).all() for r in FlameRecord.read(prep / "flame.jsonl"))
    flows = run_flows(prep, tmp_path / "pairs.jsonl", tmp_path / "flows", flame_files, FlowsConfig(device="cuda", batch=4, max_rmse=50))
    assert flows["counts"]["written"] == 4


def _synthetic_triplets(root: Path, n: int = 8) -> Path:
    from reliableswap.images import save_image
    from triplets.layout import FILES

    imgs, _ = synthetic_faces(4 * n, 64, seed=2)
    for i in range(n):
        for j, name in enumerate(FILES.values()):
            save_image(root / f"{i:08d}" / name, imgs[4 * i + j])
    return root


@pytest.mark.parametrize("bf16", [True, False])
def test_finetune_amp_on_cuda(tmp_path, monkeypatch, bf16):
    """AMP on CUDA: bf16 autocast, or fp16 with a gradient scaler (forced where bf16 exists); the
    scaler state is checkpointed and a resumed run continues."""
    from reliableswap.commands.finetune import run_finetune
    from reliableswap.recipes import TrainRecipe, load_recipe

    if not bf16:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    tri = _synthetic_triplets(tmp_path / "tri")
    r = load_recipe(ROOT / "recipes" / "tiny.toml", TrainRecipe).with_overrides({
        "model.swapper": "reliableswap.testing.swappers:TinySwapper", "model.value_range": [-1.0, 1.0],
        "data.holdout": 0, "data.vanilla_rate": 0.0, "train.steps": 4, "train.ckpt_every": 2, "train.amp": True})
    s = run_finetune(r, tri, tmp_path / "run", device="cuda")
    assert s["details"]["amp"] == ("bfloat16" if bf16 else "float16") and s["details"]["steps"] == 4
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-0000004.state.pt", weights_only=True)
    assert (state["scaler"] is None) == bf16
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["loss"]) for m in logs if "loss" in m)
    s = run_finetune(r.with_overrides({"train.steps": 6}), tri, tmp_path / "run", device="cuda", resume=True)
    assert s["details"]["resumed_from"] == 4 and s["details"]["steps"] == 6


def test_torchrun_finetune_with_nccl(tmp_path):
    """One process per GPU under torchrun: the NCCL process group and its all-reduce (NCCL refuses
    two ranks on one device, so one GPU gives one rank; the 2-process path is tested with gloo)."""
    tri = _synthetic_triplets(tmp_path / "tri")
    recipe = tmp_path / "r.toml"
    recipe.write_text((ROOT / "recipes" / "tiny.toml").read_text().replace('swapper = "faceshifter"',
                      'swapper = "reliableswap.testing.swappers:TinySwapper"\nvalue_range = [-1.0, 1.0]')
                      .replace("holdout = 4", "holdout = 0"))
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "RELIABLESWAP_DIST": "always"}
    p = subprocess.run([*torchrun, "--standalone", "--nproc_per_node", "1", "-m", "reliableswap.cli", "finetune",
                        "--recipe", str(recipe), "--triplets", str(tri), "--out", str(tmp_path / "run"), "--steps", "3"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["details"]["world_size"] == 1 and s["details"]["backend"] == "nccl" and s["device"].startswith("cuda")
