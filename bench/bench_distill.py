"""Milliseconds per step of each distillation loss (engine.sds.distillation_grad) on this machine.

For each prior, the median wall time of `prior.sds_grad` with each `distillation` (VSD includes its copy's fitting
step), and how many U-Net rows the step runs. Priors: the tiny random SD and IF pipelines of engine/testing.py
(the code path of a real run, tiny widths; renders 2 x 3 x 64^2, as bench/bench_priors.py) and the shipped embedded
prior (renders 1 x 3 x 32^2, its preset). `--trainer` also times whole training steps of the embedded preset.

    python bench/bench_distill.py                 # ~1-2 min on 2 cores
    python bench/bench_distill.py --trainer       # + embedded Trainer.step per loss (~1 min more)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.bench_priors import time_ms  # noqa: E402
from engine.cameras import fixed_views  # noqa: E402
from engine.config import DISTILLATIONS  # noqa: E402
from engine.presets import live_defaults, preset  # noqa: E402
from engine.priors import load_prior  # noqa: E402
from engine.priors.base import SDSContext  # noqa: E402
from engine.testing import write_tiny_if, write_tiny_sd  # noqa: E402


def step_ms(prior, kind: str, batch: int, size: int, repeats: int, guidance: float) -> tuple[float, float, int]:
    """Median and minimum ms of one sds_grad with distillation `kind`, and the U-Net rows it ran (when the prior
    says). On a shared machine the minimum is the steadier figure: other users' bursts only ever add time."""
    emb = prior.encode_prompt("a red cube")
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    cams = fixed_views(torch.linspace(0, 180, batch).tolist(), [15.0] * batch)
    ctx = SDSContext(view_weights=cams.view_weights(), cameras=cams, distillation=kind,
                     vsd=prior.vsd_copy() if kind == "vsd" else None)
    gen = torch.Generator().manual_seed(0)
    last: dict = {}
    times: list[float] = []

    def run():
        t0 = time.perf_counter()
        last.update(prior.sds_grad(images, emb, ctx, guidance_scale=guidance, t_range=(0.02, 0.98), generator=gen)[1])
        times.append(1e3 * (time.perf_counter() - t0))

    return time_ms(run, repeats), min(times), last.get("unet_batch", 0)


def trainer_ms(kind: str, steps: int) -> float:
    """Median ms of a whole Trainer.step of the embedded preset with `kind` (after 10 warm-up steps)."""
    from engine.trainer import Trainer

    cfg = preset("embedded")
    live = live_defaults("embedded", prompt="a red cube", distillation=kind)
    tr = Trainer(cfg, load_prior("embedded"), "cpu", live)
    for _ in range(10):
        tr.step(live)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tr.step(live)
        times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20, help="timed steps per prior and loss (median reported)")
    ap.add_argument("--trainer", action="store_true", help="also time whole embedded training steps per loss")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}\n")
    with tempfile.TemporaryDirectory() as d:
        rows = [("SD tiny, VAE at 32^2, render 2 x 64^2",
                 lambda: load_prior(f"sd:{write_tiny_sd(f'{d}/sd')}", vae_resolution=32), 2, 64, 20.0),
                ("IF tiny, 16^2 pixels, render 2 x 64^2", lambda: load_prior(f"if:{write_tiny_if(f'{d}/if')}"), 2, 64,
                 20.0),
                ("embedded (shipped), render 1 x 32^2", lambda: load_prior("embedded"), 1, 32, 10.0)]
        print("| prior | " + " | ".join(DISTILLATIONS) + " |\n|---|" + "---|" * len(DISTILLATIONS))
        for label, load, batch, size, guidance in rows:
            prior = load()  # one prior at a time: steps timed while another one loaded ran up to 100x slower
            time.sleep(2.0)
            cells = []
            for kind in DISTILLATIONS:
                med, low, unet_rows = step_ms(prior, kind, batch, size, args.repeats, guidance)
                cells.append(f"{med:.0f} / {low:.0f}" + (f" ({unet_rows})" if unet_rows else ""))
            print(f"| {label} | " + " | ".join(cells) + " |")
        print("\nms per prior step, median / minimum of the timed steps; (n): U-Net rows of the prior's own\n"
              "branches per step (CFG alone: 2 per render; VSD's copy runs besides)")
    if args.trainer:
        print("\n| embedded preset, whole training step | " + " | ".join(DISTILLATIONS) + " |\n|---|"
              + "---|" * len(DISTILLATIONS))
        print("| ms / step | " + " | ".join(f"{trainer_ms(k, 30):.0f}" for k in DISTILLATIONS) + " |")


if __name__ == "__main__":
    main()
