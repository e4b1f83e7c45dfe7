"""DeepFloyd IF stage I as an SDS prior: pixel-space 64x64 with a T5 text encoder, like the paper's Imagen.

Only stage I of the cascade is used (threestudio's deepfloyd-if guidance does the same): the render is
resized to the U-Net's 64x64, noised, denoised with classifier-free guidance (default scale 20, the peers'),
and the gradient w(t)(eps_hat - eps) is mapped back to the render through the resize (its VJP). The IF
U-Net predicts noise and a variance (6 channels); SDS uses the first three.

IF is gated on the Hub (accept the licence, `hf auth login`) and large: T5-XXL (4.7B) + IF-I-XL (4.3B),
~18 GB in fp16; `cpu_offload=True` keeps the text encoder off the GPU except while it encodes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.priors import diffusers_common as dc
from engine.priors.base import PromptEmbedding, SDSContext
from engine.sds import add_noise, sample_timesteps, sds_weight

DEFAULT_IF = "DeepFloyd/IF-I-XL-v1.0"
DEFAULT_GUIDANCE = 20.0  # threestudio's deepfloyd-if guidance scale (SD uses 100)
COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")
MAX_LENGTH = 77  # IFPipeline's T5 prompt length


class DeepFloydIFPrior:
    """SDS with the IF stage I pixel U-Net (see the module docstring)."""

    default_guidance_scale = DEFAULT_GUIDANCE

    def __init__(self, unet, text_encoder, tokenizer, scheduler, *, name: str, device="cpu",
                 dtype: torch.dtype = torch.float32, perp_neg: bool = False, perp_neg_scale: float = 1.0,
                 cpu_offload: bool = False):
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.name = name
        self.device, self.dtype = torch.device(device), dtype
        self.resolution = unet.config.sample_size  # 64: the U-Net's own size; the trainer renders at it
        self.max_length = min(MAX_LENGTH, tokenizer.model_max_length)
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)  # [T], the scheduler's own
        self.perp_neg, self.perp_neg_scale = perp_neg, perp_neg_scale
        self.cpu_offload = cpu_offload
        self.cache = dc.PromptCache()
        for m in (unet, text_encoder):
            m.requires_grad_(False).eval()
        unet.to(self.device)
        text_encoder.to("cpu" if cpu_offload else self.device)

    @classmethod
    def from_pretrained(cls, source: str = DEFAULT_IF, device="cpu", dtype: torch.dtype | None = None,
                        attention_slicing: bool = False, cpu_offload: bool = False, perp_neg: bool = False,
                        perp_neg_scale: float = 1.0, variant: str | None = None,
                        cache_dir: str | None = None) -> DeepFloydIFPrior:
        """Load IF stage I from a hub id (cached, or downloaded when online) or a local diffusers folder.

        attention_slicing: compute attention in slices (less memory). cpu_offload: keep T5 on the CPU
        except while it encodes. variant: e.g. "fp16" weight files (IF ships them).
        Raises FileNotFoundError when the weights are not on this machine and cannot be fetched, and
        RuntimeError naming the component of a broken folder. The tokenizer of the real checkpoint is a
        sentencepiece model: `pip install sentencepiece` if loading it says so.
        """
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import T5EncoderModel, T5Tokenizer

        dtype = dc.default_dtype(device, dtype)
        where = dc.resolve_source(source, "DeepFloyd IF", "`--prior if:/path/to/folder`", COMPONENTS,
                                  cache_dir=cache_dir, gated=True)
        weights = {"variant": variant, "cache_dir": cache_dir}
        unet = dc.load_component("unet", UNet2DConditionModel.from_pretrained, where, torch_dtype=dtype, **weights)
        text_encoder = dc.load_component("text_encoder", T5EncoderModel.from_pretrained, where, dtype=dtype,
                                         **weights)
        tokenizer = dc.load_component("tokenizer", T5Tokenizer.from_pretrained, where, cache_dir=cache_dir)
        scheduler = dc.load_component("scheduler", DDPMScheduler.from_pretrained, where, cache_dir=cache_dir)
        text_width = unet.config.encoder_hid_dim or unet.config.cross_attention_dim
        dc.check_width("unet", text_width, text_encoder.config.d_model, "text embeddings")
        dc.check_width("unet", 3, unet.config.in_channels, "input channels (IF stage I works on RGB pixels)")
        if attention_slicing:
            unet.set_attention_slice("auto")
        return cls(unet, text_encoder, tokenizer, scheduler, name=f"if:{source}", device=device, dtype=dtype,
                   perp_neg=perp_neg, perp_neg_scale=perp_neg_scale, cpu_offload=cpu_offload)

    # -- text ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def _encode_texts(self, texts: list[str]) -> tuple[Tensor, bool]:
        """T5 last hidden states [N, 77, D] (padding masked in attention), and whether any text was truncated."""
        texts = [t.lower().strip() for t in texts]  # IFPipeline's preprocessing without caption cleaning
        tok = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        full = self.tokenizer(texts, padding=False, truncation=False)["input_ids"]
        truncated = any(len(ids) > self.max_length for ids in full)
        with dc.on_device(self.device, self.cpu_offload, self.text_encoder):
            emb = self.text_encoder(tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device))[0]
        return emb.to(self.dtype), truncated

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> PromptEmbedding:
        """cond [4, 77, D]: the prompt with each view suffix; uncond [1, 77, D]: the negative prompt."""
        return dc.encode_views(self, prompt, negative_prompt, self.max_length)

    # -- SDS ----------------------------------------------------------------------------------------

    def sds_grad(self, images: Tensor, emb: PromptEmbedding, ctx: SDSContext, *, guidance_scale: float,
                 t_range: tuple[float, float], weighting: str, generator: torch.Generator) -> tuple[Tensor, dict]:
        """SDS gradient w.r.t. `images` [B, 3, H, W] in [0, 1]; see engine.priors.base.Prior."""
        b = images.shape[0]
        # 1. Text: each render's embedding is its view-weighted mix of the four view prompts
        cond, uncond, neg = dc.text_batch(emb, ctx.view_weights, self.perp_neg, ctx.view_dependent)
        # 2. Pixels: [0, 1] -> [-1, 1] at the U-Net's 64x64, keeping the graph to the render
        x = images.detach().to(self.device).float().requires_grad_(True)  # leaf [B, 3, H, W]
        with torch.enable_grad():
            x0 = x * 2.0 - 1.0
            if x0.shape[-1] != self.resolution or x0.shape[-2] != self.resolution:
                x0 = F.interpolate(x0, size=(self.resolution,) * 2, mode="bilinear", align_corners=False)
        # 3. Timesteps and noise: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with the scheduler's abar
        t = sample_timesteps(b, t_range[0], t_range[1], self.num_train_timesteps, generator, self.device)
        abar = self.alphas_cumprod[t]  # [B]
        noise = dc.randn(x0.shape, generator, self.device, torch.float32)
        x_t = add_noise(x0.detach(), noise, abar)
        # 4. Noise prediction of every branch in one U-Net call, without a graph; drop the variance channels
        eps_cond, eps_uncond, eps_neg = dc.predict_noise(self.unet, x_t.to(self.dtype), t, cond, uncond, neg,
                                                         channels=3)
        # 5. Guidance (CFG, or Perp-Neg against multi-face results)
        lambdas = None if neg is None else dc.perp_neg_weights(ctx.view_weights.to(self.device), self.perp_neg_scale)
        eps_hat = dc.guide(eps_cond.float(), eps_uncond.float(), guidance_scale, eps_neg, lambdas)
        # 6. Pixel gradient g = w(t) (eps_hat - eps), mapped to the render through the resize and *2 - 1:
        #    the gradient of 0.5 * ||x0 - (x0 - g).detach()||^2 w.r.t. the render, as the peers compute it
        grad_x0 = sds_weight(abar, weighting).view(-1, 1, 1, 1) * (eps_hat - noise)  # NaN kept: the trainer skips
        (grad,) = torch.autograd.grad(x0, x, grad_outputs=grad_x0)
        info = {"t": t.tolist(), "pixel_grad_norm": float(grad_x0.norm())}
        return grad.to(device=images.device, dtype=images.dtype), info
