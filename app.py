"""DreamFusion Playground: `python app.py` serves the Gradio pane and the viser 3D viewer on 127.0.0.1.

Type a prompt, press Start, and watch the object form; orbit it in the viewer while it trains.
Ctrl-C (or SIGTERM) stops training at a step boundary, closes both servers and checkpoints an unsaved run.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import threading
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported (no network on launch)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python app.py", description="DreamFusion Playground: text to 3D, live.")
    p.add_argument("--port", type=int, default=7860, help="port of the Gradio pane (default 7860)")
    p.add_argument("--viewer-port", type=int, default=8080, help="port of the viser 3D viewer (default 8080)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on; anything but loopback needs --auth")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="password-protect the pane")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    p.add_argument("--prior", default="embedded", help="prior of new runs: embedded (default), oracle:<solid>, "
                   "gaussian, sd[:<id or folder>], if[:<id or folder>]")
    p.add_argument("--out", default="outputs", help="folder for run exports (default ./outputs)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--prompt", default=None, help="initial prompt")
    p.add_argument("--steps", type=int, default=None, help="training steps of a run")
    p.add_argument("--resolution", type=int, default=None, help="training render size (default: the config's)")
    p.add_argument("--batch-size", type=int, default=None, help="views per training step")
    p.add_argument("--samples", type=int, default=None, help="samples per ray")
    p.add_argument("--backbone", choices=("grid", "hash", "gaussians"), default=None,
                   help="field of new runs: a NeRF (grid, hash; default: the prior's) or gaussians (Gaussian splats)")
    p.add_argument("--viewer-resolution", type=int, default=None, help="largest long side of viewer frames at "
                   "rest (default 4096: each frame matches the browser's canvas in device pixels, up to it, "
                   "as far as its render time allows)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: training and each viewer "
                   "render then run side by side; more threads fight over a small, shared CPU)")
    p.add_argument("--train-util", type=float, default=1.0, help="share of the time spent training, 0.05 to 1 "
                   "(default 1: flat out); lower keeps the viewer smooth on a small machine (live in the pane)")
    p.add_argument("--start", action="store_true", help="start training at launch")
    from engine.priors.base import add_prior_option_flags

    add_prior_option_flags(p)  # how Stable Diffusion / IF load and guide (also /prior_options in the API)
    return p


def check_args(args) -> None:
    """Refuse unsafe or impossible settings with one clear line each."""
    if args.host not in LOOPBACK:
        try:
            loop = ipaddress.ip_address(args.host).is_loopback
        except ValueError:
            loop = False
        if not loop and not args.auth:
            raise SystemExit(f"error: --host {args.host} would expose the app beyond this machine; "
                             "add --auth user:pass (or serve on 127.0.0.1)")
    if args.auth and ":" not in args.auth:
        raise SystemExit("error: --auth must look like user:pass")
    for name in ("port", "viewer_port"):
        port = getattr(args, name)
        if not 1 <= port <= 65535:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be in 1..65535; got {port}")
    if args.port == args.viewer_port:
        raise SystemExit("error: --port and --viewer-port must differ")
    from engine.config import checked_util
    from engine.priors.base import prior_options_from

    try:
        prior_options_from(args)
        checked_util(args.train_util)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:  # as servers bind: TIME_WAIT leftovers do not count
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_ports(host: str, ports: dict[str, int]) -> None:
    for flag, port in ports.items():
        if not port_free(host, port):
            raise SystemExit(f"error: port {port} on {host} is taken (is the playground already running?); "
                             f"choose another with {flag} N")


def make_session(args):
    import torch

    from engine.presets import preset_run
    from playground.session import Session

    torch.set_num_threads(max(1, args.threads))
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    flags = {"live.steps": args.steps, "render.resolution": args.resolution, "camera.batch_size": args.batch_size,
             "render.num_samples": args.samples, "field.backbone": args.backbone}
    overrides = {name: value for name, value in flags.items() if value}  # kept when another prior is picked
    # the prior's tuned defaults; the flags override them
    cfg, live = preset_run(args.prior, device, {**overrides, **({"live.prompt": args.prompt} if args.prompt else {})})
    from engine.priors.base import prior_options_from

    return Session(cfg, live, device=device, out_root=args.out, overrides=overrides,
                   prior_options=prior_options_from(args), train_util=args.train_util)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    viewer_host = "127.0.0.1" if args.host in LOOPBACK else args.host
    check_ports(args.host, {"--port": args.port})
    check_ports(viewer_host, {"--viewer-port": args.viewer_port})
    t0 = time.perf_counter()
    import gradio as gr  # noqa: F401  (heavy; imported after the cheap checks)

    from playground.page import LAUNCH
    from playground.panel import Panel
    from playground.viewer import Viewer

    session = make_session(args)
    viewer = Viewer(session, host=viewer_host, port=args.viewer_port, full_res=args.viewer_resolution)
    demo = Panel(session, viewer.url).build()
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    try:
        demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True,
                    share=args.share, auth=auth, show_error=True, allowed_paths=[os.path.abspath(args.out)], **LAUNCH)
    except OSError as err:
        viewer.stop()
        session.stop()
        raise SystemExit(f"error: cannot serve the pane on {args.host}:{args.port}: {err}") from None
    if args.start:
        session.start()
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"DreamFusion Playground ready in {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"  pane:   http://{host}:{args.port}/", flush=True)
    if getattr(demo, "share_url", None):
        print(f"  share:  {demo.share_url}", flush=True)
    print(f"  viewer: {viewer.url}/", flush=True)
    print("Press Ctrl-C to stop.", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    print("shutting down…", flush=True)
    session.pause()  # training stops at a step boundary
    demo.close()
    viewer.stop()
    session.stop()
    try:
        saved = session.save_if_dirty()
        if saved:
            print(f"saved a checkpoint of the run in {saved}", flush=True)
    except Exception as err:  # a full disk must not keep the ports taken
        print(f"could not save a checkpoint: {err}", flush=True)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
