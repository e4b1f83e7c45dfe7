"""Meshes from a field: marching cubes on the density, vertex colours from the albedo, optional decimation.

The surface is the level set sigma = threshold. By default the threshold is taken from what renders
show (`auto_threshold`): a few views are rendered, and at every pixel whose opacity passes 0.5 the
density is read at the expected depth of that ray, i.e. where the renderer puts the surface; the
median of those densities is the level. A fixed rule such as "the density at which one render sample
reaches alpha 0.5" ignores how soft the field's edge is: on a sphere whose density ramps over a
couple of hundredths of a unit it puts the surface outside the rendered one (+14 % volume), while
the level read from renders lands within a few percent.

A splat field (`engine.splats`) is cut the same way, from its summed opacity sum_i o_i exp(-d_i^2 / 2) (the
quantity DreamGaussian extracts meshes from; it adds its Gaussians to the lattice itself, each widened by one
lattice step so thin ones are not lost between lattice points), at 0.5, where one Gaussian's level set has the
silhouette its renders show at opacity 0.5 (`splat_threshold`; lower for a faint cloud), and cavities inside the
level set are filled: splats sit on the surface, so their summed opacity is a shell, and marching cubes would
otherwise add an inner wall facing inwards.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from engine.cameras import fixed_views

# Views that see a centred object from all sides, below included (azimuth, elevation in degrees).
_PROBE_VIEWS = ((0.0, 15.0), (90.0, 15.0), (180.0, 15.0), (270.0, 15.0), (45.0, 80.0), (225.0, -60.0))
SPLAT_LEVEL = 0.5  # a splat field's summed opacity at its surface (splat_threshold says why)


def empty_message(threshold: float, peak: float) -> str:
    return (f"nothing above the density threshold {threshold:.4g} (the field's largest density is {peak:.4g}); "
            "the field is empty here: train longer or pass a lower threshold")


@torch.no_grad()
def auto_threshold(source, size: int = 32, samples: int = 256) -> float:
    """The median density at the point where a ray's opacity reaches 0.5, over rays of a few views.

    That point is where a render shows the surface, so the level set sigma = threshold puts the mesh
    where the renders put it, whatever the softness of the field's edge. Rays are marched finely
    (`samples` over the chord of the bounding sphere), the crossing is interpolated between samples, and
    only rays that meet the surface within ~45 degrees of head-on count.
    """
    from engine.render import sphere_intersect

    cams = fixed_views([a for a, _ in _PROBE_VIEWS], [e for _, e in _PROBE_VIEWS], distance=2.5, focal=1.0)
    o, d = (t.reshape(-1, 3).to(source.device) for t in cams.to(source.device).rays(size, size))
    near, far, hit = sphere_intersect(o, d, source.field.cfg.radius)
    o, d, near, far = o[hit], d[hit], near[hit], far[hit]
    step = (far - near) / samples  # [R]
    t = near[:, None] + step[:, None] * (torch.arange(samples, device=o.device) + 0.5)  # [R, S]
    query = source.field.prepare()
    x = o[:, None] + d[:, None] * t[..., None]
    sigma = torch.cat([query.density(p) for p in x.reshape(-1, 3).split(1 << 18)]).view(t.shape).float()
    depth = (sigma * step[:, None]).cumsum(-1)  # optical depth after each sample
    crossed = depth >= math.log(2.0)  # transmittance exp(-depth) <= 0.5
    rays = crossed.any(-1)
    if not bool(rays.any()):
        raise ValueError("nothing above the density threshold: no ray through the field reaches 50 % opacity; "
                         "the field is empty: train longer or pass a threshold")
    i = crossed[rays].float().argmax(-1)[:, None]  # first sample past the crossing, per ray
    dep, inc = depth[rays], (sigma * step[:, None])[rays]
    before = (dep.gather(1, i) - inc.gather(1, i))[:, 0]  # optical depth entering sample i
    frac = ((math.log(2.0) - before) / inc.gather(1, i)[:, 0].clamp(min=1e-12)).clamp(0, 1)
    t_cross = t[rays].gather(1, i)[:, 0] + (frac - 0.5) * step[rays]
    x_cross = o[rays] + d[rays] * t_cross[:, None]
    s = query.samples(x_cross)
    # grazing rays cross 0.5 far out in a soft edge's tail; the surface is what rays meeting it head-on see
    facing = -(s.normal * d[rays]).sum(-1) > 0.7
    level = s.density[facing] if int(facing.sum()) >= 16 else s.density
    return float(level.median())


def lattice_blur(field, resolution: int) -> float:
    """The std (world units) a splat field's Gaussians are widened by for a lattice of `resolution`: one lattice
    step, so a Gaussian thinner than the lattice loses at most 20 % of its peak between lattice points (0 for NeRFs)."""
    return 1.5 * field.cfg.radius / (int(resolution) - 1) if field.rasterized else 0.0


def mesh_query(field, resolution: int):
    """The field prepared as meshes of `resolution` read it (splats widened by `lattice_blur`)."""
    return field.prepare(blur=lattice_blur(field, resolution)) if field.rasterized else field.prepare()


@torch.no_grad()
def splat_threshold(source, resolution: int = 128, size: int = 32, rays: int = 256) -> float:
    """The summed-opacity level a splat field's mesh is cut at: SPLAT_LEVEL (0.5), or half the typical peak where
    the renders are opaque when the field never gets that dense.

    Why 0.5: for one Gaussian, a ray's render opacity is the largest summed opacity along the ray (the 2D
    footprint is the 3D Gaussian's peak along the ray), so the level set {sum >= 0.5} has the silhouette the
    renders show at opacity 0.5, the NeRF's rule (`auto_threshold`). Overlapping splats on a surface sum to more
    than 0.5 (DreamGaussian cuts at 1), but a cloud of faint ones renders opaque where no point reaches 0.5: the
    median, over rays opaque in renders from the probe views, of the largest summed opacity along the ray (the
    field as the lattice of `resolution` holds it, `mesh_query`) bounds the level at half of it.
    """
    from engine.render import sphere_intersect

    cams = fixed_views([a for a, _ in _PROBE_VIEWS], [e for _, e in _PROBE_VIEWS], distance=2.5, focal=1.0)
    alpha = source.render(cams, size, size, shading="albedo").opacity[:, 0].reshape(-1)  # [B * H * W]
    o, d = (t.reshape(-1, 3).to(source.device) for t in cams.to(source.device).rays(size, size))
    near, far, hit = sphere_intersect(o, d, source.field.cfg.radius)
    opaque = ((alpha >= 0.5).to(o.device) & hit).nonzero().squeeze(1)
    if opaque.numel() == 0:
        raise ValueError("nothing above the density threshold: no pixel of the splats' renders reaches 50 % opacity; "
                         "the field is empty: train longer or pass a threshold")
    pick = opaque[torch.linspace(0, len(opaque) - 1, min(rays, len(opaque))).long()]
    o, d, near, far = o[pick], d[pick], near[pick], far[pick]
    # samples a quarter of the lattice blur apart: a thin Gaussian's peak is not stepped over
    samples = min(2048, max(256, int(8 * source.field.cfg.radius / lattice_blur(source.field, resolution))))
    t = near[:, None] + (far - near)[:, None] * (torch.arange(samples, device=o.device) + 0.5) / samples  # [R, S]
    query = mesh_query(source.field, resolution)
    x = (o[:, None] + d[:, None] * t[..., None]).reshape(-1, 3)
    peak = torch.cat([query.density(p) for p in x.split(1 << 16)]).view(t.shape).amax(-1)
    return min(SPLAT_LEVEL, 0.5 * float(peak.float().median()))


def fill_cavities(volume: np.ndarray, level: float) -> np.ndarray:
    """`volume` with every region enclosed by {volume >= level} raised to its largest value: one outer wall."""
    from scipy.ndimage import binary_fill_holes

    solid = volume >= level
    cavity = binary_fill_holes(solid) & ~solid
    return np.where(cavity, max(float(volume.max()), level), volume).astype(np.float32)


@torch.no_grad()
def sample_density(field, resolution: int, device="cpu", chunk: int = 1 << 18) -> tuple[np.ndarray, float]:
    """sigma on a resolution^3 lattice spanning the bounding cube [-r, r]^3, indexed [x, y, z].

    Points outside the bounding sphere are not evaluated (the field is zero there by definition); a splat field
    adds its Gaussians, widened by `lattice_blur`, to the lattice itself (`SplatField.density_lattice`). Returns
    the volume (float32) and the lattice spacing.
    """
    r = field.cfg.radius
    if field.rasterized:
        volume = field.density_lattice(resolution, lattice_blur(field, resolution))
        return volume.float().cpu().numpy(), 2.0 * r / (resolution - 1)
    lin = torch.linspace(-r, r, resolution)
    out = torch.zeros(resolution**3)
    query = field.prepare()
    # walk the lattice one x-slab at a time so memory stays at a few slabs, even at 512^3
    yy, zz = torch.meshgrid(lin, lin, indexing="ij")
    yz = torch.stack([yy, zz], -1).view(-1, 2)
    slab = resolution * resolution
    for i, xv in enumerate(lin):
        x = torch.cat([torch.full((slab, 1), float(xv)), yz], -1)
        inside = (x.norm(dim=-1) <= r).nonzero()[:, 0]
        vals = torch.zeros(slab)
        for part in inside.split(chunk):
            vals[part] = query.density(x[part].to(device)).float().cpu()
        out[i * slab:(i + 1) * slab] = vals
    return out.view(resolution, resolution, resolution).numpy(), 2.0 * r / (resolution - 1)


def marching_cubes(volume: np.ndarray, level: float, spacing: float, origin: float) -> tuple[np.ndarray, np.ndarray]:
    """Closed triangle mesh of {volume >= level}: vertices [V, 3] in world units, faces [F, 3], outward."""
    from skimage import measure

    # a zero border closes the surface where the density touches the edge of the lattice
    padded = np.pad(volume, 1, mode="constant", constant_values=min(0.0, float(volume.min())))
    verts, faces, _, _ = measure.marching_cubes(padded, level=level, spacing=(spacing,) * 3,
                                                gradient_direction="descent")
    verts = verts - spacing + origin  # undo the one-voxel pad, move to world coordinates
    return verts.astype(np.float32), faces.astype(np.int64)


def cluster_decimate(verts: np.ndarray, faces: np.ndarray, colors: np.ndarray, target_faces: int):
    """Vertex-clustering decimation to at most `target_faces` faces (no extra dependency, deterministic).

    Vertices in one cubic cell merge into their mean (colour too); faces that collapse are dropped.
    The cell size is searched so the face count lands just under the target.
    """
    if target_faces < 4:
        raise ValueError(f"decimate must be at least 4 faces; got {target_faces}")
    if len(faces) <= target_faces:
        return verts, faces, colors
    extent = float(np.ptp(verts, axis=0).max()) or 1.0
    lo, hi = 0.0, extent  # cell sizes: lo gives too many faces, hi few enough
    best = _cluster(verts, faces, colors, hi)
    for _ in range(14):
        mid = (lo + hi) / 2
        v, f, c = _cluster(verts, faces, colors, mid)
        if len(f) <= target_faces:
            hi, best = mid, (v, f, c)
        else:
            lo = mid
    return best


def _cluster(verts, faces, colors, cell):
    keys = np.floor((verts - verts.min(0)) / cell).astype(np.int64)
    _, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    n = len(counts)
    new_v = np.zeros((n, 3))
    np.add.at(new_v, inv, verts)
    new_c = np.zeros((n, colors.shape[1]))
    np.add.at(new_c, inv, colors.astype(np.float64))
    new_v /= counts[:, None]
    new_c /= counts[:, None]
    f = inv[faces]
    keep = (f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])
    f = np.unique(f[keep], axis=0)
    used = np.unique(f)  # drop vertices no face refers to any more
    remap = np.full(n, -1)
    remap[used] = np.arange(len(used))
    return new_v[used].astype(np.float32), remap[f], np.round(new_c[used]).astype(np.uint8)


@torch.no_grad()
def vertex_albedo(field, verts: np.ndarray, device="cpu", chunk: int = 1 << 18, query=None) -> np.ndarray:
    """RGBA uint8 [V, 4] from the field's albedo at the vertices (read through `query`, else the field's own)."""
    query = query or field.prepare()
    x = torch.from_numpy(verts).float()
    rgb = torch.cat([query.samples(p.to(device)).albedo.float().cpu() for p in x.split(chunk)]) if len(x) else torch.zeros(0, 3)
    rgba = torch.cat([rgb.clamp(0, 1), torch.ones(len(rgb), 1)], -1)
    return (rgba * 255 + 0.5).to(torch.uint8).numpy()


def surface(source, resolution: int = 128, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Marching cubes on the field's density (a splat field's summed opacity, its cavities filled): vertices [V, 3],
    faces [F, 3] and the density level used.
    ValueError when the resolution is out of range or nothing is solid."""
    if not 16 <= int(resolution) <= 1024:
        raise ValueError(f"mesh resolution must be in [16, 1024]; got {resolution}")
    splats = source.field.rasterized
    level = ((splat_threshold(source, resolution) if splats else auto_threshold(source)) if threshold is None
             else float(threshold))
    if not np.isfinite(level) or level <= 0:
        raise ValueError(f"the density threshold must be a positive number; got {threshold!r}")
    volume, spacing = sample_density(source.field, int(resolution), source.device)
    if splats:
        volume = fill_cavities(volume, level)
    peak = float(volume.max())
    if peak <= level:
        raise ValueError(empty_message(level, peak))
    verts, faces = marching_cubes(volume, level, spacing, -source.field.cfg.radius)
    if len(faces) == 0:
        raise ValueError(empty_message(level, peak))
    return verts, faces, level


def build_mesh(source, resolution: int = 128, threshold: float | None = None, decimate: int | None = None):
    """A trimesh.Trimesh of the field's surface with vertex colours. ValueError when nothing is solid."""
    import trimesh

    verts, faces, level = surface(source, resolution, threshold)
    colors = vertex_albedo(source.field, verts, source.device, query=mesh_query(source.field, resolution))
    if decimate:
        verts, faces, colors = cluster_decimate(verts, faces, colors, int(decimate))
    mesh = trimesh.Trimesh(vertices=verts, faces=faces, vertex_colors=colors, process=False)
    if mesh.volume < 0:  # skimage's winding depends on the gradient convention: make the normals face out
        mesh.invert()
    mesh.metadata["density_threshold"] = level
    return mesh
