"""Training-step speed: its/s and ms per phase (render, prior, backward+optimizer) per backbone and
resolution with the oracle prior, and the speedup of empty-space skipping over dense sampling once the
object has formed (dense and skipping measured in alternating blocks of steps).

    python bench/bench_step.py               # full table
    python bench/bench_step.py --quick       # fewer steps (smoke)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from engine.cameras import fixed_views  # noqa: E402
from engine.config import Config, LiveParams  # noqa: E402
from engine.priors import load_prior  # noqa: E402
from engine.priors.analytic import AnalyticField  # noqa: E402
from engine.trainer import Trainer  # noqa: E402


def formed(trainer: Trainer, solid: str = "cube", iters: int = 300) -> None:
    """Fit the field's density and albedo to an analytic solid (supervised), as if training had formed it."""
    target = AnalyticField(solid, (0.85, 0.12, 0.10), sigma_max=60.0, eps=0.02)
    opt = torch.optim.Adam(trainer.field.parameters(), lr=1e-2)
    for _ in range(iters):
        x = torch.rand(8192, 3) * 2 - 1
        x = x[x.norm(dim=-1) <= 1]
        s, t = trainer.field.prepare().samples(x), target.prepare().samples(x)
        loss = ((s.density - t.density) ** 2).mean() / 100 + ((s.albedo - t.albedo) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trainer.step_count = trainer.cfg.render.occupancy_warmup  # the grid is in use from here on
    rc = trainer.cfg.render
    cell = 2.0 / rc.occupancy_resolution * 3**0.5
    with torch.no_grad():
        trainer.occupancy.estimator.update_every_n_steps(0, occ_eval_fn=lambda x: trainer.field.query_density(x) * cell,
                                                         occ_thre=rc.occupancy_threshold, n=1, warmup_steps=1)


def time_steps(trainer: Trainer, live: LiveParams, steps: int) -> dict:
    for _ in range(2):  # warm-up
        trainer.step(live)
    rows, t0 = [], time.perf_counter()
    for _ in range(steps):
        rows.append(trainer.step(live).metrics)
    wall = time.perf_counter() - t0
    med = {k: statistics.median(r[k] for r in rows) for k in ("ms_render", "ms_prior", "ms_backward", "samples")}
    return {"its_per_s": steps / wall, **med}


def time_interleaved(trainers, live: LiveParams, rounds: int, steps: int) -> list[dict]:
    """`time_steps` for several trainers in alternating blocks of `steps` steps, so that this machine's
    drift in speed (±15-40 % over minutes on a shared 2-core CPU) falls on all of them alike."""
    for tr in trainers:  # warm-up
        for _ in range(2):
            tr.step(live)
    rows, walls = [[] for _ in trainers], [0.0] * len(trainers)
    for _ in range(rounds):
        for i, tr in enumerate(trainers):
            t0 = time.perf_counter()
            for _ in range(steps):
                rows[i].append(tr.step(live).metrics)
            walls[i] += time.perf_counter() - t0
    keys = ("ms_render", "ms_prior", "ms_backward", "samples")
    return [{"its_per_s": len(r) / w, **{k: statistics.median(x[k] for x in r) for k in keys}}
            for r, w in zip(rows, walls)]


def make(backbone: str, res: int, occupancy: bool) -> Trainer:
    cfg = Config(prior="oracle:cube").with_settings({"field.backbone": backbone, "render.resolution": res,
                                                     "render.occupancy": occupancy})
    return Trainer(cfg, load_prior(cfg.prior))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    live = LiveParams(prompt="a red cube", shading="lambertian")
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| backbone | res | its/s | ms render | ms prior | ms backward+optim | field samples/step |")
    print("|---|---|---|---|---|---|---|")
    for backbone, steps in (("grid", 5 if args.quick else 30), ("hash", 2 if args.quick else 5)):
        for res in (32, 64):
            tr = make(backbone, res, occupancy=True)
            tr.step_count = 10**6  # past the albedo-only warm-up and the occupancy warm-up
            r = time_steps(tr, live, steps)
            print(f"| {backbone} | {res}² | {r['its_per_s']:.2f} | {r['ms_render']:.0f} | {r['ms_prior']:.0f} | "
                  f"{r['ms_backward']:.0f} | {r['samples']:.0f} |", flush=True)
    print("\n| formed cube, grid backbone | res | dense its/s | skipping its/s | speedup | engine ms dense → skip "
          "| engine speedup | samples dense → skip |")
    print("|---|---|---|---|---|---|---|---|")
    for res in (32, 64):
        dense, skip = make("grid", res, occupancy=False), make("grid", res, occupancy=True)
        formed(skip)
        dense.field.load_state_dict(skip.field.state_dict())
        dense.step_count = skip.step_count = 10**6
        rd, rs = time_interleaved((dense, skip), live, rounds=2 if args.quick else 6, steps=4 if args.quick else 5)
        # engine = render + backward + optimizer: what skipping changes (the prior's time is the same in both)
        ed, es = rd["ms_render"] + rd["ms_backward"], rs["ms_render"] + rs["ms_backward"]
        print(f"| | {res}² | {rd['its_per_s']:.2f} | {rs['its_per_s']:.2f} | {rs['its_per_s'] / rd['its_per_s']:.2f}× | "
              f"{ed:.0f} → {es:.0f} | {ed / es:.2f}× | {rd['samples']:.0f} → {rs['samples']:.0f} |", flush=True)
    print("\n| formed cube, one 256² frame (viewer / video), no grad | dense ms | skipping ms | speedup |")
    print("|---|---|---|---|")
    cam = fixed_views([30.0], [20.0])
    times = [0.0, 0.0]
    for tr in (dense, skip):
        tr.render_views(cam, 256, 256, "lambertian")
    for _ in range(4):  # alternating, as above
        for i, tr in enumerate((dense, skip)):
            t0 = time.perf_counter()
            tr.render_views(cam, 256, 256, "lambertian")
            times[i] += (time.perf_counter() - t0) / 4 * 1e3
    print(f"| | {times[0]:.0f} | {times[1]:.0f} | {times[0] / times[1]:.2f}× |")


if __name__ == "__main__":
    main()
