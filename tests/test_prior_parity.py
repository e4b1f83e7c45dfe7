"""Parity of the SD and IF SDS gradients with an independent reference written from the peers' formulas.

The reference below follows threestudio's `compute_grad_sds` (stable-diffusion and deepfloyd-if guidance):
`scheduler.add_noise`, one U-Net call on [cond; uncond], CFG `uncond + s (cond - uncond)`, w(t) = 1 - abar_t,
`grad = w (eps_hat - eps)`, `loss = 0.5 * mse(x, (x - grad).detach(), sum)` backpropagated to the render; IF keeps
the first 3 of its 6 output channels; Perp-Neg weights each negative as stable-dreamfusion's
`get_pos_neg_text_embeddings` (negative_w = -2, decays 2 and 10; every negative in the batch, weights under 1e-4
skipped) with threestudio's overhead rule. The text goes through the pipelines' own tokenizers and encoders
(`IFPipeline.encode_prompt` for IF). Both sides see the same t and noise: the reference replays the generator.
The project's prior is loaded through `load_prior` from tiny pipelines saved like the real checkpoints.
One deliberate difference from threestudio, shared by both sides: the VAE posterior's mean, not a sample.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.cameras import fixed_views
from engine.priors import PriorOptions, load_prior
from engine.priors.base import SDSContext
from engine.testing import write_tiny_if, write_tiny_sd

SCALE = 7.5
PROMPT = "a red cube"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return {"sd": write_tiny_sd(str(root / "sd")), "sd_v": write_tiny_sd(str(root / "sd-v"), "v_prediction"),
            "if": write_tiny_if(str(root / "if"))}


def ctx_for(azimuths, elevations) -> SDSContext:
    cams = fixed_views(list(azimuths), list(elevations))
    return SDSContext(view_weights=cams.view_weights(), cameras=cams)


def replay(seed: int, batch: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The t ~ U[20, 980) and eps the prior draws from `torch.Generator().manual_seed(seed)`, in its order."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(20, 980, (batch,), generator=g)
    return t, torch.randn(shape, generator=g)


# -- the reference ----------------------------------------------------------------------------------------


def stable_dreamfusion_negatives(azimuth: float, elevation: float) -> list[tuple[str, float]]:
    """(view, weight) of each negative prompt, signs as stable-dreamfusion (negative_w = -2); none overhead."""
    if elevation > 60:
        return []
    if -90 <= azimuth < 90:
        r = 1 - abs(azimuth) / 90
        front = 0.0 if r > 0.8 else math.exp(-r * 2) * -2
        side = 0.0 if r < 0.2 else math.exp(-(1 - r) * 10) * -2
        return [("front", front), ("side", side)]
    r = 1 - (abs(azimuth) - 90) / 90
    side = 0.0 if r > 0.8 else math.exp(-r * 10) * -2 / 2
    return [("side", side), ("front", -2.0)]


def positive_view(azimuth: float, elevation: float) -> list[tuple[str, float]]:
    """stable-dreamfusion's positive mix (front/side or side/back by r), threestudio's overhead prompt above 60."""
    if elevation > 60:
        return [("overhead", 1.0)]
    if -90 <= azimuth < 90:
        r = 1 - abs(azimuth) / 90
        return [("front", r), ("side", 1 - r)]
    r = 1 - (abs(azimuth) - 90) / 90
    return [("side", r), ("back", 1 - r)]


def perpendicular(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x - (x * y).sum() / max(float((y * y).sum()), 1e-6) * y


def reference_eps(unet, noisy, t, texts: dict, azimuths, elevations, *, perp_neg: bool, channels=None,
                  v_to_eps=None) -> torch.Tensor:
    """eps_hat per render: CFG, or Perp-Neg's weighted perpendicular aggregation."""
    out = []
    for b in range(noisy.shape[0]):
        pos = sum(w * texts[v] for v, w in positive_view(azimuths[b], elevations[b]))
        negs = stable_dreamfusion_negatives(azimuths[b], elevations[b]) if perp_neg else []
        embs = torch.stack([pos, texts["uncond"]] + [texts[v] for v, _ in negs])
        n = embs.shape[0]
        pred = unet(noisy[b:b + 1].expand(n, -1, -1, -1), t[b:b + 1].expand(n), encoder_hidden_states=embs).sample
        pred = pred.float()
        if channels:
            pred = pred[:, :channels]
        if v_to_eps is not None:
            pred = v_to_eps(pred, noisy[b:b + 1].float(), t[b])
        uncond, main = pred[1], pred[0] - pred[1]
        for (_, w), eps_k in zip(negs, pred[2:], strict=True):
            if abs(w) > 1e-4:
                main = main + w * perpendicular(eps_k - uncond, pred[0] - pred[1])
        out.append(uncond + SCALE * main)
    return torch.stack(out)


def clip_texts(folder: str, dtype) -> dict:
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype)
    names = {v: f"{PROMPT}, {v} view" for v in ("front", "side", "back", "overhead")} | {"uncond": ""}
    ids = tok(list(names.values()), padding="max_length", max_length=enc.config.max_position_embeddings,
              truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = enc(ids)[0]
    return dict(zip(names, hidden, strict=True))


def if_texts(folder: str, dtype) -> dict:
    from diffusers import IFPipeline

    pipe = IFPipeline.from_pretrained(folder, unet=None, safety_checker=None, feature_extractor=None, watermarker=None,
                                      requires_safety_checker=False, dtype=dtype)
    texts = {}
    for v in ("front", "side", "back", "overhead"):
        cond, uncond = pipe.encode_prompt(f"{PROMPT}, {v} view", negative_prompt="", device="cpu")
        texts[v], texts["uncond"] = cond[0], uncond[0]
    return texts


def reference_sd(folder, images, azimuths, elevations, seed, *, perp_neg=False, dtype=torch.float32, vae_res=32):
    """threestudio's stable-diffusion SDS, gradient w.r.t. the render."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=dtype)
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    abar_all = sched.alphas_cumprod

    def v_to_eps(v, z_t, t):  # x0 = sqrt(abar) z_t - sqrt(1-abar) v;  eps = (z_t - sqrt(abar) x0) / sqrt(1-abar)
        a, s = abar_all[t].sqrt(), (1 - abar_all[t]).sqrt()
        return (z_t - a * (a * z_t - s * v)) / s

    texts = {k: v.to(dtype) for k, v in clip_texts(folder, dtype).items()}
    x = images.clone().requires_grad_(True)
    rgb = F.interpolate(x, (vae_res, vae_res), mode="bilinear", align_corners=False)
    latents = vae.encode((rgb * 2 - 1).to(dtype)).latent_dist.mean * vae.config.scaling_factor
    t, noise = replay(seed, x.shape[0], latents.shape)
    with torch.no_grad():
        noisy = sched.add_noise(latents.detach().float(), noise, t)
        eps_hat = reference_eps(unet, noisy.to(dtype), t, texts, azimuths, elevations, perp_neg=perp_neg,
                                v_to_eps=v_to_eps if sched.config.prediction_type == "v_prediction" else None)
        grad = (1 - abar_all[t]).view(-1, 1, 1, 1) * (eps_hat - noise)
    target = (latents.float() - grad).detach()
    (0.5 * F.mse_loss(latents.float(), target, reduction="sum")).backward()
    return x.grad, t


def reference_if(folder, images, azimuths, elevations, seed, *, perp_neg=False, dtype=torch.float32):
    """threestudio's deepfloyd-if SDS, gradient w.r.t. the render."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=dtype)
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    texts = {k: v.to(dtype) for k, v in if_texts(folder, dtype).items()}
    x = images.clone().requires_grad_(True)
    size = unet.config.sample_size
    pixels = F.interpolate(x, (size, size), mode="bilinear", align_corners=False) * 2 - 1
    t, noise = replay(seed, x.shape[0], pixels.shape)
    with torch.no_grad():
        noisy = sched.add_noise(pixels.detach(), noise, t)
        eps_hat = reference_eps(unet, noisy.to(dtype), t, texts, azimuths, elevations, perp_neg=perp_neg, channels=3)
        grad = (1 - sched.alphas_cumprod[t]).view(-1, 1, 1, 1) * (eps_hat - noise)
    target = (pixels - grad).detach()
    (0.5 * F.mse_loss(pixels, target, reduction="sum")).backward()
    return x.grad, t


# -- the tests --------------------------------------------------------------------------------------------


def project_grad(prior, images, azimuths, elevations, seed):
    grad, info = prior.sds_grad(images, prior.encode_prompt(PROMPT), ctx_for(azimuths, elevations),
                                guidance_scale=SCALE, t_range=(0.02, 0.98), generator=torch.Generator().manual_seed(seed))
    return grad, info


def assert_parity(ours, ref, rel):
    assert torch.isfinite(ours).all() and ref.abs().sum() > 0
    err = float((ours.float() - ref.float()).norm() / ref.float().norm())
    assert err < rel, f"relative error {err:.2e}"


# Ring views at elevation 0 (the positive mix is then exactly the references'), and one overhead view.
VIEWS = {"plain": ((0.0, 180.0), (0.0, 0.0)), "perp": ((30.0, -120.0, 180.0, 10.0), (0.0, 0.0, 0.0, 80.0))}


@pytest.mark.parametrize("case", ["sd", "sd_v", "sd_perp", "sd_fp16"])
def test_stable_diffusion_latent_path_matches_the_reference(case, folders):
    perp, fp16 = case == "sd_perp", case == "sd_fp16"
    folder = folders["sd_v" if case == "sd_v" else "sd"]
    az, el = VIEWS["perp" if perp else "plain"]
    options = PriorOptions(perp_neg=perp, fp16=fp16)
    prior = load_prior(f"sd:{folder}", options=options, vae_resolution=32)
    images = torch.rand(len(az), 3, 24, 24, generator=torch.Generator().manual_seed(1))
    ours, info = project_grad(prior, images, az, el, seed=3)
    ref, t = reference_sd(folder, images, az, el, 3, perp_neg=perp, dtype=torch.float16 if fp16 else torch.float32)
    assert info["t"] == t.tolist()
    assert_parity(ours, ref, 3e-2 if fp16 else 1e-4)


@pytest.mark.parametrize("case", ["if", "if_perp", "if_fp16"])
def test_deepfloyd_pixel_path_matches_the_reference(case, folders):
    perp, fp16 = case == "if_perp", case == "if_fp16"
    az, el = VIEWS["perp" if perp else "plain"]
    prior = load_prior(f"if:{folders['if']}", options=PriorOptions(perp_neg=perp, fp16=fp16))
    images = torch.rand(len(az), 3, 24, 24, generator=torch.Generator().manual_seed(2))  # resized to the U-Net's 16
    ours, info = project_grad(prior, images, az, el, seed=5)
    ref, t = reference_if(folders["if"], images, az, el, 5, perp_neg=perp, dtype=torch.float16 if fp16 else torch.float32)
    assert info["t"] == t.tolist()
    assert_parity(ours, ref, 3e-2 if fp16 else 1e-4)


def test_perp_neg_is_not_plain_cfg_here(folders):
    """The Perp-Neg case above is a real test: on these views its gradient differs from plain CFG's."""
    az, el = VIEWS["perp"]
    images = torch.rand(len(az), 3, 24, 24, generator=torch.Generator().manual_seed(1))
    plain, _ = reference_sd(folders["sd"], images, az, el, 3)
    perp, _ = reference_sd(folders["sd"], images, az, el, 3, perp_neg=True)
    assert float((plain - perp).norm() / plain.norm()) > 1e-3
