"""Gaussian splats: the field (`field`), its rasterizer (`rasterize`), densification (`densify`), .ply files (`ply`)."""

from engine.splats.field import SplatField, blob, splats_from_field
from engine.splats.ply import load_ply, read_ply, write_ply

__all__ = ["SplatField", "blob", "load_ply", "read_ply", "splats_from_field", "write_ply"]
