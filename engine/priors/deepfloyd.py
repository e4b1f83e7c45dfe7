"""DeepFloyd IF stage I as an SDS prior: pixel-space 64x64 with a T5 text encoder, like the paper's Imagen.

Only stage I of the cascade is used (threestudio's deepfloyd-if guidance does the same): the render is
resized to the U-Net's 64x64, noised, denoised with classifier-free guidance (default scale 20, the peers'),
and the gradient w(t)(eps_hat - eps) is mapped back to the render through the resize (its VJP). The IF
U-Net predicts noise and a variance (6 channels); SDS uses the first three.

IF is gated on the Hub (accept the licence, `hf auth login`) and large: T5-XXL (4.8B) + IF-I-XL (4.3B).
Loading goes from cheap to expensive, so a missing piece fails in seconds: the tokenizer first (its
`spiece.model` needs sentencepiece and protobuf), then the U-Net, then T5. T5 encodes each prompt's variants
in one batch and lives on the CPU otherwise, so the GPU holds only the U-Net (docs/priors.md, memory).
"""

from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.priors import diffusers_common as dc
from engine.priors import hub
from engine.priors.base import PriorOptions, PromptEmbedding, SDSContext, check_distillation
from engine.priors.vsd import LoRA, TrainableCopy
from engine.sds import DISTILLATIONS, distillation_grad

DEFAULT_IF = hub.HUB["if"][0]
DEFAULT_GUIDANCE = 20.0  # threestudio's deepfloyd-if guidance scale (SD uses 100)
COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")
TOKENIZER_DEPS = "DeepFloyd IF's tokenizer (spiece.model) needs sentencepiece and protobuf: pip install sentencepiece protobuf"


class DeepFloydIFPrior:
    """SDS with the IF stage I pixel U-Net (see the module docstring)."""

    default_guidance_scale = DEFAULT_GUIDANCE
    distillations = DISTILLATIONS

    def __init__(self, unet, text_encoder, tokenizer, scheduler, *, name: str, device="cpu",
                 options: PriorOptions | None = None):
        options = options or PriorOptions()
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.name, self.options = name, options
        self.device, self.dtype = torch.device(device), options.dtype(device)
        self.resolution = unet.config.sample_size  # 64: the U-Net's own size; the trainer renders at it
        self.max_length = dc.token_limit(tokenizer)
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)  # [T], the scheduler's own
        self.cache = dc.PromptCache()
        for m in (unet, text_encoder):
            m.requires_grad_(False).eval()
        unet.to(self.device)
        text_encoder.to("cpu")  # on the device only while it encodes a prompt (T5-XXL: ~11.5 GB)

    @classmethod
    def from_pretrained(cls, source: str = DEFAULT_IF, device="cpu", options: PriorOptions | None = None, *,
                        cache_dir: str | None = None) -> DeepFloydIFPrior:
        """Load IF stage I from a hub id (cached, or fetched when online) or a local diffusers folder.

        Raises FileNotFoundError / PermissionError (gated) when the weights are not on this machine and cannot be
        fetched, and RuntimeError naming the component of a broken folder or the missing tokenizer dependency.
        """
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import T5EncoderModel

        options = options or PriorOptions()
        dtype = options.dtype(device)
        fp16 = dtype == torch.float16
        where = hub.resolve_source(source, "DeepFloyd IF", "`--prior if:/path/to/folder`", COMPONENTS, kind="if",
                                   fp16=fp16, cache_dir=cache_dir, gated=True)
        # 1. The tokenizer first: a missing dependency fails here in seconds, before ~20 GB of weights load
        tokenizer = load_tokenizer(where)
        scheduler = dc.load_component("scheduler", DDPMScheduler.from_pretrained, where)
        unet = dc.load_component("unet", UNet2DConditionModel.from_pretrained, where, fp16=fp16, dtype=dtype)
        dc.check_width("unet", 3, unet.config.in_channels, "input channels (IF stage I works on RGB pixels)")
        # 2. T5 (its `wo` layers stay fp32 in transformers: _keep_in_fp32_modules)
        text_encoder = dc.load_component("text_encoder", T5EncoderModel.from_pretrained, where, fp16=fp16, dtype=dtype)
        text_width = unet.config.encoder_hid_dim or unet.config.cross_attention_dim
        dc.check_width("unet", text_width, text_encoder.config.d_model, "text embeddings")
        if options.attention_slicing:
            unet.set_attention_slice("auto")
        return cls(unet, text_encoder, tokenizer, scheduler, name=f"if:{source}", device=device, options=options)

    # -- text ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def _encode_texts(self, texts: list[str]) -> tuple[Tensor, bool]:
        """T5 last hidden states [N, 77, D] (padding masked in attention), and whether any text was truncated."""
        texts = [t.lower().strip() for t in texts]  # IFPipeline's preprocessing without caption cleaning
        tok = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        full = self.tokenizer(texts, padding=False, truncation=False)["input_ids"]
        truncated = any(len(ids) > self.max_length for ids in full)
        park = [self.unet] if self.options.cpu_offload else []  # T5 and the U-Net never on the GPU together
        with dc.on_device(self.device, [self.text_encoder], park):
            emb = self.text_encoder(tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device))[0]
        return emb.to(self.dtype), truncated

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> PromptEmbedding:
        """cond [4, 77, D]: the prompt with each view suffix; uncond [1, 77, D]: the negative prompt."""
        return dc.encode_views(self, prompt, negative_prompt, self.max_length)

    # -- SDS ----------------------------------------------------------------------------------------

    def sds_grad(self, images: Tensor, emb: PromptEmbedding, ctx: SDSContext, *, guidance_scale: float,
                 t_range: tuple[float, float], generator: torch.Generator) -> tuple[Tensor, dict]:
        """The distillation's gradient w.r.t. `images` [B, 3, H, W] in [0, 1]; see engine.priors.base.Prior."""
        check_distillation(self, ctx.distillation)
        # 1. Text: each render's embedding is its view-weighted mix of the four view prompts; with Perp-Neg,
        #    the (render, view prompt) negatives of nonzero weight
        texts = dc.text_batch(emb, ctx.view_weights, ctx.view_dependent)
        neg = dc.perp_neg_branches(emb, ctx, self.options.perp_neg_scale, self.device) if self.options.perp_neg else None
        # 2. Pixels: [0, 1] -> [-1, 1] at the U-Net's 64x64, keeping the graph to the render
        x = images.detach().to(self.device).float().requires_grad_(True)  # leaf [B, 3, H, W]
        with torch.enable_grad():
            x0 = x * 2.0 - 1.0
            if x0.shape[-1] != self.resolution or x0.shape[-2] != self.resolution:
                x0 = F.interpolate(x0, size=(self.resolution,) * 2, mode="bilinear", align_corners=False)
        # 3. The distillation in pixel space (engine.sds.distillation_grad): t, eps, x_t with the scheduler's abar,
        #    the U-Net's branches in one batched call without a graph (the variance channels dropped), guidance
        #    (CFG or Perp-Neg); for SDS g = w(t) (eps_hat - eps)
        model, rows = dc.denoiser(self, x0.detach(), texts, neg, ctx.vsd if ctx.distillation == "vsd" else None,
                                  channels=3)
        grad_x0, info = distillation_grad(ctx.distillation, model, guidance_scale=guidance_scale, t_range=t_range,
                                          generator=generator)  # NaN kept: the trainer skips
        # 4. Mapped to the render through the resize and *2 - 1: the gradient of 0.5 * ||x0 - (x0 - g).detach()||^2
        #    w.r.t. the render, as the peers compute it
        (grad,) = torch.autograd.grad(x0, x, grad_outputs=grad_x0)
        info.update(pixel_grad_norm=float(grad_x0.norm()), unet_batch=sum(rows))
        return grad.to(device=images.device, dtype=images.dtype), info

    def vsd_copy(self) -> TrainableCopy:
        """VSD's copy: LoRA (rank 4) on the U-Net's attention projections, fitted with Adam at lr 1e-3."""
        return TrainableCopy(LoRA(self.unet).to(self.device), lr=1e-3)


def load_tokenizer(folder: str):
    """IF's T5 tokenizer. Its `spiece.model` is read with sentencepiece and protobuf (transformers 5 otherwise
    falls back to tiktoken and says so): check them first and name the fix in one line."""
    from transformers import T5Tokenizer

    if not os.path.exists(os.path.join(folder, "tokenizer", "tokenizer.json")):
        try:
            import google.protobuf  # noqa: F401
            import sentencepiece  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"tokenizer: {TOKENIZER_DEPS}") from e
    try:
        return T5Tokenizer.from_pretrained(folder, subfolder="tokenizer")
    except Exception as e:
        hint = TOKENIZER_DEPS if re.search("sentencepiece|protobuf|tiktoken", str(e), re.I) else hub.error_detail(e)
        raise RuntimeError(f"tokenizer: could not be loaded from {folder}: {hint}") from e
