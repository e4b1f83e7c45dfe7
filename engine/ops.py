"""Small tensor ops for [..., 3] data that are slow in their obvious form on CPU.

torch reduces over a trailing dimension of size 3 (`.sum(-1)`, `.norm(dim=-1)`, `.max(-1)`) about 4-6x
slower than a matrix product with a constant vector does the same sum on this CPU (200k points: 2.5 ms
vs 0.4-0.6 ms, one thread). The renderer, field, shading and the analytic world do these on every sample,
so they go through here. Results equal the plain forms up to float rounding.
"""

from __future__ import annotations

import torch
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
