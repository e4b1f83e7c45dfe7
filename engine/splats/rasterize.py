"""Drawing 3D Gaussians: EWA projection and depth-ordered alpha compositing, in pure torch (every device).

1. Each Gaussian's covariance Sigma = R S S^T R^T goes to camera space and through the Jacobian J of the
   perspective map (EWA splatting, Zwicker et al. 2001): Sigma_2d = J W Sigma W^T J^T + 0.3 I, the small
   dilation that keeps sub-pixel Gaussians at least a pixel wide (3DGS's, gsplat's `eps2d`). Its inverse
   (the conic) gives each pixel's Mahalanobis distance; its 3.33-sigma box (where the alpha falls below
   1/255) is the Gaussian's extent; those behind the near plane or outside the image are culled.
2. Gaussians are listed per 16 x 16 tile they touch and sorted by depth within each tile (what gsplat's
   kernels do); tiles are processed in chunks of bounded size, so a 512^2 frame never holds every
   (pixel, Gaussian) pair at once.
3. Front to back, alpha_i = min(0.999, o_i exp(-q_i / 2)) (skipped below 1/255), transmittance
   T_i = prod_{j<i} (1 - alpha_j), compositing stops once T would fall to 1e-4: gsplat's rules, so the two
   agree pixel for pixel. The backward is autograd's.

gsplat's own CUDA `rasterization` replaces steps 1-3 when its kernels are built (`engine.accel`); nothing
here builds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

EPS2D = 0.3  # pixels^2 added to every projected covariance (gsplat's default)
NEAR_PLANE = 0.01  # Gaussians nearer than this (camera-space z) are culled
ALPHA_MIN, ALPHA_MAX, T_MIN = 1.0 / 255.0, 0.999, 1e-4  # gsplat's compositing thresholds
CHUNK = 1 << 22  # (pixel, Gaussian) pairs evaluated at once: ~16 MB a tensor
# a chunk's tiles have at most 1.5x the Gaussians of its first (or of 16): padding wastes at most a third
PAD_RATIO, MIN_PAD = 1.5, 16


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices [N, 3, 3] of quaternions [N, 4] (w, x, y, z; normalised here)."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]
    return torch.stack(rows, -1).view(-1, 3, 3)


def covariances(quats: Tensor, scales: Tensor) -> Tensor:
    """Sigma = (R S)(R S)^T [N, 3, 3] from quaternions [N, 4] and scales [N, 3]."""
    m = quat_to_rotmat(quats) * scales[:, None, :]
    return m @ m.transpose(1, 2)


def camera_matrices(c2w: Tensor, focal: Tensor, width: int, height: int) -> tuple[Tensor, Tensor]:
    """gsplat's cameras from ours: world-to-camera [C, 4, 4] in OpenCV axes (x right, y down, looking down +z)
    and intrinsics [C, 3, 3]. `engine.cameras` is OpenGL-style (looking down -z) with focal a multiple of width."""
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], device=c2w.device, dtype=c2w.dtype))
    viewmats = flip @ torch.linalg.inv(c2w)
    f = focal * width
    Ks = torch.zeros(len(c2w), 3, 3, device=c2w.device, dtype=c2w.dtype)
    Ks[:, 0, 0], Ks[:, 1, 1], Ks[:, 0, 2], Ks[:, 1, 2], Ks[:, 2, 2] = f, f, width / 2, height / 2, 1.0
    return viewmats, Ks


@dataclass
class Projection:
    means2d: Tensor  # [C, N, 2] pixel coordinates of the centres (pixel (i, j) has its centre at (i + .5, j + .5))
    conics: Tensor  # [C, N, 3] (a, b, c) of the inverse 2D covariance [[a, b], [b, c]]
    depths: Tensor  # [C, N] camera-space z
    radii: Tensor  # [C, N, 2] int half-extent in pixels along x and y; 0: culled


def project(means: Tensor, covars: Tensor, viewmats: Tensor, Ks: Tensor, width: int, height: int,
            eps2d: float = EPS2D, near_plane: float = NEAR_PLANE) -> Projection:
    """EWA projection of Gaussians (means [N, 3], covars [N, 3, 3]) into C pinhole cameras."""
    R, t = viewmats[:, None, :3, :3], viewmats[:, None, :3, 3]  # [C, 1, 3, 3], [C, 1, 3]
    mc = (R @ means[None, :, :, None]).squeeze(-1) + t  # [C, N, 3]
    cc = R @ covars[None] @ R.transpose(-1, -2)  # [C, N, 3, 3]
    fx, fy = Ks[:, None, 0, 0], Ks[:, None, 1, 1]  # [C, 1]
    cx, cy = Ks[:, None, 0, 2], Ks[:, None, 1, 2]
    tx, ty, tz = mc.unbind(-1)
    # the Jacobian is taken at the centre clamped to 1.3x the field of view: far off-screen centres would
    # otherwise stretch their footprint across the image
    lim_x, lim_y = 1.3 * 0.5 * width / fx, 1.3 * 0.5 * height / fy
    u = tz * (tx / tz).clamp(-lim_x - (cx - width / 2) / fx, lim_x + (cx - width / 2) / fx)
    v = tz * (ty / tz).clamp(-lim_y - (cy - height / 2) / fy, lim_y + (cy - height / 2) / fy)
    zero = torch.zeros_like(tz)
    J = torch.stack([fx / tz, zero, -fx * u / (tz * tz), zero, fy / tz, -fy * v / (tz * tz)], -1).view(*tz.shape, 2, 3)
    cov2d = J @ cc @ J.transpose(-1, -2) + eps2d * torch.eye(2, device=means.device, dtype=means.dtype)
    a, b, c = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    det = (a * c - b * b).clamp(min=1e-10)
    conics = torch.stack([c / det, -b / det, a / det], -1)
    means2d = torch.stack([fx * tx / tz + cx, fy * ty / tz + cy], -1)
    radii = torch.stack([(3.33 * a.sqrt()).ceil(), (3.33 * c.sqrt()).ceil()], -1).detach()
    m = means2d.detach()
    inside = ((m[..., 0] + radii[..., 0] > 0) & (m[..., 0] - radii[..., 0] < width)
              & (m[..., 1] + radii[..., 1] > 0) & (m[..., 1] - radii[..., 1] < height))
    valid = (det > 1e-10) & (tz > near_plane) & inside
    return Projection(means2d, conics, tz, (radii * valid[..., None]).int())


def tile_intersections(proj: Projection, opacities: Tensor, tile: int, tiles_x: int, tiles_y: int
                       ) -> tuple[Tensor, Tensor]:
    """Every (tile, Gaussian) pair whose box meets the tile, ordered by tile then depth. The box is 3.33 sigma
    (`radii`) shrunk to where o exp(-d^2 / 2) >= 1/255, sqrt(2 ln(255 o)) sigma, for faint Gaussians (gsplat's
    kernels shrink it too): nothing beyond it is drawn anyway. Returns the tile ids [M] (camera-major) and
    the flat Gaussian ids c * N + n [M]."""
    C, N = proj.depths.shape
    extent = (2 * torch.log((opacities.detach() / ALPHA_MIN).clamp(min=1.0))).sqrt().clamp(max=3.33) / 3.33  # [C, N]
    m, r = proj.means2d.detach(), (proj.radii.float() * extent[..., None]).ceil()
    lo, hi = ((m - r) / tile).floor().long(), ((m + r) / tile).ceil().long()
    bounds = torch.tensor([tiles_x, tiles_y], device=m.device)
    lo, hi = torch.minimum(lo.clamp(min=0), bounds), torch.minimum(hi.clamp(min=0), bounds)
    span = (hi - lo).view(-1, 2)
    count = span.prod(-1) * (proj.radii > 0).all(-1).view(-1)  # [C * N]
    gid = torch.repeat_interleave(torch.arange(C * N, device=m.device), count)
    k = torch.arange(gid.numel(), device=m.device) - (count.cumsum(0) - count)[gid]  # index within its box
    sx = span[gid, 0]
    x, y = lo.view(-1, 2)[gid, 0] + k % sx, lo.view(-1, 2)[gid, 1] + k // sx
    tile_id = (gid // N * tiles_y + y) * tiles_x + x
    order = torch.argsort(proj.depths.detach().reshape(-1)[gid], stable=True)
    order = order[torch.argsort(tile_id[order], stable=True)]
    return tile_id[order], gid[order]


def _composite_tiles(proj: Projection, opacities: Tensor, features: Tensor, idx: Tensor, tiles: Tensor,
                     tile: int, tiles_x: int, tiles_y: int) -> Tensor:
    """Colour and alpha [T, tile * tile, F + 1] of the tiles `tiles` [T], whose depth-ordered Gaussians are
    idx [T, K] (flat ids; -1 pads)."""
    T, K = idx.shape
    dev, dt = features.device, features.dtype
    valid = idx >= 0
    flat = idx.clamp(min=0).view(-1)
    mu = proj.means2d.reshape(-1, 2).index_select(0, flat).view(T, 1, K, 2)
    a, b, c = proj.conics.reshape(-1, 3).index_select(0, flat).view(T, 1, K, 3).unbind(-1)
    opa = opacities.reshape(-1).index_select(0, flat).view(T, 1, K) * valid[:, None, :]  # padding: transparent
    feat = features.reshape(-1, features.shape[-1]).index_select(0, flat).view(T, K, -1)
    local = torch.arange(tile, device=dev, dtype=dt) + 0.5
    py = ((tiles // tiles_x) % tiles_y * tile)[:, None, None] + local[None, :, None]  # [T, tile, 1]
    px = (tiles % tiles_x * tile)[:, None, None] + local[None, None, :]  # [T, 1, tile]
    gx = px.expand(T, tile, tile).reshape(T, -1, 1)  # [T, P, 1] pixel centres, row-major
    gy = py.expand(T, tile, tile).reshape(T, -1, 1)
    dx, dy = mu[..., 0] - gx, mu[..., 1] - gy  # [T, P, K]
    q = dx * (0.5 * a * dx + b * dy) + 0.5 * c * dy * dy  # half the squared Mahalanobis distance
    alpha = (opa * torch.exp(-q)).clamp(max=ALPHA_MAX)
    alpha = torch.where((alpha >= ALPHA_MIN) & (q >= 0), alpha, torch.zeros_like(alpha))
    trans = torch.cumprod(1.0 - alpha, dim=-1)  # transmittance after each Gaussian
    alpha = torch.where(trans > T_MIN, alpha, torch.zeros_like(alpha))  # gsplat stops before T reaches 1e-4
    before = torch.cat([torch.ones_like(trans[..., :1]), trans[..., :-1]], -1)
    w = alpha * before  # [T, P, K]
    return torch.cat([w @ feat, w.sum(-1, keepdim=True)], -1)


def rasterize(proj: Projection, opacities: Tensor, features: Tensor, width: int, height: int, tile: int = 16,
              chunk: int = CHUNK) -> tuple[Tensor, Tensor, int]:
    """Alpha-composite per-camera features [C, N, F] of Gaussians with opacities [N] front to back.
    Returns features [C, H, W, F], alpha [C, H, W, 1] and the number of (tile, Gaussian) pairs.

    Tiles are taken in order of their Gaussian count, in chunks of at most `chunk` padded (pixel, Gaussian)
    pairs whose counts differ by at most PAD_RATIO, so little of the work is padding."""
    C, N, nf = features.shape
    tiles_x, tiles_y = -(-width // tile), -(-height // tile)
    n_tiles, P = C * tiles_x * tiles_y, tile * tile
    opacities = opacities.expand(C, N)
    tile_id, gid = tile_intersections(proj, opacities, tile, tiles_x, tiles_y)
    counts = torch.bincount(tile_id, minlength=n_tiles)
    order = torch.argsort(counts, stable=True)  # tiles by count
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(n_tiles, device=order.device))
    row = rank[tile_id]  # each pair's tile, as its place in that order
    by_row = torch.argsort(row, stable=True)  # keeps the depth order within a tile
    row, gid = row[by_row], gid[by_row]
    sorted_counts = counts[order]
    starts = sorted_counts.cumsum(0) - sorted_counts
    slot = torch.arange(row.numel(), device=row.device) - starts[row]  # depth rank within the tile
    parts, first, counts_list = [], 0, sorted_counts.tolist()
    while first < n_tiles:
        last, low = first + 1, max(counts_list[first], MIN_PAD)
        while (last < n_tiles and (last - first + 1) * P * max(counts_list[last], 1) <= chunk
               and counts_list[last] <= PAD_RATIO * low):
            last += 1
        k = counts_list[last - 1]  # the chunk's largest count
        if k == 0:
            parts.append(features.new_zeros(last - first, P, nf + 1))
        else:
            lo, hi = int(starts[first]), int(starts[last - 1]) + k
            idx = torch.full((last - first, k), -1, dtype=torch.long, device=features.device)
            idx[row[lo:hi] - first, slot[lo:hi]] = gid[lo:hi]
            parts.append(_composite_tiles(proj, opacities, features, idx, order[first:last], tile, tiles_x, tiles_y))
        first = last
    out = torch.cat(parts).index_select(0, rank)  # back to tile order
    out = out.view(C, tiles_y, tiles_x, tile, tile, nf + 1).permute(0, 1, 3, 2, 4, 5)
    out = out.reshape(C, tiles_y * tile, tiles_x * tile, nf + 1)[:, :height, :width]
    return out[..., :nf], out[..., nf:], int(tile_id.numel())


def _gsplat_rasterize(field, features: Tensor, viewmats: Tensor, Ks: Tensor, width: int, height: int
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """gsplat's CUDA kernels (loaded by `engine.accel.load_gsplat`; its own 16-pixel tiles), with our thresholds."""
    from gsplat.rendering import rasterization

    img, alpha, meta = rasterization(field.means, field.quats, field.scales, field.opacities, features, viewmats, Ks,
                                     width, height, eps2d=EPS2D, near_plane=NEAR_PLANE, packed=False)
    radii = meta["radii"]  # [C, N, 2] in gsplat 1.5
    visible = (radii > 0).all(-1) if radii.dim() == 3 else radii > 0
    return img, alpha, meta["means2d"], visible, int(meta["flatten_ids"].numel()) if "flatten_ids" in meta else 0


def render_splats(field, background, cams, height: int, width: int, *, shading: str, light, accelerated: bool = False):
    """Render B views of a `SplatField` into the renderer's `RenderOutput`.

    Shading is per Gaussian, then composited like colour: the shading mode's colour from the Gaussian's albedo
    and its normal (its shortest axis, turned toward the camera) lit at its centre, plus albedo, normal and
    distance from the camera (depth, as the NeRF's). The background is composited with 1 - alpha. `means2d`
    keeps its gradient for densification.
    """
    from engine.render import RenderOutput
    from engine.shading import shade

    C, N = len(cams), len(field)
    viewmats, Ks = camera_matrices(cams.c2w, cams.focal, width, height)
    origins = cams.origins
    normals = field.normals(origins)  # [C, N, 3]
    albedo = field.albedo[None].expand(C, N, 3)
    rgb = shade(shading, albedo, normals, field.means[None], light_pos=light.position[:, None],
                light_color=light.color[:, None], ambient=light.ambient[:, None, None])
    dist = (field.means[None] - origins[:, None]).norm(dim=-1, keepdim=True)
    features = torch.cat([rgb, albedo, normals, dist], -1)  # [C, N, 10]
    if accelerated:
        img, alpha, means2d, visible, pairs = _gsplat_rasterize(field, features, viewmats, Ks, width, height)
    else:
        proj = project(field.means, field.covariances(), viewmats, Ks, width, height)
        img, alpha, pairs = rasterize(proj, field.opacities, features, width, height, field.splats.tile)
        means2d, visible = proj.means2d, (proj.radii > 0).all(-1)
    if torch.is_grad_enabled() and means2d.requires_grad:
        means2d.retain_grad()
    _, d = cams.rays(height, width)
    img = torch.cat([img, alpha], -1).permute(0, 3, 1, 2)  # [C, 11, H, W]
    alpha = img[:, 10:11]
    back = background(d.reshape(-1, 3)).view(C, height, width, 3).permute(0, 3, 1, 2)
    return RenderOutput(rgb=img[:, 0:3] + (1.0 - alpha) * back, opacity=alpha, depth=img[:, 9:10],
                        normal=img[:, 6:9], albedo=img[:, 3:6], orientation=alpha.new_zeros(C, height, width),
                        samples=pairs, means2d=means2d, visible=visible.detach())
