"""The CUDA paths: nerfacc's occupancy-grid sampling with packed compositing, and training on the GPU with
each prior kind that runs without downloads. Skipped without a CUDA GPU (this project's CI has none;
`tests/test_priors_diffusers.py::test_fp16_on_cuda` covers the fp16 diffusers priors)."""

from __future__ import annotations

import math

import pytest
import torch

from engine import accel
from engine.cameras import fixed_views, make_light
from engine.config import BackgroundConfig, CameraConfig, Config, LiveParams, RenderConfig
from engine.field import Background
from engine.priors import load_prior
from engine.priors.analytic import AnalyticField
from engine.render import OccupancyGrid, render
from engine.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_packed_occupancy_sampling_matches_the_batched_renderer():
    field = AnalyticField("torus", (0.2, 0.5, 0.9), sigma_max=80.0, eps=0.02).cuda()
    cams = fixed_views([0.0, 120.0], [10.0, 50.0], distance=2.5).to("cuda")
    light = make_light(cams, LiveParams(light_mode="camera"), CameraConfig(), None)
    bg = Background(BackgroundConfig(kind="solid", color=(1.0, 1.0, 1.0))).cuda()
    occ = OccupancyGrid(1.0, 64, "cuda")
    occ.estimator.update_every_n_steps(0, occ_eval_fn=lambda x: field.query_density(x) * (2 / 64) * math.sqrt(3),
                                       occ_thre=1e-3, n=1, warmup_steps=1)
    cfg = RenderConfig(num_samples=256, render_step_size=0.005)
    with torch.no_grad():
        batched = render(field, bg, cams, 48, 48, shading="lambertian", light=light, cfg=cfg, occupancy=occ)
        if not accel.load_kernels():
            pytest.skip(f"nerfacc's CUDA kernels are not built ({accel.kernels_status()['detail']})")
        packed = render(field, bg, cams, 48, 48, shading="lambertian", light=light, cfg=cfg, occupancy=occ,
                        packed=True)
    assert packed.rgb.is_cuda and torch.isfinite(packed.rgb).all()
    assert 0.05 < packed.opacity.mean() < 0.8  # the torus is in frame
    assert (packed.opacity - batched.opacity).abs().mean() < 0.02
    assert (packed.rgb - batched.rgb).abs().mean() < 0.02


@pytest.mark.parametrize("spec", ["oracle:cube", "embedded"])
def test_training_on_cuda(spec):
    cfg = Config(prior=spec, seed=0).with_settings({"render.resolution": 32, "render.occupancy_warmup": 4,
                                                    "render.occupancy_every": 2})
    prior = load_prior(spec, device="cuda")
    trainer = Trainer(cfg, prior, device="cuda")
    live = LiveParams(prompt="a red cube")
    metrics = [trainer.step(live).metrics for _ in range(8)]
    assert trainer.packed == accel.load_kernels()  # nerfacc's sampler exactly when its kernels are built
    assert all(math.isfinite(m["loss"]) for m in metrics) and not any(m["skipped"] for m in metrics)
    assert all(p.is_cuda for p in trainer.field.parameters())
    assert metrics[-1]["samples"] > 0
    image = trainer.render_views(fixed_views([30.0], [20.0]), 32, 32).rgb
    assert image.is_cuda and torch.isfinite(image).all()


def test_the_torch_renderer_trains_on_cuda_without_nerfacc_kernels(monkeypatch):
    """A CUDA machine without a compiler: the pure-torch occupancy path trains, nothing is built."""
    monkeypatch.setattr(accel, "load_kernels", lambda: False)
    cfg = Config(prior="oracle:cube", seed=0).with_settings({"render.resolution": 32, "render.occupancy_warmup": 2,
                                                             "render.occupancy_every": 2})
    trainer = Trainer(cfg, load_prior("oracle:cube", device="cuda"), device="cuda")
    metrics = [trainer.step(LiveParams(prompt="a red cube")).metrics for _ in range(6)]
    assert not trainer.packed and all(math.isfinite(m["loss"]) for m in metrics) and metrics[-1]["samples"] > 0
