"""Stable Diffusion and DeepFloyd IF priors, exercised offline with tiny random pipelines built from config.

The pipelines are saved with `save_pretrained` to a temp folder and loaded through the real loading path
(`engine.priors.load_prior`), so the folder layout, tokenizers and schedulers are the ones a real
checkpoint has; only the widths are tiny. No weights are downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import time

import pytest
import torch

from engine.priors import diffusers_common as dc
from engine.priors import load_prior
from engine.priors.base import Prior, SDSContext
from engine.sds import view_weights


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network, whatever the conftest says."""
    from huggingface_hub import constants

    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


WORDS = ("a", "red", "blue", "cube", "sphere", "front", "side", "back", "overhead", "view", "ugly", "blurry")


def write_tiny_sd(folder: str) -> str:
    """A Stable Diffusion 1.x/2.x-shaped pipeline (~0.2M-parameter U-Net) saved to `folder`."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + ",.":  # character-level BPE: every word ends in a "</w>" symbol
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1)  # what SD checkpoints ship; the prior reads its betas
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(folder)
    return folder


def write_tiny_if(folder: str) -> str:
    """A DeepFloyd IF stage I-shaped pipeline (pixel U-Net, 3 -> 6 channels, T5 text encoder) saved to `folder`."""
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    pieces = dict.fromkeys(["\u2581" + w for w in WORDS] + [","] + ["\u2581" + c for c in string.ascii_lowercase]
                           + list(string.ascii_lowercase))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -float(i)) for i, p in enumerate(pieces)]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=16)  # a unigram model, no sentencepiece file
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                           num_heads=4, relative_attention_num_buckets=8))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=6, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8, addition_embed_type="text",
        addition_embed_type_num_heads=2, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
        act_fn="gelu", norm_num_groups=8)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", thresholding=True,
                              dynamic_thresholding_ratio=0.95, sample_max_value=1.0)
    IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler, safety_checker=None,
               feature_extractor=None, watermarker=None, requires_safety_checker=False).save_pretrained(folder)
    return folder


def write_tiny_taesd(folder: str) -> str:
    """A tiny `AutoencoderTiny` with the SD VAE's downsampling (x2 here) and 4 latent channels."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory):
    return write_tiny_sd(str(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def if_dir(tmp_path_factory):
    return write_tiny_if(str(tmp_path_factory.mktemp("tiny-if")))


@pytest.fixture(scope="session")
def sd(sd_dir):
    return load_prior(f"sd:{sd_dir}", vae_resolution=32)


@pytest.fixture(scope="session")
def deepfloyd(if_dir):
    return load_prior(f"if:{if_dir}")


def _ctx(azimuths=(0.0, 180.0), elevations=(10.0, 10.0)) -> SDSContext:
    return SDSContext(view_weights=view_weights(torch.tensor(azimuths), torch.tensor(elevations)))


def _step(prior, images, emb, ctx=None, seed=0, scale=20.0):
    return prior.sds_grad(images, emb, ctx or _ctx(), guidance_scale=scale, t_range=(0.02, 0.98),
                          weighting="sigma2", generator=torch.Generator().manual_seed(seed))


# -- SDS steps --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["sd", "deepfloyd"])
def test_sds_step_returns_finite_gradient_of_render_shape(which, request):
    prior = request.getfixturevalue(which)
    assert isinstance(prior, Prior)
    emb = prior.encode_prompt("a red cube")
    assert emb.cond.shape[0] == 4 and emb.uncond.shape[0] == 1
    images = torch.rand(2, 3, 16, 16)
    grad, info = _step(prior, images, emb)
    assert grad.shape == images.shape and grad.dtype == images.dtype
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert len(info["t"]) == 2 and all(isinstance(t, int) and 20 <= t < 980 for t in info["t"])
    again, _ = _step(prior, images, emb)
    torch.testing.assert_close(grad, again)  # the generator alone decides t and the noise


def test_names_resolutions_and_defaults(sd, deepfloyd, sd_dir, if_dir):
    assert sd.name == f"sd:{sd_dir}" and deepfloyd.name == f"if:{if_dir}"
    assert sd.resolution == 64 and sd.vae_resolution == 32 and sd.num_train_timesteps == 1000
    assert deepfloyd.resolution == 16  # the tiny U-Net's sample size (64 for IF-I-XL)
    assert deepfloyd.default_guidance_scale == 20.0 and sd.default_guidance_scale == 100.0
    assert sd.dtype == torch.float32  # fp32 on CPU
    abar = sd.alphas_cumprod  # the scheduler's scaled_linear betas, not a generic schedule
    assert abs(float(abar[0]) - (1 - 0.00085)) < 1e-6


def test_view_weights_change_the_embedding_and_the_gradient(sd):
    emb = sd.encode_prompt("a red cube")
    assert not torch.allclose(emb.cond[0], emb.cond[2])  # ", front view" vs ", back view"
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.75, 0.0, 0.0]])
    mixed = dc.mix_views(emb.cond, w)
    torch.testing.assert_close(mixed[0], emb.cond[0])
    torch.testing.assert_close(mixed[1], 0.25 * emb.cond[0] + 0.75 * emb.cond[1])
    images = torch.rand(1, 3, 16, 16)
    front, _ = _step(sd, images, emb, _ctx((0.0,), (0.0,)))
    back, _ = _step(sd, images, emb, _ctx((180.0,), (0.0,)))
    assert not torch.allclose(front, back)
    # view-dependent prompting off (the ablation's base): the plain prompt for every camera
    assert emb.plain.shape[0] == 1 and not torch.allclose(emb.plain[0], emb.cond[0])
    plain = [_step(sd, images, emb, SDSContext(view_weights(torch.tensor([a]), torch.tensor([0.0])),
                                               view_dependent=False))[0] for a in (0.0, 180.0)]
    torch.testing.assert_close(plain[0], plain[1])


@pytest.mark.parametrize("which", ["sd", "deepfloyd"])
def test_negative_prompt_changes_the_unconditional_branch_only(which, request):
    prior = request.getfixturevalue(which)
    plain, neg = prior.encode_prompt("a red cube"), prior.encode_prompt("a red cube", "blurry")
    torch.testing.assert_close(plain.cond, neg.cond)
    assert not torch.allclose(plain.uncond, neg.uncond)
    images = torch.rand(1, 3, 16, 16)
    assert not torch.allclose(_step(prior, images, plain, _ctx((0.0,), (0.0,)))[0],
                              _step(prior, images, neg, _ctx((0.0,), (0.0,)))[0])


def test_prompt_embeddings_are_cached_per_prompt(deepfloyd):
    misses = deepfloyd.cache.misses
    a = deepfloyd.encode_prompt("a blue sphere")
    assert deepfloyd.encode_prompt("a blue sphere") is a
    assert deepfloyd.cache.misses == misses + 1  # a mid-run prompt change re-encodes once
    deepfloyd.encode_prompt("a blue sphere", "ugly")
    assert deepfloyd.cache.misses == misses + 2


def test_taesd_encoder(sd_dir, tmp_path):
    prior = load_prior(f"sd:{sd_dir}", taesd=write_tiny_taesd(str(tmp_path / "taesd")), vae_resolution=32)
    assert type(prior.vae).__name__ == "AutoencoderTiny"
    grad, _ = _step(prior, torch.rand(1, 3, 16, 16), prior.encode_prompt("a cube"), _ctx((0.0,), (0.0,)))
    assert grad.shape == (1, 3, 16, 16) and torch.isfinite(grad).all() and grad.abs().sum() > 0


# -- Perp-Neg ---------------------------------------------------------------------------------------------


def test_perp_neg_removes_only_the_perpendicular_part():
    eps_u, eps_c = torch.zeros(1, 1, 2, 1), torch.tensor([[[[1.0], [0.0]]]])  # d_pos = (1, 0)
    parallel = torch.tensor([[[[2.0], [0.0]]]])[:, None]  # a negative along d_pos: no effect
    orthogonal = torch.tensor([[[[0.0], [1.0]]]])[:, None]  # fully perpendicular: removed with weight lambda
    w = torch.tensor([[0.5]])
    cfg = dc.guide(eps_c, eps_u, 7.0)
    torch.testing.assert_close(dc.guide(eps_c, eps_u, 7.0, parallel, w), cfg)
    torch.testing.assert_close(dc.guide(eps_c, eps_u, 7.0, orthogonal, w), cfg - 7.0 * 0.5 * orthogonal[:, 0])
    lam = dc.perp_neg_weights(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]), 2.0)
    torch.testing.assert_close(lam, torch.tensor([[0.0, 2.0, 2.0], [2.0, 2.0, 2.0]]))


def test_perp_neg_option_runs_and_changes_the_gradient(sd_dir):
    plain = load_prior(f"sd:{sd_dir}", vae_resolution=32)
    perp = load_prior(f"sd:{sd_dir}", vae_resolution=32, perp_neg=True)
    images = torch.rand(2, 3, 16, 16)
    g0, _ = _step(plain, images, plain.encode_prompt("a red cube"))
    g1, _ = _step(perp, images, perp.encode_prompt("a red cube"))
    assert torch.isfinite(g1).all() and not torch.allclose(g0, g1)


# -- loading and failures ---------------------------------------------------------------------------------


def test_missing_folder_fails_fast_with_one_message():
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError, match="folder not found: /no/such/sd-folder"):
        load_prior("sd:/no/such/sd-folder")
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("spec,flag", [("sd:nobody/no-such-model", "sd"), ("if:nobody/no-such-if", "if")])
def test_offline_hub_id_fails_fast_naming_the_model(spec, flag, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = spec.split(":", 1)[1]
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError) as err:
        load_prior(spec)
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert repo in msg and f"hf download {repo}" in msg and f"--prior {flag}:/path/to/folder" in msg
    assert ("gated" in msg) == (flag == "if")


def test_unreachable_hub_fails_fast(monkeypatch):
    from huggingface_hub import constants

    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(dc, "hub_reachable", lambda timeout=3.0: False)  # never touch the network in tests
    with pytest.raises(FileNotFoundError, match="cannot be reached"):
        load_prior("sd:nobody/no-such-model")


def test_hub_probe_answers_within_its_timeout():
    t0 = time.monotonic()
    assert dc.hub_reachable(timeout=2.0) in (True, False)
    assert time.monotonic() - t0 < 8


def test_cached_hub_id_loads_offline(sd_dir, tmp_path):
    # The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}
    commit = "0" * 40
    repo = tmp_path / "models--org--tiny-sd"
    shutil.copytree(sd_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    prior = load_prior("sd:org/tiny-sd", cache_dir=str(tmp_path), vae_resolution=32)
    assert prior.name == "sd:org/tiny-sd"


def test_folder_with_only_fp16_files_loads(sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    lean = str(tmp_path / "lean")  # what a download of only the *fp16* weight files leaves
    StableDiffusionPipeline.from_pretrained(sd_dir).save_pretrained(lean, variant="fp16")
    assert not os.path.exists(os.path.join(lean, "unet", "diffusion_pytorch_model.safetensors"))
    assert load_prior(f"sd:{lean}", vae_resolution=32).name == f"sd:{lean}"


def test_folder_without_a_component_names_it(sd_dir, tmp_path):
    broken = tmp_path / "no-vae"
    shutil.copytree(sd_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(RuntimeError, match=r"^vae: missing"):
        load_prior(f"sd:{broken}")


def test_folder_with_wrong_shapes_names_the_component(if_dir, tmp_path):
    broken = tmp_path / "wrong-unet"
    shutil.copytree(if_dir, broken)
    cfg_path = broken / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["block_out_channels"] = [8, 16]  # the weights on disk are (16, 32)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match=r"^unet: "):
        load_prior(f"if:{broken}")


def test_mixed_checkpoints_name_the_mismatch(sd_dir, tmp_path):
    broken = tmp_path / "mixed"
    shutil.copytree(sd_dir, broken)
    cfg_path = broken / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["cross_attention_dim"] = 64  # a U-Net from another checkpoint: it fails to load or the widths differ
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match=r"^unet: "):
        load_prior(f"sd:{broken}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_cuda(sd_dir, if_dir):
    for spec, kw in ((f"sd:{sd_dir}", {"vae_resolution": 32}), (f"if:{if_dir}", {})):
        prior = load_prior(spec, device="cuda", cpu_offload=True, attention_slicing=True, **kw)
        assert prior.dtype == torch.float16
        images = torch.rand(2, 3, 16, 16, device="cuda")
        grad, _ = _step(prior, images, prior.encode_prompt("a red cube"))
        assert grad.device == images.device and torch.isfinite(grad).all()
