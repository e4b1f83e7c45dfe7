"""Exports and previews: the session's slow work, on one worker thread, never the training thread.

Each job copies what it needs under the session lock (milliseconds), releases it, then works, so training
never waits for a video or a mesh. An export is of the field that was asked for or of nothing: if its run was
reset, switched to another prior or closed before the export began, it writes nothing and raises
`ExportRefused`. The preview (four fixed views of each run in a 2 × 2 grid, B right of A) is rendered on the same thread from
the viewer's frozen copies (`Snapshot`). `export(session, ...)`, `preview(session)` and `save_if_dirty(session)`
are the session's (`Session.export`...); the `Worker` it holds does the work.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine import export as engine_export
from engine.cameras import preview_cameras
from engine.checkpoint import META, WEIGHTS, atomic_write, checkpoint_state, save_checkpoint, write_checkpoint
from engine.config import quoted
from engine.source import RenderSource
from engine.texture import check_budget
from engine.trainer import Trainer
from playground.runs import Run, named_run
from playground.snapshot import render_sources

log = logging.getLogger(__name__)

EXPORTS = ("checkpoint", "snapshot", "video", "mesh")
TEXTURED = "textured"  # a UV-textured .glb (faces=, texture=): its own kind, with its own pane button (meshpane.py)
# a 512² 60-frame orbit renders once for both files (~65 s on one core of a busy shared 2-core CPU)
EXPORT_DEFAULTS = {"video": {"frames": 60, "size": 512, "fps": 30}, "mesh": {"resolution": 96},
                   TEXTURED: {"faces": 20_000, "texture": 1024, "resolution": 128}}
SNAPSHOT_SIDE = 512  # a snapshot's long side while no viewer has shown the field (else the viewer's frame size)
REPORTS_MAX = 50  # report lines a long session keeps


class ExportRefused(RuntimeError):
    """An export whose run was reset, switched or closed before it started: nothing was written."""


def export(session, kind: str, run: str = "A", **kwargs) -> concurrent.futures.Future:
    """Submit an export of a run: "checkpoint", "snapshot", "video" or "mesh". The future gives {name: path},
    or raises ExportRefused when the run was reset, switched or closed before the export began."""
    return session.worker.export(kind, named_run(session.runs, run), **kwargs)


def preview(session) -> tuple[int, object] | None:
    """(token, [2S, 2S, 3] uint8) of the four fixed preview views in a 2 × 2 grid (B right of A while forked), or
    None. The token changes
    when the image does; a new image is rendered on the worker thread."""
    return session.worker.preview(render_sources(session))


def save_if_dirty(session) -> Path | None:
    """After `stop`: checkpoint each run with steps no checkpoint holds yet; run A's folder (else B's), or None."""
    saved = session.worker.save_dirty()
    return saved[0] if saved else None


def make(kind: str, source: RenderSource, live, run_dir: Path, *, view, state, **kwargs) -> tuple[dict, list]:
    """Write one export of a frozen field into `run_dir`: ({name: path} as the API returns it, [(what, file)]).

    A snapshot is the viewer's last view at its frame size (else the three-quarter view, SNAPSHOT_SIDE square;
    `size` asks for a square one) with the checkpoint of its step; a video is one orbit, rendered once and
    written as mp4 and GIF."""
    step, run_dir = source.step, Path(run_dir)
    result, files = {}, []
    if state is not None:  # checkpoint, snapshot: the weights and settings of this step
        write_checkpoint(run_dir, *state)
        result["checkpoint"] = run_dir
        files += [("checkpoint (safetensors weights)", run_dir / WEIGHTS), ("checkpoint (settings, JSON)", run_dir / META)]
    if kind == "snapshot":
        seen = view is not None and not kwargs  # the viewer's view, unless a size or camera was asked for
        if seen:
            cams, h, w = view
            png = engine_export.save_png(engine_export.tile(source.image(cams, h, w, "lambertian", live)),
                                         run_dir / f"snapshot-{step}-lambertian.png")
        else:
            png = engine_export.snapshot(source, live, run_dir, **{"size": SNAPSHOT_SIDE, **kwargs})["png"]
        result = {"png": png, **result}
        with Image.open(png) as im:
            where = " of the viewer's view" if seen else ""
            files.insert(0, (f"snapshot{where}, {im.width}×{im.height} PNG", png))
    elif kind == "video":
        result, more = orbit_videos(source, live, run_dir, **kwargs)
        files += more
    elif kind == "mesh":
        mesh = engine_export.export_mesh(source, run_dir / f"mesh-{step}.glb", **kwargs)
        result, files = {"mesh": mesh}, [("mesh, glb with vertex colours", mesh)]
    elif kind == TEXTURED:
        made = engine_export.export_textured_mesh(source, run_dir / f"mesh_textured-{step}.glb", **kwargs)
        mesh = Path(made["files"][0])
        result, files = {"mesh": mesh}, [(f"textured mesh, glb ({made['faces']} faces, {made['texture']}² texture)", mesh)]
    return result, files


def orbit_videos(source: RenderSource, live, run_dir: Path, *, frames: int, size: int, fps: int = 30,
                 elevation: float = 15.0, mode: str = "lambertian") -> tuple[dict, list]:
    """One turn around the field, rendered once, as orbit-<step>.mp4 and .gif (each written atomically)."""
    if not isinstance(frames, int) or not 1 <= frames <= 3600 or not isinstance(size, int) or not 16 <= size <= 2048:
        raise ValueError(f"a video needs 1-3600 frames of 16-2048 px; got {quoted(frames)} frames of {quoted(size)} px")
    images = list(engine_export.orbit_frames(source, frames=frames, size=size, elevation=float(elevation), mode=mode,
                                             side_by_side=False, live=live))
    mp4, gif = (run_dir / f"orbit-{source.step}{suffix}" for suffix in (".mp4", ".gif"))
    # the engine's writers, fed the frames rendered once (write_orbit_video would render them again per file)
    atomic_write(mp4, lambda tmp: engine_export.write_mp4(tmp, iter(images), fps))
    atomic_write(gif, lambda tmp: engine_export.write_gif(tmp, iter(images), fps))
    what = f"{frames} frames, {size}×{size}"
    return {"video": mp4, "gif": gif}, [(f"orbit video, {what} mp4", mp4), (f"orbit video, {what} GIF", gif)]


class Worker:
    """The session's worker thread and what it made: export reports and the latest preview.

    lock: the session lock; runs: the session's current runs (a callable: the list is replaced whole);
    out_root: where run folders are made; preview_size: the side of each preview view in pixels.
    """

    def __init__(self, *, lock: threading.Lock, runs: Callable[[], list[Run]], out_root: Path, preview_size: int):
        self.lock, self.runs, self.out_root, self.preview_size = lock, runs, Path(out_root), preview_size
        self.reports: list[str] = []  # one line per finished export: what was written, or why not
        self.made: list[dict] = []  # every file exported, oldest first: {"what", "path"} (a path rewritten: its latest)
        self.view: tuple | None = None  # (Cameras, H, W) of the viewer's last frame at rest: what a snapshot shows
        self.latest_preview: tuple[int, object] | None = None  # (token of the snapshots, image [2S, 2S x runs, 3] uint8)
        self._preview_busy = False
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="session-work")

    def submit(self, fn, *args) -> concurrent.futures.Future:
        """Run `fn(*args)` on the worker thread, after the jobs queued before it."""
        return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)  # a running preview or export ends first

    # -- exports -------------------------------------------------------------------------------------
    def export(self, kind: str, run: Run, **kwargs) -> concurrent.futures.Future:
        """Submit an export of `run`'s current field; the future gives {name: path} or raises ExportRefused."""
        if kind not in (*EXPORTS, TEXTURED):
            raise ValueError(f"export must be one of {', '.join((*EXPORTS, TEXTURED))}; got {quoted(kind)}")
        kwargs = {**EXPORT_DEFAULTS.get(kind, {}), **kwargs}
        if kind == TEXTURED:
            check_budget(kwargs["faces"], kwargs["texture"])  # refused now, in one line, not on the worker
        trainer = run.trainer  # the field asked for: the export is of this trainer or of nothing
        if trainer is None:
            raise ValueError("nothing to export yet: start a run first")
        label = kind if len(self.runs()) == 1 else f"{kind} of run {run.name}"
        future = self._pool.submit(self._export, run, trainer, kind, kwargs, label)

        def report(f: concurrent.futures.Future) -> None:
            self.reports.append(f"{label} failed: {f.exception()}" if f.exception() else
                                f"{label}: " + ", ".join(str(p) for p in f.result().values()))
            del self.reports[:-REPORTS_MAX]

        future.add_done_callback(report)
        return future

    def files(self) -> list[dict]:
        """Every file this session exported, newest first: {"what": words, "path": str}."""
        return self.made[::-1]

    def _export(self, run: Run, trainer: Trainer, kind: str, kwargs: dict, label: str) -> dict:
        with self.lock:  # copy what the export needs; the slow part runs after the lock is released
            runs = self.runs()
            if run.trainer is not trainer or run not in runs:
                what = "closed" if run not in runs else "reset or switched to another prior"
                raise ExportRefused(f"nothing was written: run {run.name} was {what} before the {kind} began; "
                                    "press Export again for the current field")
            live = run.used
            run_dir = run.folder(self.out_root, engine_export.run_folder, named=len(runs) > 1)
            state = checkpoint_state(trainer, live) if kind in ("checkpoint", "snapshot") else None
            key, source = (id(trainer), trainer.step_count), RenderSource.from_trainer(trainer)
        result, files = make(kind, source, live, run_dir, view=self.view, state=state, **kwargs)
        if state is not None:
            run.saved = key
        for what, path in files:
            self.made = [m for m in self.made if m["path"] != str(path)] + [
                {"what": f"{label} at step {source.step}: {what}", "path": str(path)}]
        return {name: str(path) for name, path in result.items()}

    def save_dirty(self) -> list[Path]:
        """Checkpoint each run with steps no checkpoint holds yet (on this thread: the session has stopped)."""
        runs, saved = self.runs(), []
        for run in runs:
            tr = run.trainer
            if tr is None or tr.step_count == 0 or run.saved == (id(tr), tr.step_count):
                continue
            folder = run.folder(self.out_root, engine_export.run_folder, named=len(runs) > 1)
            with self.lock:
                save_checkpoint(tr, folder, run.used)
            run.saved = (id(tr), tr.step_count)
            saved.append(folder)
        return saved

    # -- the preview ---------------------------------------------------------------------------
    def preview(self, sources: list) -> tuple[int, object] | None:
        """The latest (token, image) of `sources` ((name, snapshot, live) of each run); a new one is rendered on
        the worker when the snapshots changed. The token changes when the image does."""
        if not sources:
            return None
        cached, token = self.latest_preview, hash(tuple(snap.key for _, snap, _ in sources))
        if (cached is None or cached[0] != token) and not self._preview_busy:
            self._preview_busy = True
            self._pool.submit(self._render_preview, sources, token)
        return cached

    def _render_preview(self, sources: list, token: int) -> None:
        try:
            grids = []
            for _, snap, live in sources:
                with torch.no_grad():
                    img = snap.render(preview_cameras(), self.preview_size, self.preview_size, "lambertian", live=live)
                grids.append(grid(engine_export.to_uint8(img)))
            self.latest_preview = (token, np.concatenate(grids, axis=1))
        except Exception:
            log.exception("preview render failed")
        finally:
            self._preview_busy = False


def grid(views: np.ndarray) -> np.ndarray:
    """Four views [4, S, S, 3] as a 2 × 2 image [2S, 2S, 3]: front, side above back, overhead."""
    return np.concatenate([np.concatenate(list(views[i:i + 2]), axis=1) for i in (0, 2)], axis=0)
