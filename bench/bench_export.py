"""Seconds for the exports of issue 6 on this machine: a 120-frame 256^2 mp4, the same as a GIF, and a
256^3 mesh, from a field reconstructed with the oracle sphere prior (so the numbers are for a real
trained GridField with its occupancy grid, not an empty one). Also the time `RenderSource.from_trainer`
holds the session lock, and the reconstructed sphere mesh's volume against the analytic sphere's.

    python bench/bench_export.py [--steps 300] [--frames 120] [--size 256] [--mesh-resolution 256]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine.checkpoint import save_checkpoint  # noqa: E402
from engine.config import Config, LiveParams  # noqa: E402
from engine.export import RenderSource, export_mesh, write_orbit_video  # noqa: E402
from engine.priors import load_prior  # noqa: E402
from engine.trainer import Trainer  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="oracle reconstruction steps before exporting")
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--mesh-resolution", type=int, default=256)
    p.add_argument("--out", default=None, help="folder for the files (default: a temp folder)")
    args = p.parse_args()

    live = LiveParams(prompt="a red sphere", shading="random")
    trainer = Trainer(Config(prior="oracle:sphere"), load_prior("oracle:sphere"), live=live)
    _, train_s = timed(lambda: [trainer.step(live) for _ in range(args.steps)])
    source, copy_s = timed(lambda: RenderSource.from_trainer(trainer))
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-export-"))
    save_checkpoint(trainer, out, live)  # keeps the reconstructed field for a look at its mesh afterwards
    res = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
           "train_steps": args.steps, "train_s": round(train_s, 1), "from_trainer_ms": round(1e3 * copy_s, 1)}
    n, s = args.frames, args.size
    _, res[f"mp4_{n}x{s}_s"] = timed(lambda: write_orbit_video(source, out / "orbit.mp4", frames=n, size=s))
    _, res[f"gif_{n}x{s}_s"] = timed(lambda: write_orbit_video(source, out / "orbit.gif", frames=n, size=s))
    _, res[f"mp4_side_by_side_{n}x{s}_s"] = timed(
        lambda: write_orbit_video(source, out / "sbs.mp4", frames=n, size=s, side_by_side=True))
    r = args.mesh_resolution
    path, res[f"mesh_{r}^3_glb_s"] = timed(lambda: export_mesh(source, out / "mesh.glb", resolution=r))
    import trimesh

    mesh = trimesh.load(path, force="mesh")
    analytic = 4 / 3 * math.pi * 0.55**3
    res["mesh_faces"] = len(mesh.faces)
    res["mesh_threshold"] = round(float(mesh.metadata.get("density_threshold", float("nan"))), 2)
    res["mesh_volume_error_pct"] = round(100 * (mesh.volume - analytic) / analytic, 1)
    res["files"] = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if not f.name.startswith("checkpoint")}
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}, indent=2))


if __name__ == "__main__":
    main()
