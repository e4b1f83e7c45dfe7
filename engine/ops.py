"""Small tensor ops for [..., 3] data that are slow in their obvious form on CPU.

torch reduces over a trailing dimension of size 3 (`.sum(-1)`, `.norm(dim=-1)`, `.max(-1)`) about 4-6x
slower than a matrix product with a constant vector does the same sum on this CPU (200k points: 2.5 ms
vs 0.4-0.6 ms, one thread). The renderer, field, shading and the analytic world do these on every sample,
so they go through here. Results equal the plain forms up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _ones(x: Tensor, keepdim: bool) -> Tensor:
    n = x.shape[-1]
    return x.new_ones(n, 1) if keepdim else x.new_ones(n)


def dot(a: Tensor, b: Tensor, keepdim: bool = False) -> Tensor:
    """(a * b).sum(-1)."""
    p = a * b
    return p @ _ones(p, keepdim)


def sumsq(x: Tensor, keepdim: bool = False) -> Tensor:
    """(x * x).sum(-1)."""
    return x.square() @ _ones(x, keepdim)


def norm(x: Tensor, keepdim: bool = False, eps: float = 0.0) -> Tensor:
    """max(|x|, eps) over the last dim. Its gradient at x = 0 is 0, as torch.norm's (the clamp, or the
    mask, comes before the square root, whose own gradient at 0 is infinite)."""
    s = sumsq(x, keepdim)
    if eps > 0:
        return s.clamp(min=eps * eps).sqrt()
    pos = s > 0
    return torch.where(pos, torch.where(pos, s, torch.ones_like(s)).sqrt(), torch.zeros_like(s))


def normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / max(|x|, eps) over the last dim."""
    return x / norm(x, keepdim=True, eps=eps)


def max3(x: Tensor) -> Tensor:
    """x.max(-1).values for a trailing dim of size 3."""
    a, b, c = x.unbind(-1)
    return torch.maximum(torch.maximum(a, b), c)


def min3(x: Tensor) -> Tensor:
    """x.min(-1).values for a trailing dim of size 3."""
    a, b, c = x.unbind(-1)
    return torch.minimum(torch.minimum(a, b), c)


def grid_sample_3d(grid: Tensor, x: Tensor) -> Tensor:
    """Trilinear samples of grid [1, C, D, H, W] at points x [N, 3] in [-1, 1] (x along W, y along H, z along
    D), as `F.grid_sample(..., mode="bilinear", padding_mode="border", align_corners=True)`: [C, N].

    On CPU the 3D kernel's backward is ~5x its forward (25 of 30 ms for 32k samples of a 32^3 x 7 grid, one
    thread) while the 2D kernel is vectorized. So the D slices are stacked into one tall image
    [C, D * H, W], each point is sampled bilinearly in the two slices around it, and the two are blended
    along z: the same values up to float rounding of the row coordinate (~1e-4 of a cell), fwd+bwd ~1.7x
    faster. Elsewhere the 3D kernel is used as is.
    """
    if grid.device.type != "cpu":
        out = F.grid_sample(grid, x.view(1, 1, 1, -1, 3), mode="bilinear", padding_mode="border", align_corners=True)
        return out.view(grid.shape[1], -1)
    _, C, D, H, W = grid.shape
    tall = grid.reshape(1, C, D * H, W)
    z = ((x[:, 2] + 1) * (0.5 * (D - 1))).clamp(0, D - 1)
    z0 = z.floor().clamp(max=max(D - 2, 0))
    y = ((x[:, 1] + 1) * (0.5 * (H - 1))).clamp(0, H - 1)
    row = z0 * H + y  # in slice z0; the same point in slice z0 + 1 is H rows further
    rows = torch.cat([row, row + H]) * (2.0 / max(D * H - 1, 1)) - 1.0
    coords = torch.stack([x[:, 0].repeat(2), rows], -1).view(1, 1, -1, 2)
    s = F.grid_sample(tall, coords, mode="bilinear", padding_mode="border", align_corners=True).view(C, 2, -1)
    if D == 1:
        return s[:, 0]
    return torch.lerp(s[:, 0], s[:, 1], (z - z0)[None])
