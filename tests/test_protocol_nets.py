"""The FaceForensics++ protocol's networks written here (CosFace sphere20, HopeNet, Deep3DFaceRecon's
coefficient regressor): their published state-dict layouts (always run), loading through the
weights module with the refusals every learned backend has, and parity with the authors' code on
identical random weights (``RELIABLESWAP_REFERENCES`` with checkouts named ``CosFace_pytorch``
(MuggleWang), ``deep-head-pose`` (natanielruiz) and ``Deep3DFaceRecon_pytorch`` (sicxu))."""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys
import types

import pytest
import torch

from reliableswap.nets import weights as W
from reliableswap.nets.protocol import DEEP3D_EXPRESSION, Deep3DRecon, HopeNet, Sphere20, hopenet_angles
from reliableswap.testing import stub_modules
from reliableswap.testing.nets import randomize, reference_dir

#: torchvision's ResNet-50 has 25,557,032 parameters, 2,049,000 of them in its 1000-class fc.
RESNET50_TRUNK = 25_557_032 - 2_049_000


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_the_published_layouts():
    s = Sphere20().state_dict()
    assert len(s) == 46 and s["fc.weight"].shape == (512, 512 * 7 * 6)
    assert s["layer1.0.weight"].shape == (64, 3, 3, 3) and "layer1.0.bias" in s and s["layer1.1.weight"].shape == (64,)
    assert s["layer3.5.prelu2.weight"].shape == (256,) and "layer3.6.conv1.weight" not in s and "layer1.2.conv1.bias" not in s
    h = HopeNet()
    hs = h.state_dict()
    assert _params(h) == RESNET50_TRUNK + 3 * (2048 * 66 + 66) + (2051 * 3 + 3)
    assert hs["fc_finetune.weight"].shape == (3, 2051) and hs["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert hs["layer2.0.conv2.weight"].shape == (128, 128, 3, 3) and "fc.weight" not in hs
    d = Deep3DRecon()
    ds = d.state_dict()
    assert _params(d) == RESNET50_TRUNK + 2048 * 257 + 257
    assert ds["final_layers.1.weight"].shape == (64, 2048, 1, 1) and "backbone.layer4.2.bn3.running_var" in ds
    assert all(k.startswith(("backbone.", "final_layers.")) for k in ds)


def test_outputs_on_crops_of_any_size():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        assert Sphere20().eval().embed(x).shape == (2, 512)
        a = HopeNet().eval().angles(x)
        assert a.shape == (2, 3) and bool(((a >= -99) & (a <= 99)).all())
        assert Deep3DRecon().eval().expression(x).shape == (2, 64)
    # the bins' expectation: a logit peak on bin 33 reads 0 degrees, on bin 0 −99
    peak = torch.full((1, 66), -1e4)
    peak[0, 33] = 0
    low = torch.full((1, 66), -1e4)
    low[0, 0] = 0
    assert hopenet_angles(peak, peak, low).tolist() == [[0.0, 0.0, -99.0]]
    assert DEEP3D_EXPRESSION == slice(80, 144)


@pytest.mark.parametrize("backend", ["cosface", "hopenet", "deep3d"])
def test_weight_files_load_key_for_key_and_bad_ones_are_refused_in_one_line(backend, tmp_path):
    wf = W.BACKENDS[backend].files[0]
    model = wf.build()
    sd = randomize(model)
    folder = tmp_path / backend
    folder.mkdir()
    torch.save({wf.entry: sd} if wf.entry else sd, folder / wf.name)
    loaded = W.load_module(wf, folder / wf.name)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    assert W.check_backend(backend, tmp_path)[0][1] == "ok"
    # a foreign file: one line naming the file and the first missing key
    torch.save({wf.entry: {"conv.weight": torch.zeros(1)}} if wf.entry else {"conv.weight": torch.zeros(1)}, folder / wf.name)
    with pytest.raises(W.WeightsError) as e:
        W.load_module(wf, folder / wf.name)
    assert "\n" not in str(e.value) and wf.name in str(e.value) and "missing" in str(e.value)
    # pickled code (HopeNet's file is a .pkl): refused, never run
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(folder / wf.name, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(W.WeightsError) as e:
        W.read_checkpoint(folder / wf.name)
    assert "refused" in str(e.value) and "\n" not in str(e.value) and not marker.exists()
    # missing: one line with the address the user fetches from
    (folder / wf.name).unlink()
    with pytest.raises(W.MissingWeightsError, match=f"{wf.name}.*weights fetch {backend}"):
        W.require(backend, tmp_path)


def _load_file(name: str, path, package: str | None = None):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    if package:
        mod.__package__ = package
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(name, None)
    return mod


def _deep3d_networks(checkout):
    """Deep3DFaceRecon_pytorch's ``models/networks.py``; its face-recognition import (an arcface
    submodule, used only by its training loss) stubbed."""
    pkg = types.ModuleType("_ref_d3d")
    pkg.__path__ = [str(checkout / "models")]
    stubs = {"_ref_d3d": pkg, "_ref_d3d.arcface_torch": types.ModuleType("_ref_d3d.arcface_torch"),
             "_ref_d3d.arcface_torch.backbones": types.SimpleNamespace(get_model=None)}
    with stub_modules(stubs):
        return _load_file("_ref_d3d.networks", checkout / "models" / "networks.py", "_ref_d3d")


def _same(ref: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor, tol: float = 1e-4):
    sd = randomize(ref)
    W.check_state(sd, ours, "reference")
    ours.load_state_dict(sd)
    ref.eval(), ours.eval()
    with torch.no_grad():
        a, b = ref(x), ours(x)
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        err = float((u.reshape(v.shape) - v).abs().max()) / max(1.0, float(u.abs().max()))
        assert err <= tol, err


def test_sphere20_equals_cosface_pytorch():
    checkout = reference_dir("CosFace_pytorch")
    if checkout is None:
        pytest.skip("reference checkout CosFace_pytorch not found (set RELIABLESWAP_REFERENCES)")
    torch.manual_seed(0)
    ref = _load_file("_ref_cosface_net", checkout / "net.py").sphere(type=20)
    _same(ref, Sphere20(), torch.randn(2, 3, 112, 96))


def test_deep3d_equals_deep3dfacerecon():
    checkout = reference_dir("Deep3DFaceRecon_pytorch")
    if checkout is None:
        pytest.skip("reference checkout Deep3DFaceRecon_pytorch not found (set RELIABLESWAP_REFERENCES)")
    torch.manual_seed(0)
    net = _deep3d_networks(checkout)
    _same(net.ReconNetWrapper("resnet50", use_last_fc=False), Deep3DRecon(), torch.rand(2, 3, 224, 224))


def test_hopenet_equals_deep_head_pose():
    """The authors' Hopenet with the ResNet bottleneck its users pass (torchvision's; here the
    identical copy Deep3DFaceRecon_pytorch carries when torchvision is not installed)."""
    checkout = reference_dir("deep-head-pose")
    if checkout is None:
        pytest.skip("reference checkout deep-head-pose not found (set RELIABLESWAP_REFERENCES)")
    try:
        from torchvision.models.resnet import Bottleneck
    except ImportError:
        d3d = reference_dir("Deep3DFaceRecon_pytorch")
        if d3d is None:
            pytest.skip("neither torchvision nor the Deep3DFaceRecon_pytorch checkout for the ResNet bottleneck")
        Bottleneck = _deep3d_networks(d3d).Bottleneck
    torch.manual_seed(0)
    ref = _load_file("_ref_hopenet", checkout / "code" / "hopenet.py").Hopenet(Bottleneck, [3, 4, 6, 3], 66)
    _same(ref, HopeNet(), torch.randn(2, 3, 224, 224))
