"""FLAME loading (restricted unpickler), batched LBS and landmark fast path on a synthetic model
written in the exact FLAME file format; parity with the flame-pytorch reference package."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from reliableswap.flame.layer import Flame, FlameParams
from reliableswap.flame.model import FlameFileError, FlameModel, LandmarkEmbedding, UnsafePickleError, contour_bin, safe_load
from reliableswap.testing.flame import write_embeddings, write_model


@pytest.fixture(scope="module")
def flame_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("flame")
    return {"chumpy": write_model(d / "generic_model.pkl"), "numpy": write_model(d / "flame2023.pkl", chumpy=False),
            **write_embeddings(d)}


def _params(b: int, seed: int = 0, dtype=torch.float64) -> FlameParams:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    cam = torch.tensor([[8.0, 0.0, 0.0]], dtype=dtype).repeat(b, 1)
    return FlameParams(r(b, 100), r(b, 50), 0.3 * r(b, 3), 0.1 * r(b, 3), 0.1 * r(b, 3).abs(), 0.1 * r(b, 6), cam)


def test_loads_2020_chumpy_and_2023_numpy_files(flame_files):
    a, b = FlameModel.load(flame_files["chumpy"]), FlameModel.load(flame_files["numpy"])
    assert a.v_template.shape == (5023, 3) and a.faces.shape == (9976, 3) and a.shapedirs.shape == (5023, 3, 400)
    assert a.posedirs.shape == (5023, 3, 36) and a.J_regressor.shape == (5, 5023) and a.weights.shape == (5023, 5)
    assert list(a.parents) == [-1, 0, 1, 1, 1]
    for k in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights"):
        assert np.array_equal(getattr(a, k), getattr(b, k))


def test_refuses_a_pickle_that_would_run_a_command(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "generic_model.pkl"
    bad.write_bytes(pickle.dumps({"v_template": Evil()}, protocol=2))
    with pytest.raises(UnsafePickleError, match="system"):
        FlameModel.load(bad)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError):
        safe_load(pickle.dumps(eval))  # builtins.eval is not admitted
    with pytest.raises(FlameFileError, match="RELIABLESWAP_FLAME"):
        FlameModel.load(None)


def test_vertices_match_flame_pytorch(flame_files):
    """Same parameters, same file: our batched LBS equals the reference package within 1e-5."""
    flame_pytorch = pytest.importorskip("flame_pytorch")

    class Cfg:
        flame_model_path = str(flame_files["numpy"])
        static_landmark_embedding_path = str(flame_files["static"])
        dynamic_landmark_embedding_path = str(flame_files["dynamic"])
        batch_size, shape_params, expression_params = 4, 100, 50
        use_face_contour, use_3D_translation = True, False

    ref = flame_pytorch.FLAME(Cfg())  # float32 (its contour code hard-codes it)
    ours = Flame(FlameModel.load(flame_files["chumpy"]), LandmarkEmbedding.load_ringnet(flame_files["static"], flame_files["dynamic"]))
    p = _params(4, dtype=torch.float32)
    v_ref, l_ref = ref(p.shape, p.expression, torch.cat([p.global_pose, p.jaw], 1), neck_pose=p.neck, eye_pose=p.eyes)
    assert (ours.vertices(p) - v_ref).abs().max() < 1e-5
    # RingNet files + yaw_sign −1 reproduce the reference's contour choice, landmark for landmark
    assert (ours.landmarks(p) - l_ref).abs().max() < 1e-5


def test_landmark_fast_path_equals_full_mesh(flame_files):
    fl = Flame(FlameModel.load(flame_files["chumpy"]), LandmarkEmbedding.load_deca(flame_files["deca"]), dtype=torch.float64)
    p = _params(8, seed=1)
    assert fl.sub_idx.numel() < 1000
    assert (fl.landmarks(p) - fl.landmarks_full(p)).abs().max() < 1e-10


def test_contour_bin_convention():
    yaw = torch.tensor([0.0, 10.0, 39.0, 60.0, -10.0, -39.0, -60.0])
    assert contour_bin(yaw, 1).tolist() == [0, 10, 39, 39, 49, 78, 78]
    assert contour_bin(-yaw, -1).tolist() == contour_bin(yaw, 1).tolist()


def test_fit_recovers_landmarks_of_known_parameters(flame_files):
    """Synthetic landmarks from known parameters at 256 px, default priors: RMSE < 0.1 px
    noise-free; with 1 px noise the fit stays within 1.5 px of the clean landmarks on average."""
    from reliableswap.flame.fit import fit_landmarks
    from reliableswap.flame.layer import project

    fl = Flame(FlameModel.load(flame_files["numpy"]), LandmarkEmbedding.load_deca(flame_files["deca"])).double()
    g = torch.Generator().manual_seed(0)
    b = 8
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    gt = FlameParams(r(b, 100), r(b, 50), torch.stack([0.15 * r(b), 0.3 * r(b).clamp(-1.5, 1.5), 0.05 * r(b)], -1),
                     torch.zeros(b, 3, dtype=torch.float64), torch.stack([0.15 * r(b).abs(), torch.zeros(b), torch.zeros(b)], -1),
                     torch.zeros(b, 6, dtype=torch.float64), torch.stack([7 + r(b).abs(), 0.01 * r(b), 0.01 * r(b)], -1))
    lm = project(fl.landmarks(gt), gt.camera, 256)
    _, rmse = fit_landmarks(fl, lm, 256)
    assert float(rmse.mean()) < 0.1, rmse
    p, _ = fit_landmarks(fl, lm + r(*lm.shape), 256)
    clean = (project(fl.landmarks(p), p.camera, 256) - lm).pow(2).sum(-1).mean(-1).sqrt()
    assert float(clean.mean()) < 1.5, clean


def test_analytic_fit_jacobians_match_autodiff(flame_files):
    """The fit's analytic Jacobians (coefficients: exact via cached directions; global pose: SO(3)
    left Jacobian; jaw: forward mode) equal torch.func.jacrev of the landmark function (float64)."""
    from torch.func import jacrev

    from reliableswap.flame.fit import _Problem

    fl = Flame(FlameModel.load(flame_files["numpy"]), LandmarkEmbedding.load_deca(flame_files["deca"]), dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    b, ns, ne = 3, 20, 10
    x = torch.randn(b, ns + ne, generator=g, dtype=torch.float64)
    q6 = 0.3 * torch.randn(b, 6, generator=g, dtype=torch.float64)
    prob = _Problem(fl, ns)
    rows = fl.contour_rows(torch.cat([q6[:, :3], torch.zeros(b, 3, dtype=torch.float64), q6[:, 3:], torch.zeros(b, 6, dtype=torch.float64)], 1))
    faces, bary = fl.landmark_faces_at(rows, b)
    jc = torch.empty(b, 68, 3, ns + ne, dtype=torch.float64)
    prob.coef_jacobian(x, q6, rows, jc)
    jp = torch.empty(b, 68, 3, 6, dtype=torch.float64)
    lm = prob.pose_jacobian(x, q6, faces, bary, jp)
    assert torch.allclose(lm, prob.landmarks(x, q6, faces, bary))
    for i in range(b):
        f = lambda xi, qi: prob.landmarks(xi[None], qi[None], faces[i:i + 1], bary[i:i + 1])[0]  # noqa: E731
        ax, aq = jacrev(f, argnums=(0, 1))(x[i], q6[i])
        assert torch.allclose(jc[i], ax, atol=1e-9), (jc[i] - ax).abs().max()
        assert torch.allclose(jp[i], aq, atol=1e-9), (jp[i] - aq).abs().max()


# -- rasterizer and dense flows ---------------------------------------------------------------

def test_torch_rasterizer_coverage_and_depth_order():
    from reliableswap.geometry.raster import rasterize_torch

    # a square of two triangles at depth 0 and a nearer triangle over its left half
    uv = torch.tensor([[[2.0, 2.0], [12.0, 2.0], [12.0, 12.0], [2.0, 12.0], [0.0, 0.0], [7.0, 0.0], [0.0, 15.0]]])
    depth = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6]])
    p2f, bary = rasterize_torch(uv, depth, faces, (16, 16))
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    in_square = (xs >= 2) & (xs <= 12) & (ys >= 2) & (ys <= 12)
    in_front = 15 * xs + 7 * ys <= 105  # the near triangle (0,0)-(7,0)-(0,15)
    assert torch.equal(p2f[0] >= 0, in_square | in_front)
    assert (p2f[0][in_front] == 2).all()
    assert ((p2f[0][in_square & ~in_front] == 0) | (p2f[0][in_square & ~in_front] == 1)).all()
    # barycentrics reproduce the pixel position
    pos = (bary[0].unsqueeze(-1) * uv[0][faces[p2f[0].clamp_min(0)]]).sum(-2)
    cov = p2f[0] >= 0
    assert torch.allclose(pos[cov], torch.stack([xs, ys], -1)[cov], atol=1e-4)


def _random_params(b, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    p = FlameParams.zeros(b, dtype=dtype)
    p.shape = torch.randn(b, 100, generator=g, dtype=dtype)
    p.expression = 0.5 * torch.randn(b, 50, generator=g, dtype=dtype)
    p.global_pose = 0.2 * torch.randn(b, 3, generator=g, dtype=dtype)
    p.jaw[:, 0] = 0.1 * torch.rand(b, generator=g, dtype=dtype)
    p.camera[:, 0] = 5.5  # the head covers about half of the image, as in aligned crops
    return p


def _sample(field, pts, size):
    from reliableswap.geometry.grid import sample_at

    return sample_at(field, pts)


def test_shape_flow_invariants(flame_files):
    from dataclasses import replace

    from reliableswap.flame.flow import correspondence_flow, reenact_map, shape_flow
    from reliableswap.flame.layer import project

    fl = Flame(FlameModel.load(flame_files["numpy"]), LandmarkEmbedding.load_deca(flame_files["deca"]))
    pa, pb = _random_params(3, 1), _random_params(3, 2)
    # identical parameters: exactly zero flow
    same = shape_flow(fl, pb, pb, 256)
    assert same["forward"].abs().max() == 0 and same["backward"].abs().max() == 0
    # pure camera translation: constant flow on the face, s·S/2·(tx, −ty) pixels
    v = fl.vertices(pb)
    moved = replace(pb, camera=pb.camera + torch.tensor([0.0, 0.01, -0.02]))
    flow, cov = correspondence_flow(project(v, pb.camera, 256), v[..., 2], project(v, moved.camera, 256), fl.faces, 256)
    on_face = flow.permute(0, 2, 3, 1)[cov[:, 0]]
    assert cov.float().mean() > 0.2
    assert torch.allclose(on_face, torch.tensor([5.5 * 128 * 0.01, 5.5 * 128 * 0.02]), atol=1e-3)
    # warping P2 (contour landmarks of M2) by the forward flow lands on P12, and back
    out = shape_flow(fl, pa, pb, 256)
    p2, p12 = out["p2"][:, :17], out["p12"][:, :17]
    assert (p12 - p2).norm(dim=-1).mean() > 2  # the shapes do differ
    assert (p2 + _sample(out["forward"], p2, 256) - p12).norm(dim=-1).max() < 0.5
    assert (p12 + _sample(out["backward"], p12, 256) - p2).norm(dim=-1).max() < 0.5
    # the triplet path's single M12 rasterization gives the same reshape and reenactment warps
    both = shape_flow(fl, pa, pb, 256, forward=False, reenact=True)
    assert "forward" not in both and torch.allclose(both["backward"], out["backward"], atol=1e-4)
    assert torch.allclose(both["reenact"], reenact_map(fl, pa, pb, 256)["backward"], atol=1e-4)
    # extended smoothly: finite everywhere, fading to zero at the image border, no seam at the
    # coverage edge (neighbouring pixels differ by a fraction of the contour shift)
    f = out["forward"]
    assert torch.isfinite(f).all()
    assert f[..., 0, :].abs().max() < 0.5 * f.abs().max()
    jump = (f[..., 1:, :] - f[..., :-1, :]).norm(dim=1)
    assert jump.max() < 0.25 * (p12 - p2).norm(dim=-1).max() + 1


def test_fit_and_flows_commands_on_real_faces(prepped, tmp_path):
    """`fit` and `flows` end to end on the shared real faces with the synthetic FLAME-format model
    (no real FLAME file exists here): parameters stored per face, npz flows, previews, resume."""
    import shutil

    import numpy as np

    from reliableswap.commands.fit import run_fit
    from reliableswap.commands.flows import FlowsConfig, run_flows
    from reliableswap.pairs import make_pairs
    from reliableswap.recipes import PairsSection
    from triplets.records import FlowRecord, PairRecord
    from reliableswap.contracts import FaceSet

    src, _ = prepped
    d = tmp_path / "prep"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns(".prep"))
    (tmp_path / "flame").mkdir()
    model = write_model(tmp_path / "flame" / "generic_model.pkl")
    write_embeddings(tmp_path / "flame")
    faces_before = (d / "faces.jsonl").read_bytes()
    s = run_fit(d, str(model))
    assert s["counts"]["in"] == s["counts"]["written"] + s["counts"]["rejected"] >= 20
    assert (d / "faces.jsonl").read_bytes() == faces_before  # fit writes flame.jsonl, never faces.jsonl
    fs = FaceSet.load(d)
    fitted = [f for f in fs if f.id in fs.flame]
    assert len(fitted) >= 0.9 * len(fs)
    assert all(len(fs.flame[f.id].shape) == 100 and len(fs.flame[f.id].camera) == 3 for f in fitted)
    assert s["details"]["rmse_px"]["median"] < 5.0  # a synthetic head on real landmarks: the fit is rough but sane
    pairs = make_pairs(fitted, PairsSection(n=6, strategy="random", max_yaw_diff=90.0))
    PairRecord.write(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "flows"
    s = run_flows(d, tmp_path / "pairs.jsonl", out, str(model), FlowsConfig(batch=4))
    assert s["counts"]["written"] == len(pairs) == 6 and s["details"]["rasterizer"] in ("torch", "pytorch3d")
    man = FlowRecord.read(out / "manifest.jsonl")
    with np.load(out / man[0].flow) as z:
        assert z["forward"].dtype == np.float16 and z["forward"].shape == (256, 256, 2)
        assert z["backward"].shape == (256, 256, 2) and z["mask2"].any()
    assert (out / man[0].preview).stat().st_size > 1000
    again = run_flows(d, tmp_path / "pairs.jsonl", out, str(model), FlowsConfig(batch=4))
    assert again["counts"]["written"] == 6 and again["counts"]["written_this_run"] == 0


def test_fit_without_a_model_names_what_it_needs(monkeypatch, tmp_path):
    from reliableswap.flame.layer import load_flame

    monkeypatch.delenv("RELIABLESWAP_FLAME", raising=False)
    with pytest.raises(FlameFileError, match="RELIABLESWAP_FLAME"):
        load_flame(None)
    model = write_model(tmp_path / "generic_model.pkl")
    with pytest.raises(FlameFileError, match="landmark_embedding.npy"):
        load_flame(model)


def test_flame_triplets_end_to_end(prepped, tmp_path):
    """FLAME-driven triplets on real faces: a pair of one face with itself reproduces the face
    (zero shape flow, identity reenactment map); a FLAME run writes the official layout and says
    its geometry is FLAME in summary.json; the same recipe without a model refuses clearly."""
    from reliableswap.commands.triplets import run_triplets
    from reliableswap.flame.fit import fit_faces
    from reliableswap.flame.layer import load_flame
    from reliableswap.images import load_rgb, to_tensor
    from reliableswap.pairs import make_pairs
    from reliableswap.recipes import PairsSection, TripletRecipe, load_recipe
    from reliableswap.synth.pipeline import Synthesizer
    from triplets.records import PairRecord
    from reliableswap.contracts import FaceSet

    src, _ = prepped
    (tmp_path / "flame").mkdir()
    model = write_model(tmp_path / "flame" / "generic_model.pkl")
    write_embeddings(tmp_path / "flame")
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "flame-cycle.toml", TripletRecipe)
    recipe = recipe.with_overrides({"flame.model": str(model)})
    fl = load_flame(model)
    fs = FaceSet.load(src)
    f0 = fs.faces[0]
    p = FlameParams.from_records(fit_faces(fl, [f0]))
    img = to_tensor([load_rgb(fs.image_path(f0))])
    lm = torch.tensor([f0.landmarks68], dtype=torch.float32)
    out = Synthesizer(recipe, fl).cycle(img, lm, img, lm, p, p)
    assert out["flow_st"].abs().max() == 0
    assert (out["fake_st"] - img).abs().mean() < 0.01

    PairRecord.write(tmp_path / "pairs.jsonl", make_pairs(fs.faces, PairsSection(n=4, strategy="random", max_yaw_diff=90.0)))
    s = run_triplets(src, tmp_path / "pairs.jsonl", tmp_path / "tri", recipe, device="cpu", batch=4)
    syn = s["details"]["synthesis"]
    assert s["counts"]["written"] == 4 and syn["geometry"].startswith("FLAME 3D")
    assert syn["reenact"] == "flame" and syn["reshape"] == "flame"
    from triplets.records import ManifestRecord

    for r in ManifestRecord.read(tmp_path / "tri" / "manifest.jsonl"):
        assert all((tmp_path / "tri" / r.folder / f).is_file() for f in r.files.values())
    with pytest.raises(ValueError, match="--flame"):
        Synthesizer(recipe, None)


def test_rerunning_commands_never_loses_another_commands_output(faces_dir, tmp_path):
    """prep writes faces.jsonl, fit writes flame.jsonl: re-running prep (with one more input) keeps
    every fit; re-running fit fits only the new face and leaves faces.jsonl byte for byte."""
    from reliableswap.commands.fit import FitJobConfig, run_fit
    from reliableswap.commands.prep import PrepConfig, run_prep
    from reliableswap.flame.fit import FitConfig
    from reliableswap.contracts import FaceSet

    london = faces_dir / "london_set"
    model = write_model(tmp_path / "generic_model.pkl")
    write_embeddings(tmp_path)
    prep = tmp_path / "prep"
    cfg = PrepConfig(largest=True)
    run_prep([london / "london_008_neutral.jpg", london / "london_021_neutral.jpg"], prep, cfg)
    s = run_fit(prep, model)
    assert s["counts"]["written"] == 2
    flame_before = (prep / "flame.jsonl").read_bytes()
    run_prep([london / "london_008_neutral.jpg", london / "london_021_neutral.jpg", london / "london_030_neutral.jpg"], prep, cfg)
    assert (prep / "flame.jsonl").read_bytes() == flame_before  # prep never touches fit's output
    fs = FaceSet.load(prep)
    assert len(fs) == 3 and len(fs.flame) == 2
    faces_before = (prep / "faces.jsonl").read_bytes()
    s = run_fit(prep, model)
    assert s["counts"]["written_this_run"] == 1 and s["counts"]["skipped"] == 2 and s["counts"]["written"] == 3
    assert (prep / "faces.jsonl").read_bytes() == faces_before  # fit never touches prep's output
    assert len(FaceSet.load(prep).flame) == 3
    with pytest.raises(ValueError, match="other settings"):
        run_fit(prep, model, FitJobConfig(fit=FitConfig(n_shape=50)))
