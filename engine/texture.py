"""Textured meshes of a field: marching cubes -> clean-up -> decimation -> UV atlas -> baked albedo texture.

The pipeline, one function per stage (`export_textured_mesh` runs them all and times each):
1. `engine.mesh.surface`: marching cubes on the density at the level renders show.
2. `clean`: connected parts far smaller than the largest (floaters of a trained field) are dropped; or
   only the largest part is kept.
3. `decimate`: quadric edge collapse to a face budget (fast-simplification, what trimesh's
   `simplify_quadric_decimation` wraps).
4. `uv_atlas`: xatlas cuts the mesh into charts and packs them into the square texture, with a few
   texels of padding between charts.
5. `bake`: every UV triangle is rasterised into texel space; a covered texel's barycentric coordinates
   give its 3D point on the mesh, where the field's albedo is read (in chunks, without autograd).
   Optionally a second, lit texture (the paper's lambertian shading under a fixed point light) for
   viewers that do no lighting.
6. `dilate`: every empty texel takes the colour of the nearest baked one, so bilinear filtering and
   mipmaps at chart borders never pull in background.
7. `write_textured`: .glb (a PBR base-colour texture, embedded) or .obj + .mtl + .png, each file written
   atomically; on an error the files this call already wrote are removed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from engine.checkpoint import atomic_write

TEXTURED_SUFFIXES = (".glb", ".obj")
FACE_RANGE = (100, 2_000_000)  # a face budget outside it is refused
TEXTURE_RANGE = (64, 4096)  # texture side in texels
MIN_PART = 0.01  # `clean` drops parts with fewer faces than this fraction of the largest part's
CHART_FACES = 300  # the UV atlas's charts hold about this many faces' worth of area at most (see uv_atlas)
PADDING = 4  # texels between charts in the atlas (at 1024^2; scaled with the texture side)


def check_budget(faces, texture) -> tuple[int, int]:
    """(faces, texture) as ints, or ValueError naming the bad one."""
    lo, hi = FACE_RANGE
    if isinstance(faces, bool) or not isinstance(faces, int | np.integer) or not lo <= faces <= hi:
        raise ValueError(f"face budget must be an integer in [{lo}, {hi}]; got {faces!r}")
    lo, hi = TEXTURE_RANGE
    if isinstance(texture, bool) or not isinstance(texture, int | np.integer) or not lo <= texture <= hi:
        raise ValueError(f"texture size must be an integer in [{lo}, {hi}] texels; got {texture!r}")
    return int(faces), int(texture)


# -- 2. clean-up ------------------------------------------------------------------------------------------
def clean(verts: np.ndarray, faces: np.ndarray, *, largest_only: bool = False,
          min_part: float = MIN_PART) -> tuple[np.ndarray, np.ndarray]:
    """Drop connected parts with fewer than `min_part` x the largest part's faces (or all but the largest),
    and the vertices no face uses any more."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(verts)
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    face_label = label[faces[:, 0]]
    sizes = np.bincount(face_label)
    keep_parts = sizes == sizes.max() if largest_only else sizes >= min_part * sizes.max()
    if largest_only:  # one part even when two tie
        keep_parts[:] = False
        keep_parts[int(sizes.argmax())] = True
    return compact(verts, faces[keep_parts[face_label]])


def compact(verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vertices `faces` use, renumbered."""
    used, inverse = np.unique(faces, return_inverse=True)
    return verts[used], inverse.reshape(faces.shape).astype(np.int64)


# -- 3. decimation ----------------------------------------------------------------------------------------
def decimate(verts: np.ndarray, faces: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric edge-collapse decimation to about `target` faces (unchanged when already within it)."""
    import fast_simplification

    if len(faces) <= target:
        return verts, faces
    v, f = fast_simplification.simplify(verts.astype(np.float64), faces.astype(np.int32), target_count=int(target))
    # the collapses now and then fold a pair of faces onto each other (the same three points, back to back, at
    # times through distinct but coincident vertices): a zero-volume flap. Weld coincident vertices, then drop
    # both copies of such faces, and faces left degenerate: the surface stays closed
    v, weld = np.unique(v.astype(np.float32), axis=0, return_inverse=True)
    f = weld.reshape(-1)[f]
    _, inverse, counts = np.unique(np.sort(f, axis=1), axis=0, return_inverse=True, return_counts=True)
    keep = (counts[inverse.reshape(-1)] == 1) & (f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])
    return compact(v, f[keep].astype(np.int64))


# -- 4. UV atlas ------------------------------------------------------------------------------------------
def uv_atlas(verts: np.ndarray, faces: np.ndarray, texture: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas charts packed into one texture-sized square. Returns vertices [V', 3] (seams split vertices),
    faces [F, 3] and UVs [V', 2] in [0, 1], v up (OBJ's and trimesh's convention)."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(verts, dtype=np.float32), np.ascontiguousarray(faces, dtype=np.uint32))
    charts = xatlas.ChartOptions()
    # xatlas grows charts over a smooth surface for a long time (9 s for a 20k-face sphere, 45 s at 100k); charts
    # capped at about CHART_FACES faces' worth of area take a tenth to a quarter of that, for more seams
    charts.max_chart_area = _area(verts, faces) * CHART_FACES / len(faces)
    pack = xatlas.PackOptions()
    pack.resolution = int(texture)  # with texels_per_unit left at 0, xatlas picks it to fill about this square
    pack.padding = max(2, round(PADDING * texture / 1024))
    pack.bilinear = True
    pack.blockAlign = True
    atlas.generate(chart_options=charts, pack_options=pack)
    if atlas.atlas_count != 1:
        raise ValueError(f"the UV atlas needs {atlas.atlas_count} textures: lower the face budget")
    vmap, new_faces, uvs = atlas.get_mesh(0)
    # xatlas only aims at the resolution (its atlas may come out a little smaller or larger, and not square):
    # scale its texel coordinates into the square, keeping the aspect
    uvs = uvs * np.array([atlas.width, atlas.height], dtype=np.float32) / max(atlas.width, atlas.height)
    uvs[:, 1] = 1.0 - uvs[:, 1]  # xatlas's v grows downwards with the image rows
    return verts[vmap.astype(np.int64)], new_faces.astype(np.int64), uvs.astype(np.float32)


# -- 5. bake ----------------------------------------------------------------------------------------------
def cover(tri: np.ndarray, width: int, height: int, max_pairs: int = 1 << 21):
    """Pixel centres inside 2D triangles, in chunks. tri: [F, 3, 2] in pixel units (x right, y down; pixel
    (i, j) has its centre at (i + 0.5, j + 0.5)). Yields (face [N], x [N], y [N], barycentric [N, 3])."""
    lo = np.clip(np.ceil(tri.min(1) - 0.5), 0, [width, height]).astype(np.int64)  # first centre >= min
    hi = np.clip(np.floor(tri.max(1) - 0.5), -1, [width - 1, height - 1]).astype(np.int64)
    n = np.maximum(hi - lo + 1, 0)  # [F, 2] pixels per axis in each triangle's box
    count = n[:, 0] * n[:, 1]
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    count[np.abs(area) < 1e-12] = 0
    ends = np.cumsum(count)
    start = 0
    while start < len(tri):  # faces [start, stop) hold at most max_pairs box pixels (at least one face)
        base = int(ends[start - 1]) if start else 0  # box pixels of the faces before this chunk
        stop = max(start + 1, int(np.searchsorted(ends, base + max_pairs, "right")))
        f = np.repeat(np.arange(start, stop), count[start:stop])
        k = np.arange(len(f)) - np.repeat(ends[start:stop] - count[start:stop] - base, count[start:stop])
        x, y = lo[f, 0] + k % n[f, 0], lo[f, 1] + k // n[f, 0]
        px, py = x + 0.5, y + 0.5
        # barycentric coordinates from the sub-triangles' signed areas
        w1 = ((px - a[f, 0]) * (c[f, 1] - a[f, 1]) - (py - a[f, 1]) * (c[f, 0] - a[f, 0])) / area[f]
        w2 = ((b[f, 0] - a[f, 0]) * (py - a[f, 1]) - (b[f, 1] - a[f, 1]) * (px - a[f, 0])) / area[f]
        bary = np.stack([1.0 - w1 - w2, w1, w2], -1)
        inside = (bary >= -1e-6).all(-1)
        yield f[inside], x[inside], y[inside], bary[inside]
        start = stop


@torch.no_grad()
def bake(source, verts: np.ndarray, faces: np.ndarray, uvs: np.ndarray, size: int, *, lit=None,
         chunk: int = 1 << 17, query=None) -> dict:
    """Albedo (and, with a `lit` LiveParams, lambertian under its light) read at every covered texel's point,
    through `query` (the field as the mesh was cut from it, `engine.mesh.mesh_query`; else the field's own).

    Returns {"albedo": [S, S, 3] float32, "lit": same or None, "filled": [S, S] bool}."""
    tex = np.stack([uvs[:, 0] * size, (1.0 - uvs[:, 1]) * size], -1)[faces]  # [F, 3, 2] texel space
    images = {"albedo": np.zeros((size, size, 3), np.float32)}
    if lit is not None:
        images["lit"] = np.zeros((size, size, 3), np.float32)
        light = _light_of(lit, source.device)
    filled = np.zeros((size, size), bool)
    query = query or source.field.prepare()
    for f, x, y, bary in cover(tex, size, size, max_pairs=chunk):
        points = torch.from_numpy(np.einsum("nk,nkd->nd", bary, verts[faces[f]]).astype(np.float32))
        s = query.samples(points.to(source.device))
        images["albedo"][y, x] = s.albedo.float().clamp(0, 1).cpu().numpy()
        if lit is not None:
            from engine.shading import shade

            rgb = shade("lambertian", s.albedo, s.normal, points.to(source.device), **light)
            images["lit"][y, x] = rgb.float().clamp(0, 1).cpu().numpy()
        filled[y, x] = True
    return {"albedo": images["albedo"], "lit": images.get("lit"), "filled": filled}


def _light_of(live, device) -> dict:
    """The baked light: a point light at the live parameters' fixed position, whatever their light mode
    (a light at a camera or a random one has no meaning for a texture)."""
    from engine.cameras import spherical

    one = torch.ones(1)
    pos = spherical(one * live.light_azimuth, one * live.light_elevation, one * live.light_distance)
    return {"light_pos": pos.to(device), "light_color": torch.tensor([live.light_color], device=device),
            "ambient": torch.tensor([[float(live.ambient)]], device=device)}


# -- 6. dilation ------------------------------------------------------------------------------------------
def dilate(image: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """Every texel outside `filled` takes the colour of the nearest filled texel (exact Euclidean nearest)."""
    from scipy.ndimage import distance_transform_edt

    if not filled.any():
        raise ValueError("the bake covered no texel: the mesh has no area in UV space")
    _, (iy, ix) = distance_transform_edt(~filled, return_distances=True, return_indices=True)
    return image[iy, ix]


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


# -- 7. files ---------------------------------------------------------------------------------------------
def textured_trimesh(verts: np.ndarray, faces: np.ndarray, uvs: np.ndarray, image: np.ndarray, name: str = "albedo"):
    """A trimesh.Trimesh with UVs and a PBR material whose base colour is `image` ([S, S, 3] uint8), matte."""
    import trimesh
    from PIL import Image

    material = trimesh.visual.material.PBRMaterial(name=name, baseColorTexture=Image.fromarray(image),
                                                   metallicFactor=0.0, roughnessFactor=1.0)
    visual = trimesh.visual.TextureVisuals(uv=uvs, material=material)
    return trimesh.Trimesh(vertices=verts, faces=faces, visual=visual, process=False)


def write_textured(mesh, path: str | Path, lit: np.ndarray | None = None) -> list[Path]:
    """`path` (.glb, or .obj with <stem>.mtl and <stem>.png beside it) and, with `lit`, <stem>_lit.png.

    Each file is written atomically; if one fails, the ones already written by this call are removed, so an
    error leaves no export behind. Returns the paths written, the mesh file first."""
    path = Path(path)
    files: dict[Path, object] = {}  # path -> bytes or a callable writing to a temp path, in writing order
    if lit is not None:
        files[path.with_name(f"{path.stem}_lit.png")] = _png_writer(lit)
    if path.suffix.lower() == ".glb":
        files[path] = mesh.export(file_type="glb")
    else:
        files.update(_obj_files(mesh, path))
    written: list[Path] = []
    try:
        for target, data in files.items():
            writer = data if callable(data) else (lambda tmp, data=data: Path(tmp).write_bytes(data))
            written.append(atomic_write(target, writer))
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return [path] + [p for p in written if p != path]


def _png_writer(image: np.ndarray):
    from PIL import Image

    return lambda tmp: Image.fromarray(image).save(tmp, format="PNG")


def _obj_files(mesh, path: Path) -> dict:
    """<stem>.png, <stem>.mtl, then the .obj (last: it names the other two), as bytes."""
    import trimesh
    from trimesh.exchange.obj import export_obj

    image = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"))
    # a plain OBJ material: white diffuse (readers that multiply Kd by map_Kd keep the texture's colours), no shine
    simple = trimesh.visual.material.SimpleMaterial(name=path.stem, diffuse=(255, 255, 255, 255),
                                                    ambient=(255, 255, 255, 255), specular=(0, 0, 0, 255))
    obj = mesh.copy()
    obj.visual = trimesh.visual.TextureVisuals(uv=mesh.visual.uv, material=simple)
    text, extra = export_obj(obj, include_normals=False, include_texture=True, return_texture=True,
                             write_texture=False, mtl_name=f"{path.stem}.mtl")
    mtl = extra[f"{path.stem}.mtl"].decode()
    png = f"{path.stem}.png"
    mtl = "\n".join(line for line in mtl.splitlines() if not line.startswith("map_Kd")) + f"\nmap_Kd {png}\n"
    return {path.with_name(png): _png_writer(image), path.with_name(f"{path.stem}.mtl"): mtl.encode(),
            path: text.encode()}


# -- all of it --------------------------------------------------------------------------------------------
def export_textured_mesh(source, path: str | Path, *, faces: int = 20_000, texture: int = 1024, resolution: int = 256,
                         threshold: float | None = None, lit=None, largest_only: bool = False) -> dict:
    """The field's surface as a textured mesh: `path` .glb (PBR base-colour texture) or .obj + .mtl + .png.

    faces: face budget of the decimation; texture: side of the square albedo texture; resolution: the
    marching-cubes lattice; threshold: density level (None: where renders show the surface); lit: a
    LiveParams whose fixed light (position, colour, ambient) shades a second texture, <stem>_lit.png;
    largest_only: keep only the largest connected part. Raises ValueError, writing nothing, on a bad value
    or an empty field. Returns {"files", "faces", "vertices", "texture", "threshold", "seconds": per stage}."""
    from engine.mesh import mesh_query, surface

    path = Path(path)
    if path.suffix.lower() not in TEXTURED_SUFFIXES:
        raise ValueError(f"cannot write a textured mesh to {path.name!r}: the name must end in .glb or .obj")
    faces, texture = check_budget(faces, texture)
    seconds, t = {}, time.perf_counter()

    def lap(stage: str):
        nonlocal t
        seconds[stage], t = round(time.perf_counter() - t, 3), time.perf_counter()

    v, f, level = surface(source, resolution, threshold)
    lap("marching_cubes")
    v, f = clean(v, f, largest_only=largest_only)
    lap("clean")
    v, f = decimate(v, f, faces)
    f = outward(v, f)
    lap("decimate")
    v, f, uv = uv_atlas(v, f, texture)
    lap("uv_atlas")
    baked = bake(source, v, f, uv, texture, lit=lit, query=mesh_query(source.field, resolution))
    albedo = to_uint8(dilate(baked["albedo"], baked["filled"]))
    shaded = None if baked["lit"] is None else to_uint8(dilate(baked["lit"], baked["filled"]))
    lap("bake")
    written = write_textured(textured_trimesh(v, f, uv, albedo), path, lit=shaded)
    lap("write")
    return {"files": written, "faces": len(f), "vertices": len(v), "texture": texture, "threshold": level,
            "seconds": seconds}


def _area(verts: np.ndarray, faces: np.ndarray) -> float:
    a, b, c = (verts[faces[:, i]].astype(np.float64) for i in range(3))
    return float(np.linalg.norm(np.cross(b - a, c - a), axis=-1).sum() / 2.0)


def outward(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """`faces` wound so the normals face out (skimage's winding depends on its gradient convention)."""
    return faces[:, ::-1].copy() if _signed_volume(verts, faces) < 0 else faces


def _signed_volume(verts: np.ndarray, faces: np.ndarray) -> float:
    a, b, c = (verts[faces[:, i]].astype(np.float64) for i in range(3))
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)
