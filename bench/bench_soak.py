"""Soak: a running session under three viewers and an API client changing random controls at random times.

Everything stays on loopback and every loop is bounded by the deadline. The session trains the oracle
prior at a small size; meanwhile
1. one API client (gradio_client against the pane served on 127.0.0.1) sends a random control every
   0-0.5 s: mostly valid values, one in five a bad one that must be refused with a message; now and then
   pause/resume or a snapshot export;
2. three viewers each render the field through the viewer's render path (the session's frozen copy,
   a random camera and render mode, JPEG) in a loop, and every ~20 s disconnect and connect again; each
   also opens and drops a WebSocket on the real viser server, so connects and disconnects mid-run happen.
It reports steps done, the errors seen (exceptions, an error state, a refusal without a message), and the
process's RSS: at launch (after a 30 s warm-up with no clients), each minute, at the start of the measured
window (after --settle minutes under load, once the clients' threads, buffers and connections exist) and at
the end. The growth figure (target <= 10 %) is end over start of that window: a leak keeps climbing through
it, a warm-up does not.

    python bench/bench_soak.py                 # 30 minutes
    python bench/bench_soak.py --minutes 5
    python bench/bench_soak.py --seconds 10 --warmup 1 --settle 0 --json soak.json   # the short one (tests/test_soak.py)

It exits 1 when an error was seen, no step was done, or training did not go on after the soak.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def random_change(rng: random.Random) -> tuple[dict, bool]:
    """(keyword arguments of /set_params, whether they are valid)."""
    good = {"guidance_scale": rng.uniform(0, 200), "shading": rng.choice(["random", "albedo", "lambertian"]),
            "light_mode": rng.choice(["random", "camera", "fixed"]), "light_azimuth": rng.uniform(-180, 180),
            "light_elevation": rng.uniform(-90, 90), "light_color": [rng.random() for _ in range(3)],
            "ambient": rng.random(), "learning_rate": rng.uniform(1e-3, 3e-2),
            "prompt": rng.choice(["a red cube", "a blue cube", "a green cube"])}
    bad = {"guidance_scale": float("nan"), "shading": "toon", "ambient": 5.0, "prompt": "",
           "learning_rate": -1.0, "light_elevation": 1e9}
    if rng.random() < 0.2:
        k = rng.choice(list(bad))
        return {k: bad[k]}, False
    k = rng.choice(list(good))
    return {k: good[k]}, True


class Soak:
    """The threads of a soak against `session`; `call(name, **kw)` reaches the pane's API."""

    def __init__(self, session, call, viewer_port: int | None = None, seed: int = 0):
        self.session, self.call, self.viewer_port = session, call, viewer_port
        self.rng = random.Random(seed)
        self.errors: list[str] = []
        self.counts = {"changes": 0, "refused": 0, "frames": 0, "reconnects": 0}
        self._mu = threading.Lock()

    def error(self, what: str) -> None:
        with self._mu:
            self.errors.append(what)

    def api_client(self, deadline: float) -> None:
        rng = random.Random(self.rng.random())
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0, 0.5))
            kw, valid = random_change(rng)
            roll = rng.random()
            if roll < 0.05:
                kw, valid = ({"kind": "snapshot"}, True) if roll < 0.02 else ({}, True)
            try:
                if roll < 0.02:
                    self.call("export", kind="snapshot")
                elif roll < 0.05:
                    self.call("pause")
                    time.sleep(rng.uniform(0, 0.5))
                    self.call("resume")
                else:
                    self.call("set_params", **kw)
                    self.counts["changes"] += 1
                    if not valid:
                        self.error(f"accepted a bad value {kw}")
            except Exception as err:
                if valid or not str(err).strip():
                    self.error(f"{kw}: {type(err).__name__}: {err}")
                else:
                    self.counts["refused"] += 1
            if self.session.state == "error":
                self.error(f"session error: {self.session.error}")
                self.session.reset()
                self.session.start()

    def viewer(self, deadline: float, index: int) -> None:
        import torch
        from PIL import Image

        from engine.cameras import fixed_views
        from engine.export import to_uint8

        rng = random.Random(index)
        while time.monotonic() < deadline:
            self._connect_ws()
            session_end = min(deadline, time.monotonic() + rng.uniform(10, 30))
            while time.monotonic() < session_end:
                snap = self.session.render_source()
                if snap is None:
                    time.sleep(0.1)
                    continue
                size = rng.choice([32, 64, 64, 96])
                cams = fixed_views([rng.uniform(0, 360)], [rng.uniform(-10, 80)], distance=3.0)
                try:
                    with torch.no_grad():
                        img = snap.render(cams, size, size, rng.choice(["lambertian", "albedo", "normal"]),
                                          live=self.session.a.used, samples=24)
                    Image.fromarray(to_uint8(img)[0]).save(io.BytesIO(), format="JPEG", quality=85)
                    self.counts["frames"] += 1
                except Exception as err:
                    self.error(f"viewer {index}: {type(err).__name__}: {err}")
                time.sleep(rng.uniform(0, 0.2))
            self.counts["reconnects"] += 1

    def _connect_ws(self) -> None:
        if self.viewer_port is None:
            return
        try:
            import viser
            from websockets.sync.client import connect

            with connect(f"ws://127.0.0.1:{self.viewer_port}", subprotocols=[f"viser-v{viser.__version__}"],
                         open_timeout=5) as ws:
                ws.recv(timeout=2)  # the server's greeting; then drop it, as a closed tab does
        except Exception as err:
            self.error(f"viewer websocket: {type(err).__name__}: {err}")

    def run(self, seconds: float, viewers: int = 3, api_clients: int = 1) -> dict:
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self.api_client, args=(deadline,), daemon=True)
                   for _ in range(api_clients)]
        threads += [threading.Thread(target=self.viewer, args=(deadline, i), daemon=True) for i in range(viewers)]
        step0, t0 = self.session.step, time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic() + 30))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            self.error(f"threads still running 30 s after the deadline: {stuck}")
        return {"seconds": round(time.monotonic() - t0, 1), "steps": self.session.step - step0,
                "errors": len(self.errors), "first_errors": self.errors[:5], **self.counts}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--seconds", type=float, default=None, help="the soak's length in seconds (instead of --minutes)")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds of training before the clients start")
    p.add_argument("--settle", type=float, default=2.0,
                   help="minutes under load before the measured window starts (0: measure from launch)")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args()
    seconds = args.seconds if args.seconds is not None else 60 * args.minutes
    import tempfile

    import torch
    from gradio_client import Client

    from bench.bench_app import free_port
    from engine.testing import tiny_config, tiny_live, wait_for
    from playground.panel import Panel
    from playground.session import Session
    from playground.viewer import Viewer

    torch.set_num_threads(1)
    out = tempfile.mkdtemp(prefix="soak-")  # snapshots the API client asks for
    session = Session(tiny_config("oracle:cube"), tiny_live(), out_root=out)
    viewer = Viewer(session, host="127.0.0.1", port=free_port())
    demo = Panel(session, viewer.url).build()
    demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True,
                allowed_paths=[out])  # the exports the API client asks for are offered as downloads
    client = Client(demo.local_url, verbose=False)

    def call(name, **kw):
        return client.predict(api_name=f"/{name}", **kw)

    session.start()
    time.sleep(args.warmup)
    rss_launch, steps0 = rss_mb(), session.step
    trace, done, window = [], threading.Event(), {"rss0": rss_launch}  # RSS every minute

    def sample():
        t0 = time.monotonic()
        if args.settle > 0 and not done.wait(60.0 * args.settle):
            window["rss0"] = rss_mb()
        while not done.wait(60.0 - (time.monotonic() - t0) % 60.0):
            trace.append(round(rss_mb(), 1))

    threading.Thread(target=sample, daemon=True).start()
    result = Soak(session, call, viewer.port).run(seconds)
    done.set()
    rss1 = rss_mb()
    before = session.step
    session.resume()  # in case the last thing the client did was a pause
    session.wait_idle_queue()
    try:  # training goes on after the soak
        wait_for(lambda: session.step > before, timeout=120.0, what="steps after the soak")
        result["goes_on_after"] = True
    except AssertionError:
        result["goes_on_after"] = False
    result["rss_mb_each_minute"] = trace
    rss0 = window["rss0"]
    result.update({"rss_launch_mb": round(rss_launch, 1), "settle_minutes": args.settle,
                   "rss_start_mb": round(rss0, 1), "rss_end_mb": round(rss1, 1),
                   "rss_growth_pct": round(100 * (rss1 - rss0) / rss0, 1), "state": session.state,
                   "total_steps": session.step - steps0})
    demo.close()
    viewer.stop()
    session.stop()
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["errors"] == 0 and result["steps"] > 0 and result["goes_on_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
