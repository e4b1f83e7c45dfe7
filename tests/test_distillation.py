"""The distillation losses (engine.sds.distillation_grad): each against a hand computation with Gaussian data,
each converging on a free image, VSD's copy, every prior running every loss, and switching losses mid-run."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from engine import sds
from engine.config import DISTILLATIONS, LiveParams
from engine.priors.analytic import UNCOND_MEAN, UNCOND_STD, GaussianPrior, linear_alphas_cumprod
from engine.priors.base import SDSContext
from engine.priors.vsd import LoRA

T = 1000
ABAR = linear_alphas_cumprod(T)


def eps_gauss(z, a, mean, var):
    """Hand formula: the exact E[eps | z_t] for data ~ N(mean, var), z_t = sqrt(a) x + sqrt(1 - a) eps."""
    return math.sqrt(1 - a) * (z - math.sqrt(a) * mean) / (a * var + 1 - a)


def draw(seed: int, t: int, shape):
    """The t (fixed by a one-step range) and eps `distillation_grad` draws from a generator of `seed`, replayed."""
    g = torch.Generator().manual_seed(seed)
    assert torch.randint(t, t + 1, (shape[0],), generator=g).eq(t).all()
    return torch.randn(shape, generator=g)


def t_range_at(t: int) -> tuple[float, float]:
    return (t / T, t / T)  # sample_timesteps: U[round(t_min T), max(lo + 1, round(t_max T))) = {t}


# Three Gaussian "branches", as a text-conditioned model would have them: cond, negative prompt, empty prompt
MU_C, MU_U, MU_0 = torch.full((1, 3, 4, 4), 0.8), torch.full((1, 3, 4, 4), 0.3), torch.full((1, 3, 4, 4), 0.5)
VAR_C, VAR_U, VAR_0 = 0.01, 0.09, 0.25


def three_branch_model(x0: torch.Tensor) -> sds.Denoiser:
    data = {"cond": (MU_C, VAR_C), "uncond": (MU_U, VAR_U), "null": (MU_0, VAR_0)}

    def eps(z, t, branches):
        a = ABAR[t].view(-1, 1, 1, 1)
        return {n: (1 - a).sqrt() * (z - a.sqrt() * data[n][0]) / (a * data[n][1] + 1 - a) for n in branches}

    return sds.Denoiser(x0, ABAR, eps=eps, guide=lambda e, s: e["uncond"] + s * (e["cond"] - e["uncond"]))


def hand_ism(x, eps0, t: int, a_of, null):
    """LucidDreamer's target by hand: x0 (noised to t=0) -> x_s by DDIM inversion in steps <= 200, -> x_t in one."""
    s = max(t - 80, 0)
    z = math.sqrt(a_of(0)) * x + math.sqrt(1 - a_of(0)) * eps0
    n = math.ceil(s / 200)
    for i in range(n):
        ta, tb = s * i // n, s * (i + 1) // n
        e = null(z, a_of(ta))
        z = math.sqrt(a_of(tb)) * (z - math.sqrt(1 - a_of(ta)) * e) / math.sqrt(a_of(ta)) + math.sqrt(1 - a_of(tb)) * e
    target = null(z, a_of(s))
    z_t = math.sqrt(a_of(t)) * (z - math.sqrt(1 - a_of(s)) * target) / math.sqrt(a_of(s)) \
        + math.sqrt(1 - a_of(t)) * target
    return z_t, target


@pytest.mark.parametrize("kind,t", [("sds", 500), ("csd", 500), ("nfsd", 100), ("nfsd", 500), ("ism", 500),
                                    ("ism", 60)])
def test_each_distillation_matches_the_hand_computation(kind, t):
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    scale = 7.5
    grad, info = sds.distillation_grad(kind, three_branch_model(x), guidance_scale=scale, t_range=t_range_at(t),
                                       generator=torch.Generator().manual_seed(2))
    eps = draw(2, t, x.shape)
    a = float(ABAR[t])
    w = 1 - a
    z = math.sqrt(a) * x + math.sqrt(1 - a) * eps
    ec, eu, e0 = eps_gauss(z, a, MU_C, VAR_C), eps_gauss(z, a, MU_U, VAR_U), eps_gauss(z, a, MU_0, VAR_0)
    if kind == "sds":
        want = w * (eu + scale * (ec - eu) - eps)
    elif kind == "csd":
        want = w * scale * (ec - eu)
    elif kind == "nfsd":  # Katzir et al.: delta_D = eps_0 (t < 200) or eps_0 - eps_neg; plus s (eps_c - eps_0)
        want = w * ((e0 if t < 200 else e0 - eu) + scale * (ec - e0))
    else:
        z_t, target = hand_ism(x, eps, t, lambda k: float(ABAR[k]), lambda zz, aa: eps_gauss(zz, aa, MU_0, VAR_0))
        want = w * (eps_gauss(z_t, a, MU_U, VAR_U) + scale * (eps_gauss(z_t, a, MU_C, VAR_C)
                                                            - eps_gauss(z_t, a, MU_U, VAR_U)) - target)
    assert info["t"] == [t]
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)


def gaussian_step(prior, x, kind, t_range, seed, vsd=None):
    ctx = SDSContext(torch.zeros(x.shape[0], 4), distillation=kind, vsd=vsd)
    return prior.sds_grad(x, prior.encode_prompt("x"), ctx, guidance_scale=7.5, t_range=t_range,
                          generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", DISTILLATIONS)
def test_the_gaussian_prior_runs_each_distillation_as_by_hand(kind):
    """The analytic prior ignores guidance (eps_hat = eps_c) and its unconditional model is N(0.5, 0.5^2)."""
    prior = GaussianPrior(std=0.2)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    vsd = prior.vsd_copy() if kind == "vsd" else None
    if vsd is not None:
        with torch.no_grad():
            vsd.delta.mean.add_(0.1)  # a copy that has moved away from the prior
            vsd.delta.log_var.fill_(math.log(0.05))
        m, v = vsd.delta.mean.detach().clone(), math.exp(float(vsd.delta.log_var.detach()))
    t = 500
    grad, _ = gaussian_step(prior, x, kind, t_range_at(t), 4, vsd)
    eps = draw(4, t, x.shape)
    a = float(ABAR[t])
    z = math.sqrt(a) * x + math.sqrt(1 - a) * eps
    ec, eu = eps_gauss(z, a, prior.mean, 0.04), eps_gauss(z, a, UNCOND_MEAN, UNCOND_STD ** 2)
    want = {"sds": lambda: ec - eps, "csd": lambda: ec - eu, "nfsd": lambda: ec - eu,  # no negative: delta_D = 0
            "vsd": lambda: ec - eps_gauss(z, a, m, v)}
    if kind == "ism":
        z_t, target = hand_ism(x, eps, t, lambda k: float(ABAR[k]), null_eps)
        got = eps_gauss(z_t, a, prior.mean, 0.04) - target
    else:
        got = want[kind]()
    torch.testing.assert_close(grad, (1 - a) * got, rtol=1e-4, atol=1e-6)


def null_eps(z, a):
    return eps_gauss(z, a, UNCOND_MEAN, UNCOND_STD ** 2)


def mean_grad(kind: str, prior: GaussianPrior, x: torch.Tensor, t: int) -> torch.Tensor:
    """E_eps[g](x) at timestep t, by hand: g is affine in eps, so its mean is g at eps = 0."""
    a = float(ABAR[t])
    if kind == "ism":
        z_t, target = hand_ism(x, torch.zeros_like(x), t, lambda k: float(ABAR[k]), null_eps)
        return (1 - a) * (eps_gauss(z_t, a, prior.mean, prior.std ** 2) - target)
    z = math.sqrt(a) * x
    ec, eu = eps_gauss(z, a, prior.mean, prior.std ** 2), null_eps(z, a)
    if kind == "nfsd" and t < 200:  # delta_D + (eps_c - eps_0) = eps_c
        return (1 - a) * ec
    return (1 - a) * (ec - eu)


def fixed_point(kind: str, prior: GaussianPrior) -> torch.Tensor:
    """Where E[g] = 0 for a free image: E[g](x) = alpha_t x - beta_t per pixel, so the optimum over the t of the
    range (uniform) is sum_t beta_t / sum_t alpha_t."""
    alpha, beta = torch.zeros_like(prior.mean), torch.zeros_like(prior.mean)
    for t in range(20, 980):
        g0 = mean_grad(kind, prior, torch.zeros_like(prior.mean), t)
        alpha += mean_grad(kind, prior, torch.ones_like(prior.mean), t) - g0
        beta -= g0
    return beta / alpha


@pytest.mark.parametrize("kind", DISTILLATIONS)
def test_each_distillation_converges_on_a_free_image(kind):
    """Adam on a free image (8 draws per step): sds and vsd reach the Gaussian's mean; csd, nfsd and ism reach their
    own optimum, computed by hand (`fixed_point`: the classifier direction overshoots the mean, away from the
    unconditional). The iterates stay noisy, so where they settle is their mean over the last 200 steps."""
    prior = GaussianPrior(std=0.05)
    target = prior.mean[None] if kind in ("sds", "vsd") else fixed_point(kind, prior)[None]
    x = torch.nn.Parameter(torch.full((1, 3, 16, 16), 0.5))
    opt = torch.optim.Adam([x], lr=0.03)
    vsd = prior.vsd_copy() if kind == "vsd" else None
    gen = torch.Generator().manual_seed(0)
    start, settled = (x.detach() - target).abs().mean(), torch.zeros_like(x)
    for i in range(600):
        batch = x.expand(8, -1, -1, -1)
        ctx = SDSContext(torch.zeros(8, 4), distillation=kind, vsd=vsd)
        grad, _ = prior.sds_grad(batch.detach(), prior.encode_prompt("x"), ctx, guidance_scale=7.5,
                                 t_range=(0.02, 0.98), generator=gen)
        opt.zero_grad()
        sds.sds_loss(batch, grad / 8).backward()
        opt.step()
        if i >= 400:
            settled += x.detach() / 200
    err = (settled - target).abs().mean()
    assert err < 0.03 < start, (float(err), float(start))


def test_the_vsd_copy_of_the_gaussian_fits_the_renders():
    """Its diffusion loss falls, its mean moves to the render, and it has C*H*W + 1 parameters."""
    prior = GaussianPrior(std=0.05)
    vsd = prior.vsd_copy()
    assert vsd.parameter_count() == 3 * 16 * 16 + 1
    x = torch.full((2, 3, 16, 16), 0.2)
    before = vsd.delta.mean.detach().clone()
    losses = [gaussian_step(prior, x, "vsd", (0.3, 0.7), i, vsd)[1]["vsd_loss"] for i in range(300)]
    assert statistics.median(losses[-30:]) < 0.5 * statistics.median(losses[:30])
    assert (vsd.delta.mean.detach() - 0.2).abs().mean() < 0.5 * (before - 0.2).abs().mean()


def test_the_oracle_refuses_vsd_in_one_sentence():
    from engine.priors.analytic import OraclePrior

    prior = OraclePrior("cube")
    with pytest.raises(ValueError, match="oracle prior cannot run vsd"):
        prior.vsd_copy()
    with pytest.raises(ValueError, match="cannot run distillation 'vsd'; it supports sds, csd, nfsd, ism"):
        prior.sds_grad(torch.rand(1, 3, 8, 8), prior.encode_prompt("a red cube"),
                       SDSContext(torch.zeros(1, 4), cameras=object(), light=object(), distillation="vsd"),
                       guidance_scale=1.0, t_range=(0.02, 0.98), generator=torch.Generator())


def test_live_distillation_is_validated_with_the_choices():
    assert LiveParams().distillation == "sds"
    assert LiveParams().replace(distillation="ism").distillation == "ism"
    with pytest.raises(ValueError, match="distillation must be one of 'sds', 'csd', 'nfsd', 'ism', 'vsd'; got 'sjc'"):
        LiveParams().replace(distillation="sjc")


# -- the U-Net priors ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_priors(tmp_path_factory):
    from engine.priors import PriorOptions, load_prior
    from engine.testing import write_tiny_if, write_tiny_sd

    root = tmp_path_factory.mktemp("distill")
    sd, deepfloyd = write_tiny_sd(str(root / "sd")), write_tiny_if(str(root / "if"))
    return {"sd": load_prior(f"sd:{sd}", vae_resolution=32), "if": load_prior(f"if:{deepfloyd}"),
            "sd_perp": load_prior(f"sd:{sd}", vae_resolution=32, options=PriorOptions(perp_neg=True)),
            "if_fp16": load_prior(f"if:{deepfloyd}", options=PriorOptions(fp16=True, perp_neg=True))}


def unet_step(prior, kind, negative="", vsd=None, seed=0):
    from engine.cameras import fixed_views

    cams = fixed_views([30.0, 200.0], [10.0, 10.0])
    ctx = SDSContext(view_weights=cams.view_weights(), cameras=cams, distillation=kind, vsd=vsd)
    images = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    return prior.sds_grad(images, prior.encode_prompt("a red cube", negative), ctx, guidance_scale=7.5,
                          t_range=(0.02, 0.98), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", ["sd", "if", "sd_perp", "if_fp16"])
def test_the_tiny_sd_and_if_pipelines_run_every_distillation(which, tiny_priors):
    prior = tiny_priors[which]
    grads = {}
    for kind in DISTILLATIONS:
        vsd = prior.vsd_copy() if kind == "vsd" else None
        grad, info = unet_step(prior, kind, negative="ugly blurry" if kind == "nfsd" else "", vsd=vsd)
        assert grad.shape == (2, 3, 24, 24) and torch.isfinite(grad).all() and grad.abs().sum() > 0, kind
        assert len(info["t"]) == 2 and info["unet_batch"] >= 2
        grads[kind] = grad
    for kind in ("csd", "nfsd", "ism", "vsd"):  # same t and eps: each loss is its own
        assert not torch.allclose(grads[kind], grads["sds"]), kind


def test_nfsd_asks_for_the_empty_prompt_only_when_a_negative_prompt_is_set(tiny_priors):
    prior = tiny_priors["sd"]
    assert unet_step(prior, "nfsd")[1]["unet_batch"] == 4  # cond, uncond = empty
    assert unet_step(prior, "nfsd", negative="ugly")[1]["unet_batch"] == 6  # cond, empty, negative
    assert prior.encode_prompt("a red cube", "ugly").null is not None and prior.encode_prompt("a red cube").null is None


def test_the_lora_copy_is_bounded_and_trains(tiny_priors):
    prior = tiny_priors["sd"]
    vsd = prior.vsd_copy()
    lora: LoRA = vsd.delta
    linears = [prior.unet.get_submodule(n) for n in lora.names]
    assert len(linears) >= 4 and all(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n in lora.names)
    assert vsd.parameter_count() == sum(4 * (m.in_features + m.out_features) for m in linears)
    assert vsd.parameter_count() < 0.1 * sum(p.numel() for p in prior.unet.parameters())
    frozen = {k: v.clone() for k, v in prior.unet.state_dict().items()}
    before = [p.detach().clone() for p in lora.parameters()]
    for i in range(3):
        unet_step(prior, "vsd", vsd=vsd, seed=i)
    assert any(not torch.equal(b, p) for b, p in zip(before, lora.parameters(), strict=True))
    assert all(torch.equal(frozen[k], v) for k, v in prior.unet.state_dict().items())  # the prior is untouched


def test_the_embedded_prior_runs_every_distillation_and_its_copy_trains(tiny_embedded_model):
    from engine.priors.embedded import EmbeddedPrior
    from engine.sds import view_weights

    prior = EmbeddedPrior(tiny_embedded_model)
    emb = prior.encode_prompt("a red cube", "blue")
    assert emb.null is not None
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    vw = view_weights(torch.tensor([0.0, 180.0]), torch.tensor([10.0, 10.0]))
    vsd = prior.vsd_copy()
    assert vsd.parameter_count() == sum(p.numel() for p in prior.model.unet.parameters())  # the full copy
    for kind in DISTILLATIONS:
        grad, _ = prior.sds_grad(images, emb, SDSContext(vw, distillation=kind, vsd=vsd), guidance_scale=10.0,
                                 t_range=(0.02, 0.98), generator=torch.Generator().manual_seed(0))
        assert grad.shape == images.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0, kind
    x0 = images * 2 - 1
    losses = []
    for i in range(40):  # the copy's diffusion loss on the same renders falls
        _, info = prior.sds_grad(images, emb, SDSContext(vw, distillation="vsd", vsd=vsd), guidance_scale=10.0,
                                 t_range=(0.5, 0.5), generator=torch.Generator().manual_seed(i))
        losses.append(info["vsd_loss"])
    assert sum(losses[-10:]) < sum(losses[:10]), losses
    assert x0.shape == images.shape


# -- switching mid-run ------------------------------------------------------------------------------------


def test_switching_the_distillation_mid_run_keeps_field_and_optimizer(tiny_config):
    from engine.priors import load_prior
    from engine.trainer import Trainer

    cfg = tiny_config("gaussian")
    live = LiveParams(prompt="x")
    tr = Trainer(cfg, load_prior("gaussian"), "cpu", live)
    field_params = [id(p) for p in tr.field.parameters()]
    steps = []
    for kind in ("sds", "sds", "csd", "vsd", "vsd", "nfsd", "ism", "sds"):
        m = tr.step(live.replace(distillation=kind)).metrics
        assert m["distillation"] == kind and not m["skipped"]
        steps.append(max(int(s["step"]) for s in tr.optimizer.state.values()))
    assert steps == list(range(1, 9))  # Adam's step count carries on across every switch
    assert [id(p) for p in tr.field.parameters()] == field_params
    assert tr.vsd is not None and tr.vsd.parameter_count() == 3 * 16 * 16 + 1  # made once, kept
