"""Splat `.ply` files in the layout 3D Gaussian Splatting viewers read.

One binary little-endian vertex element with float properties `x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 opacity
scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3`: normals are zero, colour is the degree-0 spherical-harmonic
coefficient (rgb = 0.5 + C0 f_dc), opacity is a logit, scales are logs, the rotation a (w, x, y, z)
quaternion. Files with more properties (f_rest_*, ...) read too; they are ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from engine.checkpoint import atomic_write

C0 = 0.28209479177387814  # the degree-0 spherical harmonic, 1 / (2 sqrt(pi))
PROPERTIES = ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
              "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
NUMPY_TYPES = {"float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8", "uchar": "u1", "uint8": "u1",
               "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4", "short": "<i2", "ushort": "<u2"}


def splat_arrays(field) -> dict[str, Tensor]:
    """The field's Gaussians as the file stores them: {"means" [N, 3], "log_scales" [N, 3], "quats" [N, 4],
    "opacity_logits" [N], "f_dc" [N, 3]}."""
    with torch.no_grad():
        return {"means": field.means.detach().cpu(), "log_scales": field.log_scales.detach().cpu(),
                "quats": field.quats.detach().cpu(), "opacity_logits": field.opacity_logits.detach().cpu(),
                "f_dc": (field.albedo.detach().cpu() - 0.5) / C0}


def write_ply(path: str | Path, field) -> Path:
    """Write a `SplatField` to `path` (atomically)."""
    a = splat_arrays(field)
    n = a["means"].shape[0]
    cols = torch.cat([a["means"], torch.zeros(n, 3), a["f_dc"], a["opacity_logits"][:, None], a["log_scales"],
                      a["quats"]], 1).float().numpy()
    header = "\n".join(["ply", "format binary_little_endian 1.0", f"element vertex {n}",
                        *(f"property float {p}" for p in PROPERTIES), "end_header"]) + "\n"

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(header.encode("ascii"))
            f.write(cols.astype("<f4").tobytes())

    return atomic_write(path, write)


def _header(f) -> tuple[int, list[tuple[str, str]]]:
    """(vertex count, [(property name, numpy type)]) of a binary little-endian splat file."""
    if f.readline().strip() != b"ply":
        raise ValueError("not a PLY file")
    count, props, in_vertex = None, [], False
    while True:
        line = f.readline()
        if not line:
            raise ValueError("the PLY header has no end_header")
        words = line.decode("ascii", "replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and words[1:2] != ["binary_little_endian"]:
            raise ValueError(f"only binary_little_endian splat files are read; this one is {' '.join(words[1:])}")
        if words[0] == "element":
            in_vertex = words[1] == "vertex"
            count = int(words[2]) if in_vertex else count
        elif words[0] == "property" and in_vertex:
            if words[1] == "list" or words[1] not in NUMPY_TYPES:
                raise ValueError(f"unsupported vertex property {' '.join(words[1:])}")
            props.append((words[2], NUMPY_TYPES[words[1]]))
        elif words[0] == "end_header":
            break
    missing = [p for p in PROPERTIES if p not in {name for name, _ in props} and not p.startswith("n")]
    if count is None or missing:
        raise ValueError(f"not a 3D Gaussian splat file (missing {', '.join(missing) or 'vertex element'})")
    return count, props


def read_ply(path: str | Path) -> dict[str, Tensor]:
    """The arrays of a splat file, as `splat_arrays` returns them."""
    with open(path, "rb") as f:
        count, props = _header(f)
        data = np.frombuffer(f.read(), dtype=np.dtype(props), count=count)

    def cols(*names):
        return torch.from_numpy(np.stack([data[n].astype(np.float32) for n in names], 1))

    return {"means": cols("x", "y", "z"), "log_scales": cols("scale_0", "scale_1", "scale_2"),
            "quats": cols("rot_0", "rot_1", "rot_2", "rot_3"), "opacity_logits": cols("opacity")[:, 0],
            "f_dc": cols("f_dc_0", "f_dc_1", "f_dc_2")}


def load_ply(path: str | Path, cfg=None, splats=None):
    """A `SplatField` holding the Gaussians of a splat file (albedo = 0.5 + C0 f_dc, clamped to (0, 1))."""
    from engine.config import FieldConfig, SplatConfig
    from engine.splats.field import SplatField

    a = read_ply(path)
    field = SplatField(cfg or FieldConfig(backbone="gaussians"), splats or SplatConfig(), a["means"].shape[0])
    return field.set_gaussians(means=a["means"], scales=a["log_scales"].exp(), quats=a["quats"],
                               opacities=torch.sigmoid(a["opacity_logits"]),
                               albedo=(0.5 + C0 * a["f_dc"]).clamp(1e-6, 1 - 1e-6))
