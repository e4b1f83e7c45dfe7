"""Shading: the paper's diffuse model and the modes a step or the viewer may pick.

    c = rho * (l_rho * max(0, n . (l - mu) / |l - mu|) + l_a)

with albedo rho, light colour l_rho at position l, ambient l_a, surface point mu and normal
n = -grad(tau) / |grad(tau)|. "textureless" sets rho to white, "albedo" returns rho unshaded,
"normal" shows (n + 1) / 2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.config import ShadingConfig
from engine.ops import dot, normalize

MODES = ("albedo", "lambertian", "textureless", "normal")


def shade(mode: str, albedo: Tensor, normal: Tensor, points: Tensor, *, light_pos: Tensor, light_color: Tensor,
          ambient: Tensor) -> Tensor:
    """Colour of samples. albedo, normal, points: [..., 3]; light_pos, light_color: [..., 3] broadcastable;
    ambient: [..., 1] broadcastable. Returns [..., 3]."""
    if mode == "albedo":
        return albedo
    if mode == "normal":
        return (normal + 1.0) * 0.5
    if mode not in ("lambertian", "textureless"):
        raise ValueError(f"unknown shading mode {mode!r}; choose from {', '.join(MODES)}")
    to_light = light_pos - points
    diffuse = dot(normal, normalize(to_light), keepdim=True).clamp(min=0.0)
    rho = torch.ones_like(albedo) if mode == "textureless" else albedo
    return rho * (light_color * diffuse + ambient)


def pick_shading(live_mode: str, cfg: ShadingConfig, step: int, generator: torch.Generator) -> str:
    """The shading of one training step: the live mode if fixed, else the paper's random mix."""
    if live_mode != "random":
        return live_mode
    u = torch.rand((), generator=generator, device=generator.device).item()  # always drawn: keeps runs repeatable
    if step < cfg.albedo_only_steps:
        return "albedo"
    total = cfg.p_albedo + cfg.p_lambertian + cfg.p_textureless
    u *= total
    if u < cfg.p_albedo:
        return "albedo"
    if u < cfg.p_albedo + cfg.p_lambertian:
        return "lambertian"
    return "textureless"
