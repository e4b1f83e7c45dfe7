"""Priors: frozen text-to-image models used as SDS losses, behind one protocol (see base.py)."""

from __future__ import annotations

from engine.priors.base import Prior, PromptEmbedding, SDSContext

__all__ = ["Prior", "PromptEmbedding", "SDSContext", "check_prior_spec", "load_prior", "PRIOR_HELP"]

PRIOR_HELP = ("embedded (default, shipped in assets/), oracle:<solid> (sphere, cube, cylinder, cone, torus), "
              "gaussian, sd[:<hub id or folder>], if[:<hub id or folder>]")


PRIOR_KINDS = ("embedded", "oracle", "gaussian", "sd", "if")


def check_prior_spec(spec) -> str:
    """The stripped spec if its kind is known (cheap: loads nothing), else ValueError with the choices."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"prior must be a non-empty spec; choose from: {PRIOR_HELP}")
    if spec.strip().partition(":")[0].lower() not in PRIOR_KINDS:
        raise ValueError(f"unknown prior {spec!r}; choose from: {PRIOR_HELP}")
    return spec.strip()


def load_prior(spec: str | None, device="cpu", **kwargs) -> Prior:
    """Build a prior from a spec string such as "embedded", "oracle:cube", "sd:/models/sd21".

    Raises ValueError with one readable line for an unknown spec, and the prior's own error
    (FileNotFoundError / RuntimeError with a message naming what is missing) when loading fails.
    """
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

        return StableDiffusionPrior.from_pretrained(arg or DEFAULT_SD, device=device, **kwargs)
    if kind == "if":
        from engine.priors.deepfloyd import DEFAULT_IF, DeepFloydIFPrior

        return DeepFloydIFPrior.from_pretrained(arg or DEFAULT_IF, device=device, **kwargs)
    raise ValueError(f"unknown prior {spec!r}; choose from: {PRIOR_HELP}")
