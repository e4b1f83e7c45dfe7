"""Exports of a run: snapshots (PNG + checkpoint), orbit videos (mp4, GIF), meshes (glb, obj, ply).

Meshes come two ways: `export_textured_mesh` (engine.texture: decimated, UV-mapped, albedo baked into a
texture; .glb for viewers and engines, .obj + .mtl + .png for DCC tools) and `export_mesh` (marching cubes
with albedo vertex colours, .glb, .obj or .ply, for point and mesh tools such as MeshLab), from a NeRF or from
splats (their summed opacity, engine.mesh).

Slow exports never hold the session lock while they work: `RenderSource.from_trainer` copies the
field, background and occupancy grid (a few milliseconds, under the lock), and everything afterwards
reads the copy while training goes on. Every file is written to a temp name beside its target and
renamed (`engine.checkpoint.atomic_write`), so a crash or an error never leaves a half-written export.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from engine.cameras import Cameras, fixed_views, orbit
from engine.checkpoint import atomic_write, save_checkpoint
from engine.config import LiveParams
from engine.source import MODES, RenderSource, mode_images
from engine.texture import TEXTURED_SUFFIXES, export_textured_mesh

__all__ = ["MODES", "RenderSource", "snapshot", "write_orbit_video", "export_mesh", "export_textured_mesh",
           "TEXTURED_SUFFIXES", "run_folder", "safe_path", "tile"]
VIDEO_SUFFIXES = (".mp4", ".gif")
MESH_SUFFIXES = (".glb", ".obj", ".ply")
ORBIT_DISTANCE, ORBIT_FOCAL = 2.5, 1.0  # the preview cameras' framing: the bounding sphere fills ~80 %


def side_by_side_image(source: RenderSource, cams: Cameras, size: int, live: LiveParams | None = None) -> Tensor:
    """Shaded | normals | depth next to each other, [B, 3, size, 3 * size], from one render."""
    out = source.render(cams, size, size, shading="lambertian", live=live)
    cams = cams.to(out.rgb.device)
    r = source.cfg.field.radius
    return torch.cat([mode_images(out, cams, m, r) for m in ("lambertian", "normal", "depth")], dim=-1)


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


def default_camera(device="cpu") -> Cameras:
    """A three-quarter front view, the framing of the previews."""
    return fixed_views([30.0], [15.0], ORBIT_DISTANCE, ORBIT_FOCAL, device)


def snapshot(source: RenderSource, live: LiveParams | None, run_dir: str | Path, *, camera: Cameras | None = None,
             mode: str = "lambertian", size: int = 256, trainer=None) -> dict:
    """`snapshot-<step>-<mode>.png` of `camera` (several cameras are tiled in a row), and the checkpoint
    of `trainer` when given (saved as it is at the call: hold the session lock for that part, or use
    engine.checkpoint.checkpoint_state under the lock and write_checkpoint afterwards).
    Returns {"png": path[, "checkpoint": run folder]}."""
    size = _check_size(size)
    cams = camera if camera is not None else default_camera()
    image = source.image(cams, size, size, mode, live)
    paths = {"png": save_png(tile(image), Path(run_dir) / f"snapshot-{source.step}-{mode}.png")}
    if trainer is not None:
        save_checkpoint(trainer, run_dir, live or LiveParams())
        paths["checkpoint"] = Path(run_dir)
    return paths


def _check_size(size) -> int:
    if not isinstance(size, int | np.integer) or not 16 <= size <= 2048:
        raise ValueError(f"image size must be an integer in [16, 2048]; got {size!r}")
    return int(size)


# -- videos --------------------------------------------------------------------------------------------
def orbit_frames(source: RenderSource, *, frames: int, size: int, elevation: float, mode: str, side_by_side: bool,
                 live: LiveParams | None, batch: int = 4):
    """Yield uint8 frames [H, W, 3] of a full turn, rendering `batch` views at a time."""
    cams = orbit(frames, elevation, ORBIT_DISTANCE, ORBIT_FOCAL)
    for i in range(0, frames, batch):
        sl = slice(i, min(i + batch, frames))
        part = Cameras(cams.c2w[sl], cams.focal[sl], cams.azimuth[sl], cams.elevation[sl], cams.distance[sl])
        img = side_by_side_image(source, part, size, live) if side_by_side else \
            source.image(part, size, size, mode, live)
        yield from to_uint8(img)


def write_orbit_video(source: RenderSource, path: str | Path, *, frames: int = 120, size: int = 256,
                      elevation: float = 15.0, mode: str = "lambertian", side_by_side: bool = False, fps: int = 30,
                      live: LiveParams | None = None) -> Path:
    """A turntable of the field as .mp4 (H.264 through imageio-ffmpeg) or .gif (Pillow), by suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"cannot write a video to {path.name!r}: the name must end in .mp4 or .gif")
    if not isinstance(frames, int) or not 1 <= frames <= 3600:
        raise ValueError(f"frames must be an integer in [1, 3600]; got {frames!r}")
    if not -89.0 <= float(elevation) <= 89.0:
        raise ValueError(f"elevation must be in [-89, 89] degrees; got {elevation!r}")
    if not 1 <= float(fps) <= 120:
        raise ValueError(f"fps must be in [1, 120]; got {fps!r}")
    if mode not in MODES:
        raise ValueError(f"unknown render mode {mode!r}; choose from {', '.join(MODES)}")
    size = _check_size(size)
    stream = orbit_frames(source, frames=frames, size=size, elevation=float(elevation), mode=mode,
                          side_by_side=side_by_side, live=live)
    writer = write_mp4 if suffix == ".mp4" else write_gif
    return atomic_write(path, lambda tmp: writer(tmp, stream, fps))


def write_mp4(tmp: str, stream, fps: float) -> None:
    """Frames ([H, W, 3] uint8) as an H.264 mp4 at `fps` to the path `tmp` (the caller renames it in place)."""
    import imageio.v2 as imageio

    # yuv420p (what every player decodes) needs even sides: pad odd ones by one pixel instead of letting
    # imageio rescale every frame
    w = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                           pixelformat="yuv420p", macro_block_size=1, ffmpeg_log_level="error")
    try:
        for frame in stream:
            h, wd = frame.shape[:2]
            w.append_data(np.pad(frame, ((0, h % 2), (0, wd % 2), (0, 0)), mode="edge"))
    finally:
        # imageio's `with` skips close() on an error, leaving ffmpeg to write the temp file after it has been
        # removed; closing here waits for ffmpeg to exit first
        w.close()


def write_gif(tmp: str, stream, fps: float) -> None:
    """Frames ([H, W, 3] uint8) as a looping GIF at `fps` to the path `tmp`."""
    # FASTOCTREE quantises a 256^2 frame in about a millisecond; imageio's default (NeuQuant-like) is 100x slower
    images = [Image.fromarray(f).quantize(colors=256, method=Image.Quantize.FASTOCTREE) for f in stream]
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   disposal=1)


# -- meshes --------------------------------------------------------------------------------------------
def export_mesh(source: RenderSource, path: str | Path, resolution: int = 128, threshold: float | None = None,
                decimate: int | None = None) -> Path:
    """Marching-cubes mesh of the field with albedo vertex colours, as .glb, .obj or .ply (by suffix); for a
    UV-textured mesh see `export_textured_mesh`.

    `threshold` None picks the density level where renders show the surface (engine.mesh.auto_threshold);
    `decimate` caps the face count. Raises ValueError, and writes nothing, when no density passes it.
    """
    from engine.mesh import build_mesh

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise ValueError(f"cannot write a mesh to {path.name!r}: the name must end in .glb, .obj or .ply")
    mesh = build_mesh(source, resolution, threshold, decimate)
    # obj gets its vertex colours inline ("v x y z r g b"), which trimesh, Blender and MeshLab read
    return atomic_write(path, lambda tmp: mesh.export(tmp, file_type=suffix[1:]))


# -- where things go -----------------------------------------------------------------------------------
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


def run_folder(root: str | Path, prompt: str, now: datetime | None = None) -> Path:
    """root/<YYYYmmdd-HHMMSS>-<slug>; a numeric suffix keeps two runs started in the same second apart."""
    base = f"{(now or datetime.now()):%Y%m%d-%H%M%S}-{slugify(prompt)}"
    folder, n = Path(root) / base, 2
    while folder.exists():
        folder, n = Path(root) / f"{base}-{n}", n + 1
    return folder


def safe_path(root: str | Path, name: str) -> Path:
    """root/name, or ValueError if `name` could land outside root (absolute, '..', drive, symlink out)."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise ValueError(f"not a usable file name: {name!r}")
    if "\\" in name or PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor \
            or ".." in PurePosixPath(name).parts:
        raise ValueError(f"file name {name!r} must be relative to the run folder, without '..' or a drive")
    root_real = Path(os.path.realpath(root))
    target = root_real / name
    if not Path(os.path.realpath(target)).is_relative_to(root_real):  # a symlink inside root that points out
        raise ValueError(f"file name {name!r} resolves outside the run folder {root}")
    return target
