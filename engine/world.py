"""The procedural world: analytic solids at a canonical size and pose, their colours, and a renderer.

Every solid is a signed distance function (negative inside) in scene units, centred at the origin,
z up, fitting inside a sphere of radius 0.75 (the field's bounding sphere has radius 1). Objects with a
front face it towards +x, the direction of azimuth 0:

- mug: its handle sticks out towards +y, i.e. on the right of a front view and the left of a back view;
- house: door and two windows on the +x wall, roof ridge along y;
- snowman: orange nose, dark eyes and buttons on the +x side.

The oracle prior (tests), the embedded prior's training data and the evaluation all draw from here.
`render` sphere-traces the solids with the engine's own cameras and shading, so the world looks like
what the trainer renders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.cameras import Cameras, Light
from engine.config import quoted
from engine.ops import dot, max3, norm, normalize, sumsq
from engine.shading import shade

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
DETAIL_COLOR = (0.10, 0.10, 0.12)  # doors, windows, eyes, buttons
ACCENT_COLOR = (1.00, 0.45, 0.05)  # the snowman's carrot nose


def sdf_sphere(x: Tensor, r: float = 0.55) -> Tensor:
    return norm(x) - r


def sdf_box(x: Tensor, half: tuple[float, float, float] = (0.42, 0.42, 0.42)) -> Tensor:
    q = x.abs() - torch.tensor(half, dtype=x.dtype, device=x.device)
    return norm(q.clamp(min=0)) + max3(q).clamp(max=0)


def sdf_cylinder(x: Tensor, r: float = 0.4, h: float = 0.5) -> Tensor:
    d = torch.stack([norm(x[..., :2]) - r, x[..., 2].abs() - h], dim=-1)
    return norm(d.clamp(min=0)) + torch.maximum(d[..., 0], d[..., 1]).clamp(max=0)


def sdf_cone(x: Tensor, r: float = 0.5, h: float = 1.0) -> Tensor:
    """A cone with its base (radius r) at z = -h/2 and its apex at z = +h/2."""
    z = x[..., 2] + h / 2  # 0 at the base, h at the apex
    q = norm(x[..., :2])
    # distance to the slanted side in the (q, z) half-plane; the side line goes from (r, 0) to (0, h)
    n = torch.tensor([h, r], dtype=x.dtype, device=x.device) / (h * h + r * r) ** 0.5
    side = (q - r) * n[0] + z * n[1]
    return torch.maximum(side, torch.maximum(-z, z - h))


def sdf_torus(x: Tensor, R: float = 0.42, r: float = 0.17) -> Tensor:
    q = torch.stack([norm(x[..., :2]) - R, x[..., 2]], dim=-1)
    return norm(q) - r


def _shift(x: Tensor, c: tuple[float, float, float]) -> Tensor:
    return x - torch.tensor(c, dtype=x.dtype, device=x.device)


def _mug_parts(x: Tensor) -> list[Tensor]:
    outer = sdf_cylinder(x, 0.36, 0.42)
    cavity = sdf_cylinder(_shift(x, (0.0, 0.0, 0.08)), 0.29, 0.42)  # open at the top, 0.08 thick bottom
    body = torch.maximum(outer, -cavity)
    # handle: a torus in the y-z plane (axis along x) centred on the +y wall, its inner half cut away
    h = _shift(x, (0.0, 0.36, 0.0))
    ring = torch.stack([norm(h[..., 1:3]) - 0.22, h[..., 0]], -1)
    handle = torch.maximum(norm(ring) - 0.06, -outer)
    return [torch.minimum(body, handle)]


def _house_parts(x: Tensor) -> list[Tensor]:
    walls = sdf_box(_shift(x, (0.0, 0.0, -0.2)), (0.4, 0.4, 0.3))
    # roof: a prism with its ridge along y at z = 0.55, eaves at z = 0.1 overhanging the walls
    rx, rz = x[..., 0].abs(), x[..., 2] - 0.1
    a, h = 0.47, 0.45  # half-width at the eaves, ridge height; the slope is the line x / a + z / h = 1
    slope = (h * rx + a * rz - a * h) / (a * a + h * h) ** 0.5
    roof = torch.maximum(torch.maximum(slope, -rz), x[..., 1].abs() - 0.46)
    body = torch.minimum(walls, roof)
    door = sdf_box(_shift(x, (0.42, 0.0, -0.3)), (0.04, 0.12, 0.2))
    windows = torch.minimum(sdf_box(_shift(x, (0.42, 0.27, -0.12)), (0.03, 0.07, 0.07)),
                            sdf_box(_shift(x, (0.42, -0.27, -0.12)), (0.03, 0.07, 0.07)))
    return [body, torch.minimum(door, windows)]


def _snowman_parts(x: Tensor) -> list[Tensor]:
    balls = torch.minimum(torch.minimum(sdf_sphere(_shift(x, (0, 0, -0.38)), 0.32),
                                        sdf_sphere(_shift(x, (0, 0, 0.08)), 0.24)),
                          sdf_sphere(_shift(x, (0, 0, 0.44)), 0.19))
    dots = [sdf_sphere(_shift(x, c), 0.05) for c in
            ((0.16, 0.08, 0.50), (0.16, -0.08, 0.50), (0.23, 0.0, 0.12), (0.22, 0.0, 0.0), (0.30, 0.0, -0.3))]
    eyes = torch.stack(dots, -1).min(-1).values
    # carrot nose: a cone along +x from the face, base radius 0.06, length 0.24
    n = _shift(x, (0.15, 0.0, 0.43))
    nose = sdf_cone(torch.stack([n[..., 1], n[..., 2], n[..., 0] - 0.12], -1), 0.06, 0.24)
    return [balls, eyes, nose]


SOLIDS = {
    "sphere": sdf_sphere,
    "cube": sdf_box,
    "cylinder": sdf_cylinder,
    "cone": sdf_cone,
    "torus": sdf_torus,
    "mug": lambda x: _mug_parts(x)[0],
    "house": lambda x: torch.stack(_house_parts(x), -1).min(-1).values,
    "snowman": lambda x: torch.stack(_snowman_parts(x), -1).min(-1).values,
}
SHAPES = tuple(SOLIDS)  # every solid has a name in the captions' vocabulary
FRONT_SHAPES = ("mug", "house", "snowman")  # shapes whose front and back differ
PART_COLORS = {"house": (None, DETAIL_COLOR), "snowman": (None, DETAIL_COLOR, ACCENT_COLOR)}  # None: the caption's


def solid_sdf(name: str, x: Tensor) -> Tensor:
    """Signed distance of points x [..., 3] to the named solid; raises ValueError for unknown names."""
    try:
        fn = SOLIDS[name]
    except KeyError:
        raise ValueError(f"unknown solid {quoted(name)}; known: {', '.join(SOLIDS)}") from None
    return fn(x)


def solid_albedo(name: str, x: Tensor, color: Tensor) -> Tensor:
    """Albedo [..., 3] at surface points x [..., 3] of a solid whose main colour is color ([3] or [..., 3])."""
    color = color.expand(*x.shape[:-1], 3)
    if name not in PART_COLORS:
        return color
    parts = {"house": _house_parts, "snowman": _snowman_parts}[name](x)
    which = torch.stack(parts, -1).argmin(-1)
    out = color.clone()
    for i, c in enumerate(PART_COLORS[name]):
        if c is not None:
            out[which == i] = torch.tensor(c, dtype=x.dtype, device=x.device)
    return out


@torch.no_grad()
def _trace(name: str, o: Tensor, d: Tensor, iters: int = 48) -> tuple[Tensor, Tensor]:
    """Sphere-trace rays o, d [N, 3] against a solid. Returns hit points [N, 3] and a hit mask [N]."""
    # start where the ray enters the bounding sphere of radius 1 (solids fit in 0.75)
    b = dot(o, d)
    disc = b * b - sumsq(o) + 1.0
    t = (-b - disc.clamp(min=0).sqrt()).clamp(min=0)
    t_exit = -b + disc.clamp(min=0).sqrt()
    alive = disc > 0
    live = alive.nonzero(as_tuple=True)[0]  # rays still marching: missed and escaped rays are dropped
    for i in range(iters):
        tl = t.index_select(0, live)  # index_select: ~10x faster than t[live] on CPU
        sd = solid_sdf(name, o.index_select(0, live) + tl[:, None] * d.index_select(0, live))
        tl = tl + sd * 0.9  # 0.9: the bound SDFs (cone, roof) overshoot
        t.index_copy_(0, live, tl)
        if i % 8 == 7:  # a ray past its exit from the unit sphere only moves away: it cannot hit
            live = live[tl <= t_exit.index_select(0, live)]
    p = o + t[:, None] * d
    hit = alive & (solid_sdf(name, p).abs() < 4e-3) & (norm(p) < 1.0)
    return p, hit


def _normals(name: str, p: Tensor, eps: float = 2e-3) -> Tensor:
    e = torch.eye(3, dtype=p.dtype, device=p.device) * eps
    g = torch.stack([solid_sdf(name, p + e[i]) - solid_sdf(name, p - e[i]) for i in range(3)], -1)
    return normalize(g, eps=1e-8)


@torch.no_grad()
def render(shapes: list[str], colors: Tensor, cams: Cameras, light: Light, shading: str | list[str], *,
           size: int = 32, supersample: int = 2, background: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Render one solid per camera.

    shapes: B names; colors: [B, 3] albedo; shading: one mode or B modes (engine.shading); background:
    [B, 3] plain colour (white by default). Each pixel averages supersample^2 rays, so edges are soft
    like a volume render's. Returns rgb [B, 3, size, size] in [0, 1] and opacity [B, 1, size, size].
    """
    n, s = len(shapes), size * supersample
    modes = [shading] * n if isinstance(shading, str) else list(shading)
    o, d = cams.rays(s, s)  # [B, s, s, 3]
    rgb = torch.zeros(n, s, s, 3)
    mask = torch.zeros(n, s, s)
    for name in sorted(set(shapes)):
        idx = [i for i in range(n) if shapes[i] == name]
        p, hit = _trace(name, o[idx].reshape(-1, 3), d[idx].reshape(-1, 3))
        nrm = _normals(name, p)

        def per_ray(t: Tensor, idx=idx) -> Tensor:  # per-image values [B, k] -> per-ray [len(idx) * s * s, k]
            return t[idx][:, None, None, :].expand(-1, s, s, -1).reshape(-1, t.shape[-1])

        alb = solid_albedo(name, p, per_ray(colors))
        out = torch.empty_like(p)
        for mode in set(modes[i] for i in idx):
            sel = torch.tensor([modes[i] == mode for i in idx])[:, None].expand(-1, s * s).reshape(-1)
            out[sel] = shade(mode, alb[sel], nrm[sel], p[sel], light_pos=per_ray(light.position)[sel],
                             light_color=per_ray(light.color)[sel], ambient=per_ray(light.ambient[:, None])[sel])
        rgb[idx] = out.reshape(len(idx), s, s, 3)
        mask[idx] = hit.float().reshape(len(idx), s, s)
    bg = torch.ones(n, 3) if background is None else background
    rgb = rgb.permute(0, 3, 1, 2).clamp(0, 1)
    mask = mask[:, None]
    img = rgb * mask + bg[:, :, None, None] * (1 - mask)
    if supersample > 1:
        img, mask = F.avg_pool2d(img, supersample), F.avg_pool2d(mask, supersample)
    return img, mask


# ---------------------------------------------------------------------------------------------------------------
# Scenes and captions: what the embedded prior is trained on and the evaluation renders.

VIEW_WORDS = ("front", "side", "back", "overhead")  # the order of engine.sds.VIEWS
VOCABULARY = ("a", *COLORS, *SHAPES, *VIEW_WORDS, "view")  # every word a caption may contain ("," is dropped)
SYNONYMS = {"an": "a", "the": "a", "box": "cube", "ball": "sphere", "donut": "torus", "ring": "torus",
            "cup": "mug", "grey": "white", "gray": "white", "violet": "purple"}
