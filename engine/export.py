"""Exports of a run: PNG images (snapshots and previews). Every file is written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.checkpoint import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] or [C, H, W] in [0, 1] -> [B, H, W, 3] (or [H, W, 3]) uint8; 1 channel is tiled."""
    x = images.detach().float().clamp(0, 1).cpu()
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    return (x.movedim(-3, -1) * 255 + 0.5).to(torch.uint8).numpy()


def tile(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] -> one row [H, B*W, 3] uint8."""
    return np.concatenate(list(to_uint8(images)), axis=1)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    return atomic_write(path, lambda p: Image.fromarray(array).save(p, format="PNG"))


def slugify(text: str, max_len: int = 48) -> str:
    """A file-name-safe slug of a prompt: lowercase ASCII letters, digits and dashes only."""
    out, dash = [], False
    for ch in text.lower():
        if ch.isascii() and ch.isalnum():
            out.append(ch)
            dash = False
        elif not dash and out:
            out.append("-")
            dash = True
    slug = "".join(out).strip("-")[:max_len].strip("-")
    return slug or "untitled"
