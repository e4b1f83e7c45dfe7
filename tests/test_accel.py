"""nerfacc's CUDA kernels: found, loaded or built only when asked; their failure modes simulated on CPU."""

import sys
import types

import pytest
import torch

from engine import accel
from engine.cameras import fixed_views, make_light
from engine.config import BackgroundConfig, CameraConfig, LiveParams, RenderConfig
from engine.field import Background
from engine.priors.analytic import AnalyticField
from engine.render import OccupancyGrid, render


def test_status_on_a_machine_without_cuda_says_the_torch_renderer_is_used():
    st = accel.kernels_status()
    assert st["cuda"] is torch.cuda.is_available()
    if not st["cuda"]:
        assert "pure-torch" in st["detail"] and accel.load_kernels() is False


def fake_cuda(monkeypatch, tmp_path, built: bool, lock: bool = False):
    """A CUDA machine as nerfacc would see it: torch with CUDA, a JIT build folder, maybe a build in it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(accel, "build_dir", lambda: tmp_path)
    if built:
        (tmp_path / "nerfacc_cuda.so").write_bytes(b"\0")
    if lock:
        (tmp_path / "lock").write_text("")


@pytest.mark.parametrize("error", [AttributeError("'NoneType' object has no attribute 'traverse_grids'"),
                                   ImportError("libcudart.so: cannot open"), RuntimeError("Ninja is required")])
def test_a_broken_build_means_the_torch_renderer_not_a_crash(monkeypatch, tmp_path, error):
    """pip's torch without nvcc leaves nerfacc's `_C` None (every kernel an AttributeError); a build can also
    fail to load. Either way load_kernels says no, once, and nothing is built inside it."""
    fake_cuda(monkeypatch, tmp_path, built=True)

    class Backend(types.ModuleType):
        def __getattr__(self, name):
            raise error

    monkeypatch.setitem(sys.modules, "nerfacc.cuda._backend", Backend("nerfacc.cuda._backend"))
    assert accel.load_kernels() is False


def test_no_kernels_without_a_finished_build_and_a_stale_lock_is_named(monkeypatch, tmp_path):
    fake_cuda(monkeypatch, tmp_path, built=False, lock=True)
    monkeypatch.setattr(accel.shutil, "which", lambda name: "/usr/local/cuda/bin/nvcc")
    imported = []
    monkeypatch.setitem(sys.modules, "nerfacc.cuda._backend", None)  # an import would raise: none may happen
    monkeypatch.setattr(accel.importlib.util, "find_spec", lambda name: imported.append(name))
    st = accel.kernels_status()
    assert not st["built"] and st["lock"] and "build-kernels" in st["detail"] and "lock" in st["detail"]
    assert accel.load_kernels() is False
    (tmp_path / "nerfacc_cuda.so").write_bytes(b"\0")
    sys.modules["nerfacc.cuda._backend"] = types.SimpleNamespace(_C=object())
    assert accel.kernels_status()["built"] and accel.load_kernels() is True


def test_building_needs_cuda_and_nvcc_and_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine could really build")
    with pytest.raises(RuntimeError, match="CUDA"):
        accel.build_kernels()


def test_out_of_memory_in_the_packed_sampler_reaches_the_caller_as_one(monkeypatch):
    """An OOM is not 'nerfacc unavailable': it propagates (the viewer halves its frame on it)."""
    field = AnalyticField("cube", (0.9, 0.2, 0.1))
    occ = OccupancyGrid(1.0, 16)
    occ.estimator.update_every_n_steps(0, occ_eval_fn=lambda x: field.query_density(x), occ_thre=1e-3, n=1,
                                       warmup_steps=1)

    def sampling(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(occ.estimator, "sampling", sampling)
    cams = fixed_views([30.0], [20.0], distance=2.5)
    light = make_light(cams, LiveParams(light_mode="camera"), CameraConfig(), None)
    bg = Background(BackgroundConfig(kind="solid"))
    with torch.no_grad(), pytest.raises(torch.OutOfMemoryError):
        render(field, bg, cams, 8, 8, shading="albedo", light=light, cfg=RenderConfig(), occupancy=occ, packed=True)
    with torch.no_grad():  # and the torch path still renders
        out = render(field, bg, cams, 8, 8, shading="albedo", light=light, cfg=RenderConfig(), occupancy=occ)
    assert out.opacity.max() > 0.5


def test_an_empty_sample_set_from_the_packed_sampler_is_background(monkeypatch):
    field = AnalyticField("cube", (0.9, 0.2, 0.1))
    occ = OccupancyGrid(1.0, 16)
    occ.estimator.binaries.fill_(True)
    empty = torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0)
    monkeypatch.setattr(occ.estimator, "sampling", lambda *a, **k: empty)
    cams = fixed_views([30.0], [20.0], distance=2.5)
    light = make_light(cams, LiveParams(light_mode="camera"), CameraConfig(), None)
    bg = Background(BackgroundConfig(kind="solid", color=(0.2, 0.4, 0.6)))
    with torch.no_grad():
        out = render(field, bg, cams, 8, 8, shading="albedo", light=light, cfg=RenderConfig(), occupancy=occ, packed=True)
    assert out.samples == 0 and out.opacity.abs().max() == 0
    assert torch.allclose(out.rgb[0, :, 0, 0], torch.tensor([0.2, 0.4, 0.6]))


def test_build_kernels_command_refuses_without_cuda_in_one_line(capsys):
    from engine.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("this machine could really build")
    assert main(["build-kernels"]) == 2
    assert capsys.readouterr().err.strip() == "error: building nerfacc's kernels needs torch with CUDA and a CUDA device"
