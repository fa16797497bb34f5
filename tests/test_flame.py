"""FLAME loading (restricted unpickler), batched LBS and landmark fast path on a synthetic model
written in the exact FLAME file format; parity with the flame-pytorch reference package."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from reliableswap.flame.layer import Flame, FlameParams
from reliableswap.flame.model import FlameFileError, FlameModel, LandmarkEmbedding, UnsafePickleError, contour_bin, safe_load
from reliableswap.flame.synthetic import write_embeddings, write_model


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
    """Synthetic landmarks from known parameters at 256 px: RMSE < 0.1 px noise-free (every face);
    with 1 px noise the fit stays within 1.5 px of the clean landmarks on average."""
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
    assert float(rmse.max()) < 0.1, rmse
    p, _ = fit_landmarks(fl, lm + r(*lm.shape), 256)
    clean = (project(fl.landmarks(p), p.camera, 256) - lm).pow(2).sum(-1).mean(-1).sqrt()
    assert float(clean.mean()) < 1.5, clean
