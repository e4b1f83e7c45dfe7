"""Shading against the paper's formula; SDS pieces against their definitions; the Gaussian prior."""

import torch

from engine import sds
from engine.config import ShadingConfig
from engine.priors.analytic import GaussianPrior
from engine.priors.base import SDSContext
from engine.shading import pick_shading, shade


def test_lambertian_matches_formula():
    albedo = torch.tensor([[0.5, 0.2, 0.9]])
    normal = torch.tensor([[0.0, 0.0, 1.0]])
    point = torch.tensor([[0.0, 0.0, 0.0]])
    light = torch.tensor([[0.0, 3.0, 3.0]])  # 45 degrees from the normal
    color, amb = torch.tensor([[0.8, 0.8, 0.8]]), torch.tensor([[0.1]])
    got = shade("lambertian", albedo, normal, point, light_pos=light, light_color=color, ambient=amb)
    expected = albedo * (color * (2**-0.5) + 0.1)
    assert torch.allclose(got, expected, atol=1e-6)
    tl = shade("textureless", albedo, normal, point, light_pos=light, light_color=color, ambient=amb)
    assert torch.allclose(tl, torch.ones(1, 3) * (0.8 * 2**-0.5 + 0.1), atol=1e-6)
    lit = {"light_pos": light, "light_color": color, "ambient": amb}
    back = shade("lambertian", albedo, -normal, point, **lit)  # facing away: ambient only
    assert torch.allclose(back, albedo * 0.1, atol=1e-6)
    assert torch.equal(shade("albedo", albedo, normal, point, light_pos=light, light_color=color, ambient=amb), albedo)
    assert torch.allclose(shade("normal", albedo, normal, point, **lit), torch.tensor([[0.5, 0.5, 1.0]]))


def test_random_shading_mix(generator):
    cfg = ShadingConfig(albedo_only_steps=10, p_albedo=0.2, p_lambertian=0.4, p_textureless=0.4)
    assert {pick_shading("random", cfg, s, generator) for s in range(10)} == {"albedo"}
    picks = [pick_shading("random", cfg, 100, generator) for _ in range(4000)]
    frac = {m: picks.count(m) / len(picks) for m in ("albedo", "lambertian", "textureless")}
    assert abs(frac["albedo"] - 0.2) < 0.03 and abs(frac["textureless"] - 0.4) < 0.03
    assert pick_shading("normal", cfg, 100, generator) == "normal"


def test_sds_loss_gradient_is_the_given_gradient():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    g = torch.randn(2, 3, 4, 4)
    sds.sds_loss(x, g).backward()
    assert torch.allclose(x.grad, g, atol=1e-5)


def test_cfg_and_weights_match_definitions():
    eu, ec = torch.randn(5), torch.randn(5)
    assert torch.allclose(sds.classifier_free_guidance(eu, ec, 7.5), eu + 7.5 * (ec - eu))
    assert torch.allclose(sds.classifier_free_guidance(eu, ec, 1.0), ec, atol=1e-6)
    a = torch.tensor([0.9, 0.5, 0.1])
    assert torch.allclose(sds.sds_weight(a), 1 - a)


def test_gaussian_prior_gradient_matches_formula(generator):
    prior = GaussianPrior(std=0.2)
    x = torch.rand(3, 3, 16, 16)
    emb = prior.encode_prompt("anything")
    g1 = torch.Generator().manual_seed(5)
    grad, info = prior.sds_grad(x, emb, SDSContext(torch.zeros(3, 4)), guidance_scale=1.0, t_range=(0.02, 0.98),
                                generator=g1)
    # redo the draw by hand
    g2 = torch.Generator().manual_seed(5)
    t = sds.sample_timesteps(3, 0.02, 0.98, 1000, g2, "cpu")
    eps = torch.randn(x.shape, generator=g2)
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    z = a.sqrt() * x + (1 - a).sqrt() * eps
    eps_hat = (1 - a).sqrt() * (z - a.sqrt() * prior.mean) / (a * 0.04 + 1 - a)
    assert info["t"] == t.tolist()
    assert torch.allclose(grad, (1 - a) * (eps_hat - eps), atol=1e-5)


def test_sds_on_a_free_image_converges_to_the_gaussian_mean(generator):
    prior = GaussianPrior(std=0.05)
    x = torch.nn.Parameter(torch.rand(1, 3, 16, 16))
    opt = torch.optim.Adam([x], lr=0.02)
    emb = prior.encode_prompt("x")
    start = (x.detach() - prior.mean).abs().mean()
    for _ in range(600):
        grad, _ = prior.sds_grad(x.detach(), emb, SDSContext(torch.zeros(1, 4)), guidance_scale=1.0,
                                 t_range=(0.02, 0.98), generator=generator)
        opt.zero_grad()
        sds.sds_loss(x, grad).backward()
        opt.step()
    err = (x.detach() - prior.mean).abs().mean()
    assert err < 0.03 < start
