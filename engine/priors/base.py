"""The prior protocol: what the trainer needs from a frozen text-to-image model.

A prior encodes a prompt once (with its view-dependent variants and the negative prompt) and, given a
batch of renders, returns the SDS gradient in image space. Everything else (cameras, shading, the
field) is the trainer's. Implementations: `embedded` (shipped in assets/), `analytic` (Gaussian and
oracle, for tests), `stable_diffusion`, `deepfloyd`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True)
class PriorOptions:
    """How a Stable Diffusion or DeepFloyd IF prior is loaded and guided (the other priors ignore these)."""

    perp_neg: bool = False  # Perp-Neg against multi-face (Janus) results: up to 2 more U-Net branches per view
    perp_neg_scale: float = 2.0  # weight of the opposite view's negative prompt (stable-dreamfusion's |negative_w|)
    fp16: bool | None = None  # half-precision weights; None: fp16 on CUDA, fp32 on the CPU
    cpu_offload: bool = False  # text encoder and U-Net never on the GPU together (IF's T5 leaves it after encoding anyway)
    attention_slicing: bool = False  # compute attention in slices: less peak memory, a little slower

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "perp_neg_scale":
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                        or value < 0:
                    raise ValueError(f"perp_neg_scale must be a number >= 0; got {value!r}")
            elif not (isinstance(value, bool) or (value is None and f.name == "fp16")):
                raise ValueError(f"{f.name} must be true or false; got {value!r}")

    def dtype(self, device) -> torch.dtype:
        """The weights' dtype on `device`."""
        fp16 = torch.device(device).type == "cuda" if self.fp16 is None else self.fp16
        return torch.float16 if fp16 else torch.float32


def add_prior_option_flags(parser) -> None:
    """The PriorOptions as command-line flags (`python -m engine run`, `python app.py`)."""
    import argparse

    parser.add_argument("--perp-neg", action="store_true", help="SD / IF: Perp-Neg against multi-face (Janus) results")
    parser.add_argument("--perp-neg-scale", type=float, default=PriorOptions.perp_neg_scale,
                        help="weight of Perp-Neg's opposite-view negative (default: %(default)s, stable-dreamfusion's)")
    parser.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None,
                        help="SD / IF half-precision weights (default: on CUDA only)")
    parser.add_argument("--cpu-offload", action="store_true", help="SD: text encoder and U-Net never on the GPU together")
    parser.add_argument("--attention-slicing", action="store_true", help="SD / IF: attention in slices (less memory)")


def prior_options_from(args) -> PriorOptions:
    """PriorOptions from the flags of `add_prior_option_flags` (ValueError for a bad value)."""
    return PriorOptions(perp_neg=args.perp_neg, perp_neg_scale=args.perp_neg_scale, fp16=args.fp16,
                        cpu_offload=args.cpu_offload, attention_slicing=args.attention_slicing)


@dataclass
class PromptEmbedding:
    """A prompt encoded for one prior. Tensors are the prior's own; the trainer only passes them back."""

    prompt: str
    negative_prompt: str
    cond: Tensor  # [4, ...]: one embedding per view label in engine.sds.VIEWS (front, side, back, overhead)
    uncond: Tensor  # [1, ...] or [4, ...]: the negative prompt ("" = unconditional)
    warnings: list[str] = field(default_factory=list)  # e.g. words the prior does not know
    extra: dict[str, Any] = field(default_factory=dict)  # prior-specific (e.g. Perp-Neg embeddings)
    plain: Tensor | None = None  # [1, ...]: the prompt without a view suffix (used when view_dependent is off)
    null: Tensor | None = None  # [1, ...]: the empty prompt, when the negative prompt is not empty (else: uncond)


@dataclass
class SDSContext:
    """What a step knows about the views it rendered; most priors ignore all but view_weights."""

    view_weights: Tensor  # [B, 4] interpolation weights over VIEWS
    cameras: Any = None  # engine.cameras.Cameras of the batch (the oracle prior renders its target with them)
    light: Any = None  # engine.shading.Light of the batch
    shading: str = "albedo"  # shading mode of the step
    step: int = 0
    view_dependent: bool = True  # False: condition on the plain prompt, not on the view-suffixed variants
    distillation: str = "sds"  # which loss's gradient to return: one of engine.sds.DISTILLATIONS
    vsd: Any = None  # the run's engine.priors.vsd.TrainableCopy (from prior.vsd_copy()) when distillation is "vsd"


@runtime_checkable
class Prior(Protocol):
    """A frozen text-to-image model used as a loss."""

    name: str  # short name shown in the UI, e.g. "embedded", "sd:/models/sd21-base"
    resolution: int  # render size (square) the prior works at; the trainer renders at this size by default
    num_train_timesteps: int  # T of its noise schedule
    distillations: tuple[str, ...]  # the losses of engine.sds.DISTILLATIONS it supports (ctx.distillation)

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> PromptEmbedding:
        """Encode a prompt and its view variants once; the trainer caches the result."""
        ...

    def sds_grad(self, images: Tensor, emb: PromptEmbedding, ctx: SDSContext, *, guidance_scale: float,
                 t_range: tuple[float, float], generator: torch.Generator
                 ) -> tuple[Tensor, dict]:
        """The gradient of the distillation `ctx.distillation` (SDS: w(t)(eps_hat - eps)) mapped to image space.

        images: [B, 3, H, W] renders in [0, 1] (requires no grad; the prior must not backprop into them
        except through its own encoder, as a latent prior does). Returns (grad [B, 3, H, W], info) where
        info holds at least "t" (list of ints, the timesteps used).
        """
        ...

    def vsd_copy(self):
        """A fresh trainable copy of the prior for VSD (engine.priors.vsd.TrainableCopy); the run keeps it."""
        ...


def check_distillation(prior, kind: str) -> None:
    """ValueError naming what `prior` supports when it cannot run the distillation `kind`."""
    if kind not in prior.distillations:
        raise ValueError(f"the {prior.name} prior cannot run distillation {kind!r}; it supports "
                         f"{', '.join(prior.distillations)}")
