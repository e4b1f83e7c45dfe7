"""Headless command line: `python -m engine run|export|eval|batch|doctor|build-kernels ...`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    return name


def cmd_run(args) -> int:
    from tqdm import tqdm

    from engine.cameras import preview_cameras
    from engine.checkpoint import live_from_meta, load_into, read_checkpoint, save_checkpoint
    from engine.config import Config
    from engine.export import run_folder, save_png, tile
    from engine.presets import preset_run
    from engine.priors import load_prior
    from engine.trainer import Trainer

    device = _device(args.device)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be a positive integer; got {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume:
        meta, tensors = read_checkpoint(args.resume)
        cfg, live = Config.from_dict(meta["config"]), live_from_meta(meta)
        if args.steps is not None:
            live = live.replace(steps=args.steps)
        out = Path(args.out or args.resume)
    else:
        given = {"seed": args.seed, "live.prompt": args.prompt, "live.negative_prompt": args.negative_prompt,
                 "live.steps": args.steps, "field.backbone": args.backbone, "render.resolution": args.resolution,
                 "live.guidance_scale": args.guidance_scale}
        cfg, live = preset_run(args.prior or "embedded", device, {k: v for k, v in given.items() if v is not None})
        out = Path(args.out) if args.out else run_folder(args.out_root, args.prompt)
    from engine.priors.base import prior_options_from

    options = prior_options_from(args)
    prior = load_prior(cfg.prior, device=device, options=options)
    trainer = Trainer(cfg, prior, device, live)
    if args.resume:
        load_into(trainer, meta, tensors)
    for w in trainer.embedding(live.prompt, live.negative_prompt).warnings:
        print(f"warning: {w}", file=sys.stderr)
    start, t0 = trainer.step_count, time.perf_counter()
    last = {}
    for _ in tqdm(range(start, live.steps), initial=start, total=live.steps, desc="SDS", disable=args.quiet):
        last = trainer.step(live).metrics
    wall = time.perf_counter() - t0
    done = max(0, live.steps - start)
    save_checkpoint(trainer, out, live)
    views = trainer.render_views(preview_cameras(device), 128, 128, "lambertian", live=live)
    save_png(tile(views.rgb), out / "preview.png")
    metrics = {"steps": trainer.step_count, "steps_this_run": done, "its_per_s": done / wall if wall else 0.0,
               "wall_s": wall, "skipped_steps": trainer.skipped_steps, "final": last, "prior": prior.name,
               "device": str(device), "live": dataclasses.asdict(live), "config": cfg.to_dict(),
               "prior_options": dataclasses.asdict(options)}
    from engine.checkpoint import atomic_write

    atomic_write(out / "metrics.json", lambda p: Path(p).write_text(json.dumps(metrics, indent=2)))
    print(json.dumps({"run": str(out), "steps": trainer.step_count, "its_per_s": round(metrics["its_per_s"], 2),
                      "wall_s": round(wall, 1), "loss": last.get("loss")}))
    return 0


def cmd_build_kernels(args) -> int:
    from engine import accel

    print("building nerfacc's CUDA kernels (a few minutes the first time)...", flush=True)
    ok = accel.build_kernels()
    print("nerfacc's CUDA kernels are built and load: training on CUDA uses them" if ok else
          f"nerfacc's kernels did not load: {accel.kernels_status()['detail']}")
    print("building gsplat's CUDA kernels (a few minutes the first time)...", flush=True)
    splats_ok = accel.build_gsplat()
    print("gsplat's CUDA kernels are built and load: splat fields on CUDA use them" if splats_ok else
          f"gsplat's kernels did not load: {accel.gsplat_status()['detail']}")
    return 0 if ok and splats_ok else 1


def cmd_doctor(args) -> int:
    from engine.doctor import diagnose, report

    facts = diagnose()
    print(json.dumps(facts, indent=2) if args.json else report(facts))
    return 0


def _export_target(run_dir: Path, out_dir: Path | None, name: str) -> Path:
    """An absolute path is used as given; a relative one goes inside the run folder (or --out-dir),
    and may not climb out of it."""
    from engine.export import safe_path

    if Path(name).is_absolute():
        return Path(name)
    return safe_path(out_dir or run_dir, name)


def cmd_export(args) -> int:
    from engine.config import LiveParams
    from engine.export import RenderSource, snapshot, write_orbit_video

    run_dir = Path(args.run)
    out_dir = Path(args.out_dir) if args.out_dir else None
    if not (args.video or args.gif or args.mesh or args.snapshot or args.splats):
        raise ValueError("nothing to export: pass --video, --gif, --mesh, --splats and/or --snapshot")
    mesh_writer, mesh_kw = _mesh_export(args.mesh, args) if args.mesh else (None, {})
    source = RenderSource.from_checkpoint(run_dir, _device(args.device))
    written = {}
    if args.splats:
        from engine.splats.ply import write_ply

        if not source.field.rasterized:
            raise ValueError("--splats needs a run of the gaussians backbone")
        written["splats"] = str(write_ply(_export_target(run_dir, out_dir, args.splats), source.field))
    video_kw = dict(frames=args.views, size=args.size, elevation=args.elevation, mode=args.mode,
                    side_by_side=args.side_by_side, fps=args.fps, live=LiveParams())
    for key in ("video", "gif"):
        name = getattr(args, key)
        if name:
            t0 = time.perf_counter()
            written[key] = str(write_orbit_video(source, _export_target(run_dir, out_dir, name), **video_kw))
            written[f"{key}_s"] = round(time.perf_counter() - t0, 2)
    if args.mesh:
        t0 = time.perf_counter()
        result = mesh_writer(source, _export_target(run_dir, out_dir, args.mesh), **mesh_kw)
        if isinstance(result, dict):  # a textured mesh's stats: its files (the mesh first) and face count
            written.update(mesh_files=[str(p) for p in result["files"]], mesh_faces=result["faces"])
            result = result["files"][0]
        written["mesh"] = str(result)
        written["mesh_s"] = round(time.perf_counter() - t0, 2)
    if args.snapshot:
        written["snapshot"] = str(snapshot(source, None, out_dir or run_dir, mode=args.mode, size=args.size)["png"])
    print(json.dumps({"run": str(run_dir), "step": source.step, **written}))
    return 0


def _mesh_export(name: str, args):
    """The mesh writer and its options, checked before anything is loaded or written: a textured .glb/.obj
    (the default for those suffixes) or a vertex-colour mesh (.ply, or --vertex-colors)."""
    from engine.config import LiveParams
    from engine.export import TEXTURED_SUFFIXES, export_mesh, export_textured_mesh
    from engine.texture import check_budget

    if Path(name).suffix.lower() in TEXTURED_SUFFIXES and not args.vertex_colors:
        if args.decimate is not None:
            raise ValueError("--decimate is for vertex-colour meshes; a textured mesh takes --faces")
        faces, texture = check_budget(20_000 if args.faces is None else args.faces,
                                      1024 if args.texture is None else args.texture)
        return export_textured_mesh, dict(
            faces=faces, texture=texture, resolution=256 if args.mesh_resolution is None else args.mesh_resolution,
            threshold=args.threshold, lit=LiveParams() if args.lit else None, largest_only=args.largest_only)
    if args.faces is not None or args.texture is not None or args.lit or args.largest_only:
        raise ValueError("--faces, --texture, --lit and --largest-only are for a textured .glb or .obj; "
                         "a vertex-colour mesh takes --decimate")
    return export_mesh, dict(resolution=128 if args.mesh_resolution is None else args.mesh_resolution,
                             threshold=args.threshold, decimate=args.decimate)


def cmd_eval(args) -> int:
    from engine.evaluate import evaluate_run

    result = evaluate_run(args.run, n_views=args.views, seed=args.seed, prompt=args.prompt,
                          classifier=args.classifier)
    print(json.dumps(result, indent=2))
    return 0


def _add_export_parser(sub) -> None:
    from engine.export import MODES

    e = sub.add_parser("export", help="write videos, a mesh or a snapshot of a saved run")
    e.add_argument("--run", required=True, metavar="DIR", help="run folder with checkpoint.safetensors/.json")
    e.add_argument("--video", default=None, metavar="NAME.mp4", help="orbit video (mp4)")
    e.add_argument("--gif", default=None, metavar="NAME.gif", help="orbit video (GIF)")
    e.add_argument("--mesh", default=None, metavar="NAME.glb",
                   help="mesh: .glb or .obj + .mtl + .png (UV-textured), .ply (vertex colours)")
    e.add_argument("--splats", default=None, metavar="NAME.ply", help="the Gaussians as a 3DGS .ply (splat runs)")
    e.add_argument("--snapshot", action="store_true", help="also a PNG of the front three-quarter view")
    e.add_argument("--out-dir", default=None, help="folder for relative names (default: the run folder)")
    e.add_argument("--views", type=int, default=120, help="frames of a full turn")
    e.add_argument("--size", type=int, default=256, help="frame side in pixels")
    e.add_argument("--elevation", type=float, default=15.0, help="orbit elevation in degrees")
    e.add_argument("--fps", type=int, default=30, help="frames per second")
    e.add_argument("--mode", choices=MODES, default="lambertian", help="render mode")
    e.add_argument("--side-by-side", action="store_true", help="shaded | normals | depth in each frame")
    e.add_argument("--mesh-resolution", type=int, default=None,
                   help="marching-cubes lattice size (default: 256 textured, 128 vertex colours)")
    e.add_argument("--threshold", type=float, default=None,
                   help="density level (default: from the renders; splats: 0.5 of their summed opacity)")
    e.add_argument("--faces", type=int, default=None, help="face budget of a textured mesh (default 20000)")
    e.add_argument("--texture", type=int, default=None, metavar="SIDE",
                   help="texture side in texels, 64..4096 (default 1024)")
    e.add_argument("--lit", action="store_true",
                   help="also NAME_lit.png: the texture shaded under the default fixed light, for unlit viewers")
    e.add_argument("--largest-only", action="store_true", help="keep only the mesh's largest connected part")
    e.add_argument("--vertex-colors", action="store_true", help="a .glb/.obj with vertex colours, untextured")
    e.add_argument("--decimate", type=int, default=None, metavar="FACES", help="cap a vertex-colour mesh's faces")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.set_defaults(fn=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    from engine.config import BACKBONES
    from engine.priors import PRIOR_HELP

    p = argparse.ArgumentParser(prog="python -m engine", description="DreamFusion engine, headless.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="optimise a field for a prompt")
    r.add_argument("--prompt", default="a red cube", help="text prompt")
    r.add_argument("--negative-prompt", default="", help="negative prompt")
    r.add_argument("--prior", default=None, help=f"prior: {PRIOR_HELP}")
    r.add_argument("--steps", type=int, default=None, help="total training steps (default: the config's)")
    r.add_argument("--seed", type=int, default=0, help="seed of the run")
    r.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 makes a seeded run bit-for-bit repeatable here)")
    r.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    r.add_argument("--backbone", choices=BACKBONES, default=None,
                   help="field: grid or hash (NeRFs), or gaussians (splats)")
    r.add_argument("--resolution", type=int, default=None, help="training render size (default: the prior's)")
    r.add_argument("--out", default=None, help="run folder (default: OUT_ROOT/<date>-<prompt>)")
    r.add_argument("--out-root", default="outputs", help="root of default run folders")
    r.add_argument("--resume", default=None, metavar="DIR", help="continue the run saved in DIR")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    from engine.priors.base import add_prior_option_flags

    add_prior_option_flags(r)
    r.set_defaults(fn=cmd_run)

    _add_export_parser(sub)

    v = sub.add_parser("eval", help="score a saved run: toy R-Precision and silhouette agreement, as JSON")
    v.add_argument("--run", required=True, metavar="DIR", help="run folder with checkpoint.safetensors/.json")
    v.add_argument("--views", type=int, default=16, help="random views to score")
    v.add_argument("--seed", type=int, default=0, help="seed of the views")
    v.add_argument("--prompt", default=None, help="score against this prompt instead of the run's")
    v.add_argument("--classifier", default=None, metavar="FILE",
                   help="classifier weights (default: assets/classifier.safetensors)")
    v.set_defaults(fn=cmd_eval)

    d = sub.add_parser("doctor", help="what this machine can run: device, memory, kernels, priors in the cache")
    d.add_argument("--json", action="store_true", help="print JSON instead of text")
    d.set_defaults(fn=cmd_doctor)

    k = sub.add_parser("build-kernels", help="compile nerfacc's and gsplat's CUDA kernels now (minutes; needs nvcc), once")
    k.set_defaults(fn=cmd_build_kernels)

    from engine.batch import add_parser as add_batch_parser

    add_batch_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # `batch` names the command that resumes it
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
