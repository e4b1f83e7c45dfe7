"""The playground's figures on this machine, for either field: launch time, what a viewer costs training, and the
frame rate a person sees in the browser while the field trains.

1. ready: `python app.py --backbone B` launched as a subprocess until both servers answer HTTP 200 (median).
2. training its/s with no viewer, then with one viewer attached and its camera at rest, in alternating windows
   (so that changes in the machine's load hit both alike), then while the camera orbits (the mouse drags circles
   on the canvas, about 120 moves a second: input is never what bounds the frame rate).
   The viewer is headless Debian Chromium (Playwright, `executable_path=/usr/bin/chromium`, the tests' arguments)
   on an 800x600 page; it draws WebGL in software (SwiftShader) on the same CPU cores as training.
3. frame rate in the browser while orbiting, counted in the page by a script added before viser's client loads:
   - "drawn": animation frames (requestAnimationFrame ticks) in which WebGL drew something. viser renders on
     demand, so while the camera moves this is the browser's own rendering rate (what splats get);
   - NeRF: "NeRF frames shown": drawn frames that show a JPEG newer than the last drawn one (the server's frames
     the person sees; two frames arriving within one tick count once), and "arrived": JPEGs handed to the texture
     loader (`URL.createObjectURL` of an image/jpeg blob);
   - splats: the splat refresh rate, Gaussian buffers the server sent to this browser per second.
4. server side: NeRF: frames/s of the viewer's render path (frozen copy, 64-px render at 24 samples, JPEG) for a
   camera moving every frame while training runs; the side and render time of frames at rest, sized to the canvas
   within the viewer's time budget; the time from the camera's last move to the first and the final (refined)
   frame at rest. Splats: the time to bake one refresh (copy, colours for the view, covariances).

    python bench/bench_app.py --backbone grid        # NeRF (the default field), oracle:cube prior, ~4 min
    python bench/bench_app.py --backbone gaussians   # Gaussian splats drawn by the browser
    python bench/bench_app.py --quick                # short windows, one launch: a check that it runs (~1 min)

The session and the viewer run in this process, as app.py runs them (one torch thread), so that the viewer's own
counters can be read. Chromium raises its browser and GPU processes' priority where it may (nice -8 as root): they
are put back at this script's niceness, as a person's browser and app.py share one level. Every wait is bounded; a
failure prints one line and exits with status 1.
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
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "GRADIO_ANALYTICS_ENABLED": "False"}.items():
    os.environ.setdefault(_k, _v)
from playground.testing import CHROMIUM_ARGS, stop_app  # noqa: E402  (light: no gradio, no torch)

VIEWPORT = {"width": 800, "height": 600}
LEVELLED: set = set()  # browser processes already put at the script's niceness (level_browser)
# Counters in the page, installed before viser's client runs: animation frames, those in which WebGL drew, JPEGs
# handed to the texture loader, and drawn frames showing a JPEG newer than the previous drawn frame.
PAGE_COUNTERS = """(() => {
  const st = window.__bench = {ticks: 0, drawn: 0, jpegs: 0, shown: 0, drew: false, fresh: false};
  for (const C of [window.WebGLRenderingContext, window.WebGL2RenderingContext]) {
    if (!C) continue;
    for (const name of ["drawElements", "drawArrays", "drawElementsInstanced", "drawArraysInstanced"]) {
      const f = C.prototype[name];
      if (f) C.prototype[name] = function (...a) { st.drew = true; return f.apply(this, a); };
    }
  }
  const make = URL.createObjectURL;
  URL.createObjectURL = function (obj) {
    if (obj && obj.type === "image/jpeg") { st.jpegs++; st.fresh = true; }
    return make.call(this, obj);
  };
  const tick = () => {
    st.ticks++;
    if (st.drew) { st.drawn++; if (st.fresh) { st.shown++; st.fresh = false; } st.drew = false; }
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
})();"""
COUNTS = "(() => { const s = window.__bench; return {ticks: s.ticks, drawn: s.drawn, jpegs: s.jpegs, shown: s.shown, " \
         "t: performance.now()}; })()"
CANVAS = """(() => { const c = [...document.querySelectorAll('canvas')].sort((a, b) =>
    b.clientWidth * b.clientHeight - a.clientWidth * a.clientHeight)[0];
  return {css: [c.clientWidth, c.clientHeight], dpr: window.devicePixelRatio}; })()"""


class BenchError(RuntimeError):
    """A failure the script reports in one line (exit status 1)."""


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


def time_ready(prior: str, backbone: str, timeout: float = 120.0) -> float:
    """Seconds from launching app.py until the pane and the viewer both answer HTTP 200."""
    port, vport = free_port(), free_port()
    with tempfile.TemporaryDirectory() as out:
        log = Path(out) / "app.log"
        with open(log, "w") as fh:
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "app.py", "--prior", prior, "--backbone", backbone, "--port",
                                     str(port), "--viewer-port", str(vport), "--out", str(Path(out) / "outputs")],
                                    cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        try:
            while not (answers(f"http://127.0.0.1:{port}/") and answers(f"http://127.0.0.1:{vport}/")):
                if proc.poll() is not None or time.perf_counter() - t0 > timeout:
                    tail = log.read_text()[-1500:].strip()
                    raise BenchError(f"app.py did not come up in {timeout:.0f} s (exit status {proc.poll()}):\n{tail}")
                time.sleep(0.05)
            return time.perf_counter() - t0
        finally:
            stop_app(proc)


def until(pred, timeout: float, what: str):
    """pred()'s first truthy value, polled every 50 ms; BenchError naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := pred():
            return value
        time.sleep(0.05)
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")


def per_second(before: dict, after: dict) -> dict:
    """Rates between two readings of the page's counters ({name: count, "t": page clock in ms})."""
    seconds = max(1e-3, (after["t"] - before["t"]) / 1e3)
    return {k: round((after[k] - before[k]) / seconds, 2) for k in before if k != "t"}


def its_over(session, seconds: float) -> float:
    s0, t0 = session.step, time.perf_counter()
    time.sleep(seconds)
    if session.state != "running":
        raise BenchError(f"training stopped: {session.state} ({session.error or session.message})")
    return (session.step - s0) / (time.perf_counter() - t0)


# Pointer moves dispatched by the page at each animation frame (as a browser coalesces a real mouse's moves), along a
# circle, while the real (Playwright) mouse button is held down: the camera moves every frame the browser draws, and
# a driver round trip per move (~80 ms here under load) does not bound the rate. Resolves to the number of moves.
PAGE_ORBIT = """([cx, cy, r, ms]) => new Promise((resolve) => {
  const target = document.elementFromPoint(cx, cy);
  const t0 = performance.now();
  let n = 0;
  const step = () => {
    const t = performance.now() - t0, a = 2.0 * t / 1000;
    const x = cx + r * Math.cos(a), y = cy + r * Math.sin(a);
    target.dispatchEvent(new PointerEvent("pointermove", {clientX: x, clientY: y, screenX: x, screenY: y,
      pointerId: 1, pointerType: "mouse", isPrimary: true, buttons: 1, bubbles: true, cancelable: true,
      composed: true}));
    n++;
    if (t < ms) requestAnimationFrame(step); else resolve(n);
  };
  requestAnimationFrame(step);
})"""


def orbit(page, box: dict, seconds: float, *, radius: float = 80.0, in_page: bool = True) -> int:
    """Drag the mouse in circles around the canvas's centre for `seconds` (the camera keeps moving); returns the
    number of pointer moves. `in_page`: moves dispatched by the page each frame (PAGE_ORBIT); else Playwright's
    mouse moves every 8 ms, each a round trip to the browser."""
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx + radius, cy)
    page.mouse.down()
    moves = 0
    try:
        if in_page:
            moves = page.evaluate(PAGE_ORBIT, [cx, cy, radius, 1e3 * seconds])
        else:
            t0 = time.perf_counter()
            while (t := time.perf_counter() - t0) < seconds:
                page.mouse.move(cx + radius * math.cos(2.0 * t), cy + radius * math.sin(2.0 * t))
                moves += 1
                time.sleep(0.008)
    finally:
        page.mouse.up()
    return moves


def descendants(pid: int) -> list[int]:
    """The ids of every process below `pid` (read from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        out += (kids := children.get(todo.pop(), []))
        todo += kids
    return out


def level_browser(levelled: set) -> None:
    """Put the browser's processes (this script's descendants) at the script's own niceness: Chromium raises its
    browser and GPU processes (to -8 when it may), which would let the viewer outrank the training it is measured
    against; a person's browser and app.py run at the same level. `levelled`: ids already done."""
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    for pid in descendants(os.getpid()):
        if pid in levelled:
            continue
        try:
            if os.getpriority(os.PRIO_PROCESS, pid) != nice:
                os.setpriority(os.PRIO_PROCESS, pid, nice)
            levelled.add(pid)
        except OSError:
            pass


class LoadSampler:
    """The 1-minute load average every few seconds on a thread, for the report."""

    def __init__(self, every_s: float = 5.0):
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict:
        self._stop.set()
        s = self.samples + [os.getloadavg()[0]]
        return {"min": round(min(s), 2), "median": round(statistics.median(s), 2), "max": round(max(s), 2)}


def nerf_render_path(session, seconds: float) -> dict:
    """Frames/s of the viewer's moving-camera path (fresh copy, 64x64 render at 24 samples, JPEG) while training
    runs, a camera that moves every frame (what the server can send, whatever the browser does)."""
    import io

    from PIL import Image

    from engine.cameras import fixed_views
    from engine.export import to_uint8

    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        snap = session.render_source()
        img = snap.render(fixed_views([7.0 * n], [20.0], distance=3.0), 64, 64, "lambertian", live=session.a.used,
                          samples=24)
        Image.fromarray(to_uint8(img)[0]).save(io.BytesIO(), format="JPEG", quality=85)
        n += 1
    return {"low_fps": round(n / (time.perf_counter() - t0), 2)}


def splat_bake_path(session, repeats: int = 10) -> dict:
    """The time of one splat refresh's server work (`splat_cloud`: the copy's Gaussians baked for a lit view), and
    the number of Gaussians."""
    from playground.splatview import splat_cloud

    times, count = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        field = session.render_source().source.field
        cloud = splat_cloud(field, "lambertian", eye=(2.6, 1.2, 1.2), live=session.a.used)
        times.append(time.perf_counter() - t)
        count = len(field)
    return {"bake_ms_median": round(1e3 * statistics.median(times), 1), "gaussians": count,
            "gaussians_sent": int(cloud["centers"].shape[0])}


def rest_figures(client, page, box: dict, splats: bool, tries: int = 5) -> dict:
    """NeRF: time from the camera's last move to the first frame at rest and to the final one (the refinement to
    the canvas's size, as far as the budget allows), median of `tries` short drags."""
    if splats:
        return {}
    first, final = [], []
    for _ in range(tries):
        time.sleep(1.5)
        orbit(page, box, 0.6)
        moved = client.moved_at  # a camera update still in flight moves it on: the latest one counts
        try:
            until(lambda m=moved: client.full_at > client.moved_at >= m, 15, "a frame at rest")
            first.append(client.full_at - client.moved_at)
            until(lambda: client.full_at > client.moved_at and client.sent and client.sent[3] == "rest"
                  and client.sent[4] >= 0.8 * client.rest_side(), 15, "the refined frame at rest")
            final.append(client.full_at - client.moved_at)
        except BenchError as err:
            print(f"  ({err})", flush=True)
    rest = [(side, cost) for _, side, cost in list(client.log) if side != client.viewer.low_res]
    low = [cost for _, side, cost in list(client.log) if side == client.viewer.low_res]
    return {"to_rest_frame_s": [round(x, 3) for x in first], "to_final_rest_frame_s": [round(x, 3) for x in final],
            "to_rest_median_s": statistics.median(first) if first else None,
            "to_final_median_s": statistics.median(final) if final else None,
            "rest_side_median": statistics.median([s for s, _ in rest]) if rest else None,
            "rest_ms_median": round(1e3 * statistics.median([c for _, c in rest]), 1) if rest else None,
            "low_ms_median": round(1e3 * statistics.median(low), 1) if low else None,
            "canvas_side_reported": client.canvas_side(), "rest_budget_s": client.viewer.rest_budget_s}


def start_session(args, out: str):
    import torch

    from engine.presets import preset_run
    from playground.session import Session

    torch.set_num_threads(args.threads)
    overrides = {"field.backbone": args.backbone}  # as `python app.py --backbone B`
    cfg, live = preset_run(args.prior, "cpu", {**overrides, "live.steps": 10**6})
    session = Session(cfg, live, device="cpu", out_root=out, overrides=overrides)
    session.start()
    until(lambda: session.state == "error" or session.step >= args.warmup_steps, args.warmup_timeout,
          f"{args.warmup_steps} warm-up steps")
    if session.state == "error":
        raise BenchError(f"training failed: {session.error}")
    return cfg, session


def attach(browser, viewer, splats: bool, timeout: float):
    """A page on the viewer; returns it once the viewer shows the field: a NeRF frame at rest at the size it settles
    on (the canvas's, or what the render budget allows), or the splats sent to the browser."""
    page = browser.new_page(viewport=VIEWPORT)
    page.add_init_script(PAGE_COUNTERS)
    page.goto(viewer.url, timeout=60_000)
    page.locator("canvas").first.wait_for(timeout=60_000)
    client = until(lambda: next(iter(viewer.clients.values()), None), timeout, "the browser to connect to the viewer")
    if splats:
        until(lambda: client.splats.sends > 0, timeout, "the splats to be sent to the browser")
    else:
        until(lambda: client.sent and client.sent[3] == "rest" and client.sent[4] >= 0.8 * client.rest_side(),
              timeout, "a frame at rest at the canvas's size (or the budget's)")
    level_browser(LEVELLED)  # new pages bring new renderer processes
    box = page.locator("canvas").first.bounding_box()
    return page, client, box


def viewer_rounds(args, session, viewer, browser, splats: bool) -> dict:
    """Alternating windows of training alone and with a viewer at rest (a fresh page each time)."""
    alone, at_rest, rates = [], [], []
    for _ in range(args.rounds):  # alternate, so that changes in the machine's load hit both alike
        alone.append(its_over(session, args.seconds))
        page, client, _ = attach(browser, viewer, splats, args.attach_timeout)
        c0, sends0, t0 = page.evaluate(COUNTS), client.splats.sends, time.perf_counter()
        at_rest.append(its_over(session, args.seconds))
        dt = time.perf_counter() - t0
        rates.append({**per_second(c0, page.evaluate(COUNTS)),
                      "splat_refresh": round((client.splats.sends - sends0) / dt, 2)})
        print(f"its/s alone {alone[-1]:.2f}, with a viewer at rest {at_rest[-1]:.2f}; page at rest {rates[-1]}",
              flush=True)
        page.close()
        until(lambda: not viewer.clients, 15, "the browser to disconnect")
    return {"its_alone": [round(x, 2) for x in alone], "its_viewer_at_rest": [round(x, 2) for x in at_rest],
            "page_at_rest_per_s": rates}


def orbiting(args, session, viewer, browser, splats: bool) -> dict:
    """A fresh page whose camera orbits for `args.seconds`: its/s and the page's rates; then the NeRF's times to
    the frame at rest."""
    page, client, box = attach(browser, viewer, splats, args.attach_timeout)
    try:
        canvas = page.evaluate(CANVAS)
        s0, c0, sends0, frames0 = session.step, page.evaluate(COUNTS), client.splats.sends, client.frames
        t0, updates0 = time.perf_counter(), client._stamp
        moves = orbit(page, box, args.seconds, in_page=args.input == "page")
        c1, dt = page.evaluate(COUNTS), time.perf_counter() - t0
        moving = {"its": round((session.step - s0) / dt, 2), "input": args.input,
                  "pointer_moves_per_s": round(moves / dt, 1),
                  "camera_updates_per_s": round((client._stamp - updates0) / dt, 2),
                  **per_second(c0, c1), "server_frames_sent": round((client.frames - frames0) / dt, 2),
                  "splat_refresh": round((client.splats.sends - sends0) / dt, 2)}
        print(f"orbiting: {moving}", flush=True)
        if moving["camera_updates_per_s"] < 1:
            raise BenchError(f"the camera did not move while orbiting ({args.input} input): {moving}")
        rest = rest_figures(client, page, box, splats, tries=args.rest_tries)
        if rest:
            print(f"at rest: {rest}", flush=True)
    finally:
        page.close()
    return {"canvas": canvas, "orbiting": moving, "rest": rest}


def measure(args) -> dict:
    from playwright.sync_api import sync_playwright

    from playground.viewer import Viewer

    splats = args.backbone == "gaussians"
    cfg, session = start_session(args, tempfile.mkdtemp(prefix="bench_app_"))
    res: dict = {"config": {"backbone": args.backbone, "resolution": cfg.render.resolution,
                            "batch_size": cfg.camera.batch_size, "num_samples": cfg.render.num_samples}}
    viewer = None
    try:
        res["server_side"] = splat_bake_path(session) if splats else nerf_render_path(session, args.seconds / 2)
        print(f"server side, while training: {res['server_side']}", flush=True)
        viewer = Viewer(session, port=free_port())
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS, timeout=60_000)
            try:
                res.update(viewer_rounds(args, session, viewer, browser, splats))
                res.update(orbiting(args, session, viewer, browser, splats))
            finally:
                browser.close()
    finally:
        if viewer is not None:
            viewer.stop()
        session.stop()
    base = statistics.median(res["its_alone"])
    res["fraction_at_rest"] = round(statistics.median(res["its_viewer_at_rest"]) / base, 3)
    res["fraction_orbiting"] = round(res["orbiting"]["its"] / base, 3)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--backbone", choices=("grid", "hash", "gaussians"), default="grid",
                    help="field: a NeRF (grid, the default; hash) or Gaussian splats")
    ap.add_argument("--prior", default="oracle:cube")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each its/s and frame-rate window")
    ap.add_argument("--warmup-steps", type=int, default=100, help="steps before measuring (occupancy grid in use)")
    ap.add_argument("--warmup-timeout", type=float, default=180.0, help="seconds allowed for the warm-up steps")
    ap.add_argument("--attach-timeout", type=float, default=120.0, help="seconds allowed for a page to show the field")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, as app.py's --threads")
    ap.add_argument("--ready-runs", type=int, default=3, help="launches of app.py timed (0 skips)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating windows without / with a viewer at rest")
    ap.add_argument("--input", choices=("page", "playwright"), default="page",
                    help="how the orbit moves the mouse: pointer moves dispatched by the page each frame (default), "
                         "or Playwright's mouse moves (a round trip each)")
    ap.add_argument("--rest-tries", type=int, default=5, help="NeRF: short drags timed to the frame at rest")
    ap.add_argument("--deadline", type=float, default=900.0, help="seconds after which the script gives up")
    ap.add_argument("--quick", action="store_true", help="5-s windows, one launch, one round: a check that it runs")
    ap.add_argument("--ready-only", action="store_true", help="only time the launches")
    ap.add_argument("--out", default=str(ROOT / "bench" / "app_results.json"),
                    help="results JSON; with several backbones each is kept under its own key")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.ready_runs, args.rounds, args.warmup_steps, args.rest_tries = 5.0, 1, 1, 30, 2

    def give_up(*_):
        raise BenchError(f"gave up after --deadline {args.deadline:.0f} s")

    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(int(args.deadline))
    load = LoadSampler()
    try:
        ready = [time_ready(args.prior, args.backbone) for _ in range(args.ready_runs)]
        print(f"ready: {[round(r, 2) for r in ready]} s", flush=True)
        res = {} if args.ready_only else measure(args)
    except BenchError as err:
        print(f"bench_app: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.alarm(0)
    import torch

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git.strip(),
           "machine": f"{os.cpu_count()}-core CPU, torch {torch.__version__}", "prior": args.prior,
           "backbone": args.backbone, "torch_threads": args.threads, "quick": args.quick,
           "ready_s": [round(r, 2) for r in ready], "ready_median_s": round(statistics.median(ready), 2) if ready else None,
           **res, "load_average_1min": load.stop()}
    path = Path(args.out)
    try:
        allres = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        allres = {}
    allres = allres if isinstance(allres, dict) and "machine" not in allres else {}  # the old single-run layout
    allres[args.backbone] = res
    path.write_text(json.dumps(allres, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
