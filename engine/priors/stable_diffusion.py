"""Stable Diffusion 1.x / 2.x as an SDS prior (latent space), loaded with diffusers from a hub id or folder.

The render (64x64 by default, as the peers train) is upsampled to the VAE's resolution (512 for SD 2.1-base,
768 for SD 2.x-768), encoded to latents, noised, denoised by the U-Net with classifier-free guidance,
and the latent gradient w(t)(eps_hat - eps) is mapped back to the render through the encoder's
vector-Jacobian product. That is the same gradient the peers get from
`loss = 0.5 * ||z - (z - g).detach()||^2` backpropagated through the encoder, returned in image space so the
trainer applies one detached-target loss whatever the prior. Optionally a tiny autoencoder (TAESD) does the
encode: about 5x cheaper than the full VAE encoder and its backward.

Cost: see docs/priors.md. A U-Net forward of SD 2.1-base takes ~23 s on a 2-core CPU; this is a GPU prior.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.priors import diffusers_common as dc
from engine.priors import hub
from engine.priors.base import PriorOptions, PromptEmbedding, SDSContext, check_distillation
from engine.priors.vsd import LoRA, TrainableCopy
from engine.sds import DISTILLATIONS, distillation_grad

DEFAULT_SD = hub.HUB["sd"][0]
DEFAULT_GUIDANCE = 100.0  # the paper's and the peers' CFG scale for Stable Diffusion
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class StableDiffusionPrior:
    """SDS with a Stable Diffusion U-Net in the VAE's latent space (see the module docstring)."""

    default_guidance_scale = DEFAULT_GUIDANCE
    distillations = DISTILLATIONS

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, *, name: str, device="cpu",
                 options: PriorOptions | None = None, resolution: int = 64, vae_resolution: int | None = None):
        options = options or PriorOptions()
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.name, self.options = name, options
        self.device, self.dtype = torch.device(device), options.dtype(device)
        self.resolution = resolution  # render size the trainer should use (peers: 64)
        blocks = getattr(vae.config, "block_out_channels", None) or vae.config.encoder_block_out_channels  # VAE / TAESD
        down = 2 ** (len(blocks) - 1)  # the encoder's downsampling factor (8 for SD and TAESD)
        self.vae_resolution = vae_resolution or unet.config.sample_size * down  # 512 for 2.1-base
        self.max_length = dc.token_limit(tokenizer, text_encoder.config.max_position_embeddings)
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.v_prediction = scheduler.config.prediction_type == "v_prediction"  # SD 2.x-768
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)  # [T], the scheduler's own
        self.cache = dc.PromptCache()
        for m in (unet, vae, text_encoder):
            m.requires_grad_(False).eval()
        unet.to(self.device)
        vae.to(self.device)
        text_encoder.to("cpu" if options.cpu_offload else self.device)  # moved to the device only to encode a prompt

    @classmethod
    def from_pretrained(cls, source: str = DEFAULT_SD, device="cpu", options: PriorOptions | None = None, *,
                        taesd: str | None = None, resolution: int = 64, vae_resolution: int | None = None,
                        cache_dir: str | None = None) -> StableDiffusionPrior:
        """Load from a hub id (cached, or fetched when online) or a local diffusers folder.

        taesd: hub id or folder of an `AutoencoderTiny` (e.g. "madebyollin/taesd") to encode with instead of
        the VAE. Raises FileNotFoundError / PermissionError when the weights are not on this machine and cannot
        be fetched, and RuntimeError naming the component of a broken folder.
        """
        from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        options = options or PriorOptions()
        dtype = options.dtype(device)
        fp16 = dtype == torch.float16
        components = tuple(c for c in COMPONENTS if not (taesd and c == "vae"))  # TAESD replaces the VAE
        where = hub.resolve_source(source, "Stable Diffusion", "`--prior sd:/path/to/folder`", components, kind="sd",
                                   fp16=fp16, cache_dir=cache_dir)
        tokenizer = dc.load_component("tokenizer", CLIPTokenizer.from_pretrained, where)
        scheduler = dc.load_component("scheduler", DDPMScheduler.from_pretrained, where)
        unet = dc.load_component("unet", UNet2DConditionModel.from_pretrained, where, fp16=fp16, dtype=dtype)
        text_encoder = dc.load_component("text_encoder", CLIPTextModel.from_pretrained, where, fp16=fp16, dtype=dtype)
        if taesd:
            tiny = hub.resolve_source(taesd, "TAESD", "taesd=/path/to/folder", (), kind="sd", fp16=fp16,
                                      cache_dir=cache_dir)
            try:
                vae = AutoencoderTiny.from_pretrained(tiny, dtype=dtype)
            except Exception as e:
                raise RuntimeError(f"taesd: could not be loaded from {taesd}: {hub.error_detail(e)}") from e
        else:
            vae = dc.load_component("vae", AutoencoderKL.from_pretrained, where, fp16=fp16, dtype=dtype)
        dc.check_width("unet", unet.config.cross_attention_dim, text_encoder.config.hidden_size, "text embeddings")
        dc.check_width("unet", unet.config.in_channels, vae.config.latent_channels, "latents")
        if options.attention_slicing:
            unet.set_attention_slice("auto")
        return cls(unet, vae, text_encoder, tokenizer, scheduler, name=f"sd:{source}", device=device, options=options,
                   resolution=resolution, vae_resolution=vae_resolution)

    # -- text ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def _encode_texts(self, texts: list[str]) -> tuple[Tensor, bool]:
        """CLIP last hidden states [N, 77, D], and whether any text was truncated."""
        tok = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        full = self.tokenizer(texts, padding=False, truncation=False)["input_ids"]
        truncated = any(len(ids) > self.max_length for ids in full)
        offload = self.options.cpu_offload  # the text encoder visits the GPU alone, the U-Net and VAE wait on the CPU
        with dc.on_device(self.device, [self.text_encoder] if offload else [], [self.unet, self.vae] if offload else []):
            emb = self.text_encoder(tok.input_ids.to(self.device))[0]
        return emb, truncated

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> PromptEmbedding:
        """cond [4, 77, D]: the prompt with each view suffix; uncond [1, 77, D]: the negative prompt."""
        return dc.encode_views(self, prompt, negative_prompt, self.max_length)

    # -- SDS ----------------------------------------------------------------------------------------

    def _encode_images(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] in [-1, 1] at the VAE's resolution -> scaled latents [B, 4, H/8, W/8], with graph."""
        from diffusers import AutoencoderTiny

        enc = self.vae.encode(x.to(self.dtype))
        tiny = isinstance(self.vae, AutoencoderTiny)  # TAESD gives latents; the VAE a distribution (its mean: no noise)
        return (enc.latents if tiny else enc.latent_dist.mean) * self.vae.config.scaling_factor

    def sds_grad(self, images: Tensor, emb: PromptEmbedding, ctx: SDSContext, *, guidance_scale: float,
                 t_range: tuple[float, float], generator: torch.Generator) -> tuple[Tensor, dict]:
        """The distillation's gradient w.r.t. `images` [B, 3, H, W] in [0, 1]; see engine.priors.base.Prior."""
        check_distillation(self, ctx.distillation)
        # 1. Text: each render's embedding is its view-weighted mix of the four view prompts; with Perp-Neg,
        #    the (render, view prompt) negatives of nonzero weight
        texts = dc.text_batch(emb, ctx.view_weights, ctx.view_dependent)
        neg = dc.perp_neg_branches(emb, ctx, self.options.perp_neg_scale, self.device) if self.options.perp_neg else None
        # 2. Latents: upsample the render to the VAE's size and encode, keeping the graph to the render
        x = images.detach().to(self.device).requires_grad_(True)  # leaf [B, 3, H, W]
        with torch.enable_grad():
            x_vae = F.interpolate(x * 2.0 - 1.0, size=(self.vae_resolution,) * 2, mode="bilinear",
                                  align_corners=False)
            latents = self._encode_images(x_vae)  # [B, 4, h, w]
        # 3. The distillation in latent space (engine.sds.distillation_grad): t, eps, z_t with the scheduler's abar,
        #    the U-Net's branches in one batched call without a graph (v-prediction -> eps), guidance (CFG or
        #    Perp-Neg); for SDS g = w(t) (eps_hat - eps)
        model, rows = dc.denoiser(self, latents.detach().float(), texts, neg, ctx.vsd if ctx.distillation == "vsd" else None)
        grad_latents, info = distillation_grad(ctx.distillation, model, guidance_scale=guidance_scale,
                                               t_range=t_range, generator=generator)  # NaN kept: the trainer skips
        # 4. The latent gradient mapped to the render by the encoder's VJP J^T g: the gradient the peers get from
        #    0.5 * ||z - (z - g).detach()||^2 backpropagated through the encoder
        (grad,) = torch.autograd.grad(latents, x, grad_outputs=grad_latents.to(latents.dtype))
        info.update(latent_grad_norm=float(grad_latents.norm()), unet_batch=sum(rows))
        return grad.to(device=images.device, dtype=images.dtype), info

    def vsd_copy(self) -> TrainableCopy:
        """VSD's copy: LoRA (rank 4) on the U-Net's attention projections, fitted with Adam at lr 1e-3."""
        return TrainableCopy(LoRA(self.unet).to(self.device), lr=1e-3)
