"""Every GPU figure in one run, each beside its CPU (or OpenCV) peer measured in the same run.

1. ``triplets`` at 256 px without QC, I/O included (decode crops, synthesize, encode 4 JPEGs, write
   the folders), against the I/O floor (the same decode + encode + write, no synthesis) with the
   same threads, the synthesis alone on preloaded batches, and the CPU on a subset;
2. multi-band blending, batch 32 at 256 px, 6 levels: ours on the GPU against OpenCV's
   ``detail_MultiBandBlender`` on the CPU (every core);
3. FLAME fit (synthetic FLAME-format model, 5 iterations) and dense shape flows, GPU and CPU;
4. fine-tuning steps/s under AMP (bf16): ``recipes/faceshifter.toml``'s AEI-Net at 256 px with a
   randomly initialised ArcFace r50 as identity model, and ``recipes/tiny.toml``'s.

Usage: ``python scripts/bench_gpu.py [--prep PREP] [--pairs 4096] [--batch 256] [--json OUT.json] [--profile]``
(``--prep``: a prep folder of 256 px crops; without it, synthetic faces from
``reliableswap.testing.faces``.) Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import best, sync  # noqa: E402
from bench_triplets import blend_bench  # noqa: E402

from reliableswap.commands.finetune import run_finetune  # noqa: E402
from reliableswap.commands.triplets import CropCache, io_threads, run_triplets  # noqa: E402
from reliableswap.flame.fit import FitConfig, fit_landmarks  # noqa: E402
from reliableswap.flame.flow import shape_flow  # noqa: E402
from reliableswap.flame.layer import FlameParams, load_flame, project  # noqa: E402
from reliableswap.images import encode_image, encode_jpegs, gpu_jpeg_available, load_rgb, to_tensor  # noqa: E402
from reliableswap.recipes import TrainRecipe, TripletRecipe, load_recipe  # noqa: E402
from reliableswap.synth.pipeline import Synthesizer  # noqa: E402
from reliableswap.testing.faces import write_synthetic_prep  # noqa: E402
from reliableswap.testing.flame import write_embeddings, write_model  # noqa: E402
from reliableswap.train.arcface import DEPTHS, IResNet  # noqa: E402
from triplets.records import PairRecord  # noqa: E402
from reliableswap.contracts import FaceSet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, reps: int = 3) -> float:
    return best(fn, reps, warmup=True)


def random_pairs(faces: FaceSet, n: int, seed: int = 0) -> list[PairRecord]:
    rng = np.random.default_rng(seed)
    ids = [f.id for f in faces]
    out = []
    while len(out) < n:
        a, b = rng.choice(len(ids), 2, replace=False)
        out.append(PairRecord(a=ids[a], b=ids[b]))
    return out


def io_floor(faces: FaceSet, pairs: list[PairRecord], out: Path, threads: int, cached: bool, gpu: str | None) -> float:
    """Seconds to produce each triplet folder without synthesis: the two real faces' JPEGs and two
    fresh JPEG encodes (the fakes' stand-ins) written as a folder. ``cached``: with the pipeline's
    crop cache (decoded crops and real-face JPEG bytes kept per face id); ``gpu``: the two fresh
    encodes batched on nvJPEG — the pipeline's own machinery, so this is its floor."""
    cache = CropCache(faces)
    crop = cache if cached else (lambda fid: load_rgb(faces.image_path(faces[fid])))
    jpeg = cache.jpeg if cached else (lambda fid: encode_image(crop(fid), ".jpg", 95))

    def write(i: int, blobs: list[bytes]) -> None:
        d = out / f"{i:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for name, b in zip(("source", "target", "output_st", "output_ts"), blobs):
            (d / f"{name}.jpg").write_bytes(b)

    def one(i_p):
        i, p = i_p
        write(i, [jpeg(p.a), jpeg(p.b), encode_image(crop(p.b), ".jpg", 95), encode_image(crop(p.a), ".jpg", 95)])

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        if gpu is None or not gpu_jpeg_available(gpu):
            list(ex.map(one, enumerate(pairs)))
        else:
            for s in range(0, len(pairs), 512):
                part = list(enumerate(pairs[s:s + 512], s))
                ab = list(ex.map(lambda ip: (crop(ip[1].a), crop(ip[1].b)), part))
                stack = torch.from_numpy(np.stack([x for a, b in ab for x in (b, a)])).to(gpu).permute(0, 3, 1, 2)
                blobs = encode_jpegs(stack, 95)
                list(ex.map(lambda j: write(part[j][0], [jpeg(part[j][1].a), jpeg(part[j][1].b), *blobs[2 * j:2 * j + 2]]),
                            range(len(part))))
    return time.perf_counter() - t


def io_parts(faces: FaceSet, pairs: list[PairRecord], work: Path, threads: int, dev: str, n: int = 1024) -> dict:
    """Triplets/s each I/O piece alone could sustain: decoding the two crops (PNG, OpenCV),
    encoding the four JPEGs (OpenCV on every core, or nvJPEG batched), writing the folder."""
    pairs = pairs[:n]
    n = len(pairs)
    paths = [faces.image_path(faces[x]) for p in pairs for x in (p.a, p.b)]
    with ThreadPoolExecutor(threads) as ex:
        t = time.perf_counter()
        crops = list(ex.map(load_rgb, paths))
        t_dec = time.perf_counter() - t
        imgs = (crops * 2)[:4 * n]
        t = time.perf_counter()
        blobs = list(ex.map(lambda im: encode_image(im, ".jpg", 95), imgs))
        t_enc = time.perf_counter() - t

        def write(i):
            d = work / "io_parts" / f"{i:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for j in range(4):
                (d / f"{j}.jpg").write_bytes(blobs[4 * i + j])

        t = time.perf_counter()
        list(ex.map(write, range(n)))
        t_wr = time.perf_counter() - t
    res = {"decode_2_png_per_s": round(n / t_dec, 1), "encode_4_jpeg_opencv_per_s": round(n / t_enc, 1),
           "write_folder_per_s": round(n / t_wr, 1), "mean_jpeg_bytes": int(np.mean([len(b) for b in blobs]))}
    if gpu_jpeg_available(dev):
        stack = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous().to(dev)
        t = timed(lambda: encode_jpegs(stack, 95), reps=2)
        res["encode_4_jpeg_nvjpeg_per_s"] = round(n / t, 1)
    return res


def bench_triplets(prep: Path, work: Path, n: int, batch: int, profile: bool, gpu: str) -> dict:
    faces = FaceSet.load(prep)
    pairs = random_pairs(faces, n)
    PairRecord.write(work / "pairs.jsonl", pairs)
    res: dict = {"pairs": n, "batch": batch, "faces": len(faces), "io_threads": io_threads()}
    runs = [(gpu, n, "folder", "auto"), ("cpu", min(n, 128), "folder", "auto")]
    if gpu != "cpu":
        runs += [(gpu, n, "folder", "nvjpeg"), (gpu, n, "webdataset", "opencv"), (gpu, n, "webdataset", "nvjpeg")]
    for dev, sub, fmt, enc in runs:
        if enc == "nvjpeg" and not gpu_jpeg_available(dev):
            continue
        PairRecord.write(work / f"pairs_{dev}.jsonl", pairs[:sub])
        name = f"triplets_{dev}" + ("" if (fmt, enc) == ("folder", "auto") else f"_{fmt}_{enc}")
        out = work / (f"tri_{dev}" if (fmt, enc) == ("folder", "auto") else name)
        shutil.rmtree(out, ignore_errors=True)
        recipe = TripletRecipe().with_overrides({"output.format": fmt, "output.encoder": enc, "output.shard_size": 1024})
        t = time.perf_counter()
        s = run_triplets(prep, work / f"pairs_{dev}.jsonl", out, recipe, device=dev, batch=batch if dev == gpu else 16)
        res[name] = {"pairs": sub, "per_s": s["throughput"]["per_s"], "wall_incl_setup_s": round(time.perf_counter() - t, 2),
                     "encoder": s["details"]["jpeg_encoder"], "rejected": s["counts"]["rejected_by_reason"],
                     "stages_s": s["timings"]["stages_s"]}
    for name, cached, enc in (("io_floor_per_s", True, None), ("io_floor_nvjpeg_per_s", True, gpu),
                              ("io_floor_uncached_per_s", False, None)):
        shutil.rmtree(work / "io", ignore_errors=True)
        res[name] = round(n / io_floor(faces, pairs, work / "io", io_threads(), cached, enc), 1)
    res["io_parts"] = io_parts(faces, pairs, work, io_threads(), gpu)
    # the synthesis alone on preloaded GPU batches
    ia = to_tensor([load_rgb(faces.image_path(faces[p.a])) for p in pairs[:batch]], gpu)
    ib = to_tensor([load_rgb(faces.image_path(faces[p.b])) for p in pairs[:batch]], gpu)
    la = torch.tensor([faces[p.a].landmarks68 for p in pairs[:batch]], device=gpu)
    lb = torch.tensor([faces[p.b].landmarks68 for p in pairs[:batch]], device=gpu)
    syn = Synthesizer(TripletRecipe())
    t = timed(lambda: syn.cycle(ia, la, ib, lb))
    res["synthesis_only_per_s"] = round(batch / t, 1)
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            syn.cycle(ia, la, ib, lb)
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    return res


def bench_blend(dev: str) -> dict:
    """Ours on the GPU (plain and CUDA-graphed) and on the CPU; OpenCV with its default threads
    and with one thread (the faster of the two is the peer)."""
    gpu = blend_bench(dev, reps=20)
    graphed = blend_bench(dev, reps=20, graphed=True)
    half = blend_bench(dev, reps=20, dtype=torch.float16)  # 16-bit, as OpenCV's CV_16S pyramids
    cpu = blend_bench("cpu")
    cv2.setNumThreads(1)
    one = blend_bench("cpu")
    cv2.setNumThreads(-1)
    ocv = min(gpu["opencv_s"], graphed["opencv_s"], cpu["opencv_s"], one["opencv_s"])
    return {"ours_gpu_s": gpu["ours_s"], "ours_gpu_graphed_s": graphed["ours_s"], "ours_gpu_fp16_s": half["ours_s"],
            "ours_cpu_s": cpu["ours_s"],
            "opencv_default_threads_s": min(gpu["opencv_s"], graphed["opencv_s"], cpu["opencv_s"]), "opencv_1_thread_s": one["opencv_s"],
            "gpu_vs_best_opencv": round(ocv / gpu["ours_s"], 1), "gpu_graphed_vs_best_opencv": round(ocv / graphed["ours_s"], 1),
            "gpu_fp16_vs_best_opencv": round(ocv / half["ours_s"], 1)}


def bench_flame(work: Path, gpu: str, fit_batches: list[int], flow_batches: list[int]) -> dict:
    write_model(work / "m.pkl", chumpy=False)
    write_embeddings(work)
    res = {}
    for dev, batches in ((gpu, fit_batches), ("cpu", (128,))):
        fl = load_flame(work / "m.pkl", device=dev)
        for b in batches:
            g = torch.Generator().manual_seed(0)
            p = FlameParams.zeros(b)
            p.shape, p.expression = torch.randn(b, 100, generator=g), 0.5 * torch.randn(b, 50, generator=g)
            p.global_pose = 0.2 * torch.randn(b, 3, generator=g)
            p.jaw[:, 0] = 0.1 * torch.rand(b, generator=g)
            p.camera[:, 0] = 7 + torch.rand(b, generator=g)
            p = FlameParams(*[t.to(dev) for t in vars(p).values()])
            with torch.no_grad():
                lm = project(fl.landmarks(p), p.camera, 256)
            out: dict = {}

            def run():
                out["rmse"] = fit_landmarks(fl, lm, 256, FitConfig())[1]

            t = timed(run, reps=2)
            res[f"fit_{dev}_b{b}"] = {"faces_per_s": round(b / t, 1), "rmse_mean_px": round(float(out["rmse"].mean()), 4)}
        for b in (flow_batches if dev == gpu else (8,)):
            pa, pb = p[:b], p[b:2 * b]
            t = timed(lambda: shape_flow(fl, pa, pb, 256), reps=2)
            res[f"flows_{dev}_b{b}"] = {"pairs_per_s": round(b / t, 1)}
    return res


def bench_finetune(prep: Path, triplets: Path, work: Path, gpu: str, steps: int) -> dict:
    torch.manual_seed(0)
    net = IResNet(DEPTHS[50])
    torch.save(net.state_dict(), work / "arcface_r50.pth")  # random weights: speed only
    res = {}
    fs = load_recipe(ROOT / "recipes" / "faceshifter.toml", TrainRecipe).with_overrides(
        {"identity.checkpoint": str(work / "arcface_r50.pth"), "train.steps": steps, "train.log_every": 10,
         "train.sample_every": 0, "train.ckpt_every": 40, "data.holdout": 16})
    tiny = load_recipe(ROOT / "recipes" / "tiny.toml", TrainRecipe).with_overrides(
        {"train.steps": 2 * steps, "train.sample_every": 0, "train.ckpt_every": 2 * steps, "identity.kind": "arcface",
         "identity.checkpoint": str(work / "arcface_r50.pth"), "loss.id": 0.0})
    for name, r in (("faceshifter_256", fs), ("tiny_64", tiny)):
        for dev in (gpu,):
            run = work / f"ft_{name}_{dev}"
            shutil.rmtree(run, ignore_errors=True)
            s = run_finetune(r, triplets, run, faces=prep, device=dev)
            d = s["details"]
            res[f"{name}_{dev}"] = {"steps_per_s": s["throughput"]["per_s"], "samples_per_s": d["samples_per_s"],
                                   "amp": d["amp"], "batch": r.data.batch, "cycle_l1": d["eval"]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prep", type=Path)
    ap.add_argument("--pairs", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--only", default="triplets,blend,flame,finetune")
    ap.add_argument("--device", default="cuda", help="cpu only to try the script (small sizes)")
    ap.add_argument("--fit-batches", default="4096,16384,65536")
    ap.add_argument("--flow-batches", default="64,128")
    ap.add_argument("--ft-steps", type=int, default=40)
    a = ap.parse_args()
    assert a.device == "cpu" or torch.cuda.is_available(), "needs a CUDA device"
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    prep = a.prep or write_synthetic_prep(work / "prep", 64)
    gpu_name = torch.cuda.get_device_name() if a.device != "cpu" else "no GPU"
    res: dict = {"machine": f"{gpu_name}, {os.cpu_count()} CPU cores, {platform.machine()}, "
                            f"torch {torch.__version__}, CUDA {torch.version.cuda}", "prep": str(prep)}
    only = set(a.only.split(","))
    for name, fn in (("triplets", lambda: bench_triplets(prep, work, a.pairs, a.batch, a.profile, a.device)),
                     ("blend", lambda: bench_blend(a.device)),
                     ("flame", lambda: bench_flame(work, a.device, ints(a.fit_batches), ints(a.flow_batches))),
                     ("finetune", lambda: bench_finetune(prep, work / f"tri_{a.device}", work, a.device, a.ft_steps))):
        if name in only:
            t = time.perf_counter()
            res[name] = fn()
            res[name]["bench_wall_s"] = round(time.perf_counter() - t, 1)
            print(json.dumps({name: res[name]}, indent=1), flush=True)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
