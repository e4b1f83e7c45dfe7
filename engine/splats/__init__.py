"""Gaussian splats: the field, its rasterizer, densification and .ply files."""

from engine.splats.field import SplatField, blob, splats_from_field
from engine.splats.ply import load_ply, read_ply, write_ply
from engine.splats.rasterize import project, rasterize, render_splats

__all__ = ["SplatField", "blob", "load_ply", "project", "rasterize", "read_ply", "render_splats", "splats_from_field",
           "write_ply"]
