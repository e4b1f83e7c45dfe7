"""Priors: frozen text-to-image models used as SDS losses, behind one protocol (see base.py)."""

from __future__ import annotations

from engine.config import quoted
from engine.priors.base import Prior, PriorOptions, PromptEmbedding, SDSContext
from engine.world import SHAPES  # the oracle's solids: the one list every message names

__all__ = ["Prior", "PriorOptions", "PromptEmbedding", "SDSContext", "check_prior_spec", "load_prior", "PRIOR_HELP"]

PRIOR_HELP = (f"embedded (default, shipped in assets/), oracle:<solid> ({', '.join(SHAPES)}), "
              "gaussian, sd[:<hub id or folder>], if[:<hub id or folder>]")


PRIOR_KINDS = ("embedded", "oracle", "gaussian", "sd", "if")


def check_prior_spec(spec) -> str:
    """The stripped spec if its kind is known (cheap: loads nothing), else ValueError with the choices."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"prior must be a non-empty spec; choose from: {PRIOR_HELP}")
    if spec.strip().partition(":")[0].lower() not in PRIOR_KINDS:
        raise ValueError(f"unknown prior {quoted(spec)}; choose from: {PRIOR_HELP}")
    return spec.strip()


def load_prior(spec: str | None, device="cpu", options: PriorOptions | None = None, **kwargs) -> Prior:
    """Build a prior from a spec string such as "embedded", "oracle:cube", "sd:/models/sd21".

    options: how SD / IF load and guide (Perp-Neg, fp16, offload, attention slicing); the other priors ignore it.
    kwargs: loader-specific extras (SD: taesd, resolution, vae_resolution; SD / IF: cache_dir).
    Raises ValueError with one readable line for an unknown spec or bad options, and the prior's own error
    (FileNotFoundError / PermissionError / RuntimeError with a message naming what is missing) when loading fails.
    """
    if options is not None and not isinstance(options, PriorOptions):
        raise ValueError(f"options must be a PriorOptions; got {type(options).__name__}")
    spec = (spec or "embedded").strip()
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    if kind == "embedded":
        from engine.priors.embedded import EmbeddedPrior

        return EmbeddedPrior.load(arg or None, device=device, **kwargs)
    if kind == "oracle":
        from engine.priors.analytic import OraclePrior

        return OraclePrior(arg or "sphere", device=device, **kwargs)
    if kind == "gaussian":
        from engine.priors.analytic import GaussianPrior

        return GaussianPrior(device=device, **kwargs)
    if kind == "sd":
        from engine.priors.stable_diffusion import DEFAULT_SD, StableDiffusionPrior

        return StableDiffusionPrior.from_pretrained(arg or DEFAULT_SD, device=device, options=options, **kwargs)
    if kind == "if":
        from engine.priors.deepfloyd import DEFAULT_IF, DeepFloydIFPrior

        return DeepFloydIFPrior.from_pretrained(arg or DEFAULT_IF, device=device, options=options, **kwargs)
    raise ValueError(f"unknown prior {quoted(spec)}; choose from: {PRIOR_HELP}")
