"""The playground's figures on this machine: launch time, viewer frame rates during training, and what a
viewer costs training.

1. ready: `python app.py` launched as a subprocess until both servers answer HTTP 200 (median of 3).
2. its/s of training with no viewer (after a warm-up, so the occupancy grid is in use).
3. one viewer attached (headless Chromium on the viser URL, 256x256 canvas), camera at rest: its/s.
4. the same viewer while the camera orbits (the mouse drags in circles): frames/s delivered, its/s.
   Headless Chromium draws viser's canvas in software (SwiftShader) on the same 2 cores, so this is
   bounded by how often the browser sends camera updates; hence also:
5. server side, while training: frames/s of the viewer's render path (copy, 64x64 render, JPEG) for a
   camera that moves every frame, and the time of one 256x256 frame.
6. time from the camera's last move to the full-resolution (256) frame being sent (median of 5).

    python bench/bench_app.py                      # oracle:cube prior, ~3 min
    python bench/bench_app.py --prior embedded     # once assets/embedded_prior.safetensors exists
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--enable-unsafe-swiftshader", "--use-angle=swiftshader",
                 "--disable-dev-shm-usage", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def time_ready(prior: str) -> float:
    """Seconds from launching app.py until the pane and the viewer both answer."""
    port, vport = free_port(), free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--prior", prior, "--port", str(port), "--viewer-port",
                             str(vport)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (answers(f"http://127.0.0.1:{port}/") and answers(f"http://127.0.0.1:{vport}/")):
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                raise RuntimeError("app.py did not come up")
            time.sleep(0.05)
        return time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def its_over(session, seconds: float) -> float:
    s0, t0 = session.step, time.perf_counter()
    time.sleep(seconds)
    return (session.step - s0) / (time.perf_counter() - t0)


def orbit_drag(page, seconds: float, radius: float = 60.0) -> None:
    """Drag the mouse in circles on the canvas for `seconds` (the camera keeps moving)."""
    cx, cy = 150, 360  # lower left of a 512x512 page: clear of viser's control panel
    page.mouse.move(cx + radius, cy)
    page.mouse.down()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a = (time.perf_counter() - t0) * 2.0
        page.mouse.move(cx + radius * math.cos(a), cy + radius * math.sin(a))
        page.wait_for_timeout(30)
    page.mouse.up()


def render_capacity(session, seconds: float) -> dict:
    """Frames/s the viewer's render path (fresh copy of the field, render, JPEG) sustains while training runs,
    for a camera orbiting on every frame (64x64, 24 samples), and the time of one 256x256 frame (32 samples)."""
    import io

    from PIL import Image

    from engine.cameras import fixed_views
    from engine.export import to_uint8

    def frame(i: int, size: int, samples: int) -> None:
        snap = session.render_source()
        img = snap.render(fixed_views([7.0 * i], [20.0], distance=3.0), size, size, "lambertian", live=session.a.used,
                          samples=samples)
        Image.fromarray(to_uint8(img)[0]).save(io.BytesIO(), format="JPEG", quality=85)

    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        frame(n, 64, 24)
        n += 1
    fps = n / (time.perf_counter() - t0)
    full = []
    for i in range(5):
        t = time.perf_counter()
        frame(i, 256, 32)
        full.append(time.perf_counter() - t)
    return {"low_fps": round(fps, 2), "full_s": [round(x, 3) for x in full], "full_median_s": statistics.median(full)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prior", default="oracle:cube")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each its/s and frame-rate window")
    ap.add_argument("--warmup-steps", type=int, default=100, help="steps before measuring (occupancy grid in use)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, as app.py's --threads")
    ap.add_argument("--ready-runs", type=int, default=3, help="launches of app.py timed (0 skips)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating windows without / with a viewer")
    ap.add_argument("--out", default=str(ROOT / "bench" / "app_results.json"))
    ap.add_argument("--ready-only", action="store_true", help="only time the launches")
    args = ap.parse_args()

    ready = [time_ready(args.prior) for _ in range(args.ready_runs)]
    print(f"ready: {[round(r, 2) for r in ready]} s", flush=True)
    if args.ready_only:
        return

    import torch
    from playwright.sync_api import sync_playwright

    from engine.config import Config, LiveParams
    from playground.session import Session
    from playground.viewer import Viewer

    torch.set_num_threads(args.threads)
    cfg = Config(prior=args.prior)
    session = Session(cfg, LiveParams(steps=10**6))
    session.start()
    while session.step < args.warmup_steps:
        if session.state == "error":
            raise RuntimeError(session.error)
        time.sleep(0.2)
    server_side = render_capacity(session, args.seconds / 2)
    print(f"server-side, while training: {server_side}", flush=True)

    viewer = Viewer(session, port=free_port(), full_res=256, low_res=64)
    alone, at_rest, full_refreshes = [], [], 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)

        def open_viewer():
            page = browser.new_page(viewport={"width": 512, "height": 512})  # square canvas: 256x256 frames
            page.goto(viewer.url)
            end = time.perf_counter() + 180
            while not viewer.clients or not any(r.sent and r.sent[3] == 256 for r in viewer.clients.values()):
                if time.perf_counter() > end:
                    raise RuntimeError("the viewer sent no full-resolution frame in 180 s")
                time.sleep(0.1)
            return page, next(iter(viewer.clients.values()))

        for _ in range(args.rounds):  # alternate, so that changes in the machine's load hit both alike
            alone.append(its_over(session, args.seconds))
            page, client = open_viewer()
            at_rest.append(its_over(session, args.seconds))
            full_refreshes += sum(1 for t, r, _ in client.log if r == 256 and t > time.perf_counter() - args.seconds)
            print(f"its/s alone {alone[-1]:.2f}, with a viewer at rest {at_rest[-1]:.2f}", flush=True)
            page.close()
            time.sleep(1.0)
        page, client = open_viewer()

        s0, t0, n0 = session.step, time.perf_counter(), len(client.log)
        orbit_drag(page, args.seconds)
        moving_s = time.perf_counter() - t0
        moving = (session.step - s0) / moving_s
        frames = [e for e in list(client.log)[n0:] if e[0] <= t0 + moving_s]
        low = [e for e in frames if e[1] == 64]
        fps = len(frames) / moving_s
        print(f"moving: {fps:.1f} frames/s ({len(low)} low-res of {len(frames)}), its/s {moving:.2f}", flush=True)

        to_full = []
        for _ in range(5):
            time.sleep(1.5)
            orbit_drag(page, 0.6)
            moved = client.moved_at
            end = time.perf_counter() + 15
            while time.perf_counter() < end:
                hit = [t for t, r, _ in list(client.log) if r == 256 and t > moved]
                if hit:
                    to_full.append(hit[0] - moved)
                    break
                time.sleep(0.01)
        full_cost = [c for _, r, c in client.log if r == 256]
        low_cost = [c for _, r, c in client.log if r == 64]
        print(f"time to full-res at rest: {[round(x, 3) for x in to_full]} s", flush=True)
        browser.close()
    viewer.stop()
    session.stop()

    res = {"machine": f"{os.cpu_count()}-core CPU, torch {torch.__version__}", "prior": args.prior,
           "torch_threads": args.threads,
           "config": {"resolution": cfg.render.resolution, "batch_size": cfg.camera.batch_size,
                      "num_samples": cfg.render.num_samples},
           "load_average_at_end": os.getloadavg(),
           "server_side_while_training": server_side, "ready_s": ready,
           "ready_median_s": statistics.median(ready) if ready else None,
           "its_alone": alone, "its_viewer_at_rest": at_rest, "its_viewer_moving": moving,
           "full_frames_at_rest": full_refreshes,
           "fraction_at_rest": statistics.median(at_rest) / statistics.median(alone),
           "fraction_moving": moving / statistics.median(alone),
           "moving_fps": fps, "moving_low_res_frames": len(low), "moving_frames": len(frames),
           "to_full_res_s": to_full, "to_full_res_median_s": statistics.median(to_full) if to_full else None,
           "render_ms_low_median": 1e3 * statistics.median(low_cost) if low_cost else None,
           "render_ms_full_median": 1e3 * statistics.median(full_cost) if full_cost else None}
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
