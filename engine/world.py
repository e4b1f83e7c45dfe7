"""The procedural world: analytic solids at a canonical size and pose, and their colours.

Every solid is a signed distance function (negative inside) in scene units, centred at the origin,
z up, fitting inside a sphere of radius 0.75 (the field's bounding sphere has radius 1). Objects with a
front face it towards +x, the direction of azimuth 0. The oracle prior (tests), the embedded prior's
training data and the evaluation all draw from here.
"""

from __future__ import annotations

import torch
from torch import Tensor

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10),
    "orange": (0.95, 0.50, 0.08),
    "yellow": (0.95, 0.85, 0.15),
    "green": (0.15, 0.70, 0.20),
    "blue": (0.12, 0.30, 0.90),
    "purple": (0.55, 0.20, 0.75),
    "pink": (0.98, 0.55, 0.70),
    "white": (0.92, 0.92, 0.92),
}


def sdf_sphere(x: Tensor, r: float = 0.55) -> Tensor:
    return x.norm(dim=-1) - r


def sdf_box(x: Tensor, half: tuple[float, float, float] = (0.42, 0.42, 0.42)) -> Tensor:
    q = x.abs() - torch.tensor(half, dtype=x.dtype, device=x.device)
    return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)


def sdf_cylinder(x: Tensor, r: float = 0.4, h: float = 0.5) -> Tensor:
    d = torch.stack([x[..., :2].norm(dim=-1) - r, x[..., 2].abs() - h], dim=-1)
    return d.clamp(min=0).norm(dim=-1) + d.max(dim=-1).values.clamp(max=0)


def sdf_cone(x: Tensor, r: float = 0.5, h: float = 1.0) -> Tensor:
    """A cone with its base (radius r) at z = -h/2 and its apex at z = +h/2."""
    z = x[..., 2] + h / 2  # 0 at the base, h at the apex
    q = x[..., :2].norm(dim=-1)
    # distance to the slanted side in the (q, z) half-plane; the side line goes from (r, 0) to (0, h)
    n = torch.tensor([h, r], dtype=x.dtype, device=x.device) / (h * h + r * r) ** 0.5
    side = (q - r) * n[0] + z * n[1]
    return torch.maximum(side, torch.maximum(-z, z - h))


def sdf_torus(x: Tensor, R: float = 0.42, r: float = 0.17) -> Tensor:
    q = torch.stack([x[..., :2].norm(dim=-1) - R, x[..., 2]], dim=-1)
    return q.norm(dim=-1) - r


SOLIDS = {
    "sphere": sdf_sphere,
    "cube": sdf_box,
    "cylinder": sdf_cylinder,
    "cone": sdf_cone,
    "torus": sdf_torus,
}


def solid_sdf(name: str, x: Tensor) -> Tensor:
    """Signed distance of points x [..., 3] to the named solid; raises ValueError for unknown names."""
    try:
        fn = SOLIDS[name]
    except KeyError:
        raise ValueError(f"unknown solid {name!r}; known: {', '.join(SOLIDS)}") from None
    return fn(x)
