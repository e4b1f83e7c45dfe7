"""Textured mesh export (engine/texture.py, issue 36): seconds per stage and file sizes at 5k / 20k / 100k faces
and 512 / 1024 / 2048 textures, with the silhouette IoU and PSNR of the mesh against the field's albedo render
from 8 views (engine.testing.mesh_vs_field), beside the vertex-colour export (engine.export.export_mesh) of
the same field, whole and cluster-decimated to 20k faces.

The field is an analytic solid painted with smooth colour waves and a sharp edge (engine.testing.painted_source,
as tests/test_texture.py), or with --trained N, the default GridField after N steps of oracle reconstruction.
Marching cubes and the clean-up run once; decimation once per face budget; atlas, bake and write per cell.

    taskset -c 1 python bench/bench_texture.py [--solid torus] [--resolution 256] [--size 128] [--trained 0] [--skip 100000x2048]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import trimesh  # noqa: E402

from engine import texture  # noqa: E402
from engine.export import export_mesh  # noqa: E402
from engine.mesh import surface  # noqa: E402
from engine.testing import field_views, mesh_vs_field, painted_source  # noqa: E402

FACES = (5_000, 20_000, 100_000)
TEXTURES = (512, 1024, 2048)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 2)


def trained_source(steps: int):
    from engine.config import Config, LiveParams
    from engine.export import RenderSource
    from engine.priors import load_prior
    from engine.trainer import Trainer

    live = LiveParams(prompt="a red torus", shading="random")
    trainer = Trainer(Config(prior="oracle:torus"), load_prior("oracle:torus"), live=live)
    for _ in range(steps):
        trainer.step(live)
    return RenderSource.from_trainer(trainer)


def textured_cell(source, verts, faces, texels: int, out: Path, reference: dict) -> dict:
    (v, f, uv), atlas_s = timed(lambda: texture.uv_atlas(verts, faces, texels))

    def bake():
        baked = texture.bake(source, v, f, uv, texels)
        return texture.to_uint8(texture.dilate(baked["albedo"], baked["filled"]))

    image, bake_s = timed(bake)
    path = out / f"m{len(faces)}_{texels}.glb"
    _, write_s = timed(lambda: texture.write_textured(texture.textured_trimesh(v, f, uv, image), path))
    obj = out / f"m{len(faces)}_{texels}.obj"
    texture.write_textured(texture.textured_trimesh(v, f, uv, image), obj)
    obj_bytes = sum(p.stat().st_size for p in out.glob(f"m{len(faces)}_{texels}.*") if p.suffix != ".glb")
    score = mesh_vs_field(source, trimesh.load(path, force="mesh", process=False), reference=reference)
    return {"uv_atlas_s": atlas_s, "bake_s": bake_s, "write_glb_s": write_s, "glb_MB": path.stat().st_size / 1e6,
            "obj_mtl_png_MB": obj_bytes / 1e6, **score}


def vertex_colour_rows(source, resolution: int, out: Path, reference: dict) -> list[dict]:
    rows = []
    for cap in (None, 20_000):
        path = out / f"vertex_{cap or 'all'}.glb"
        _, seconds = timed(lambda cap=cap, path=path: export_mesh(source, path, resolution=resolution, decimate=cap))
        mesh = trimesh.load(path, force="mesh", process=False)
        rows.append({"export": f"vertex colours, {'cluster-decimated' if cap else 'whole'}", "faces": len(mesh.faces),
                     "total_s": seconds, "glb_MB": path.stat().st_size / 1e6,
                     **mesh_vs_field(source, mesh, reference=reference)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--solid", default="torus", help="painted analytic solid (engine.world)")
    p.add_argument("--trained", type=int, default=0, metavar="STEPS", help="a trained oracle:torus field instead")
    p.add_argument("--run", default=None, metavar="DIR", help="a saved run's field instead (e.g. an embedded-prior run)")
    p.add_argument("--resolution", type=int, default=256, help="marching-cubes lattice")
    p.add_argument("--size", type=int, default=128, help="side of the 8 comparison views")
    p.add_argument("--skip", nargs="*", default=[], metavar="FACESxSIDE", help="cells to leave out, e.g. 100000x2048")
    p.add_argument("--out", default=None, help="folder for the files (default: a temp folder)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady figures on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.run:
        from engine.source import RenderSource

        source = RenderSource.from_checkpoint(args.run, "cpu")
    else:
        source = trained_source(args.trained) if args.trained else painted_source(args.solid, sigma_max=1000.0, eps=0.003)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-texture-"))
    out.mkdir(parents=True, exist_ok=True)
    reference, ref_s = timed(lambda: field_views(source, args.size))
    (v, f, level), mc_s = timed(lambda: surface(source, args.resolution))
    (v, f), clean_s = timed(lambda: texture.clean(v, f))
    res = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
           "field": args.run or (f"trained oracle:torus, {args.trained} steps" if args.trained else f"painted {args.solid}"),
           "marching_cubes_s": mc_s, "marching_cubes_faces": len(f), "clean_s": clean_s, "reference_render_s": ref_s,
           "cells": [], "vertex_colours": vertex_colour_rows(source, args.resolution, out, reference)}
    for budget in FACES:
        (dv, df), dec_s = timed(lambda budget=budget: texture.decimate(v, f, budget))
        df = texture.outward(dv, df)
        for texels in TEXTURES:
            if f"{budget}x{texels}" in args.skip:
                res["cells"].append({"faces": budget, "texture": texels, "skipped": True})
                continue
            cell = textured_cell(source, dv, df, texels, out, reference)
            res["cells"].append({"faces": len(df), "texture": texels, "decimate_s": dec_s, **cell})
            print(json.dumps(res["cells"][-1]), file=sys.stderr, flush=True)
    print(json.dumps(res, indent=1, default=lambda x: round(float(x), 3) if isinstance(x, np.floating) else str(x)))


if __name__ == "__main__":
    main()
