"""Exports and previews: the session's slow work, on one worker thread, never the training thread.

Each job copies what it needs under the session lock (milliseconds), releases it, then works, so training
never waits for a video or a mesh. An export is of the field that was asked for or of nothing: if its run was
reset, switched to another prior or closed before the export began, it writes nothing and raises
`ExportRefused`. The preview strip (four fixed views of each run, A above B) is rendered on the same thread from
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

from engine import export as engine_export
from engine.cameras import preview_cameras
from engine.checkpoint import checkpoint_state, save_checkpoint, write_checkpoint
from engine.config import quoted
from engine.source import RenderSource
from engine.texture import check_budget
from engine.trainer import Trainer
from playground.runs import Run, named_run
from playground.snapshot import render_sources

log = logging.getLogger(__name__)

EXPORTS = ("checkpoint", "snapshot", "video", "mesh")
TEXTURED = "textured"  # a UV-textured .glb (faces=, texture=): its own kind, with its own pane button (meshpane.py)
EXPORT_DEFAULTS = {"video": {"frames": 60, "size": 128}, "mesh": {"resolution": 96},  # sized for a CPU
                   TEXTURED: {"faces": 20_000, "texture": 1024, "resolution": 128}}
REPORTS_MAX = 50  # report lines a long session keeps


class ExportRefused(RuntimeError):
    """An export whose run was reset, switched or closed before it started: nothing was written."""


def export(session, kind: str, run: str = "A", **kwargs) -> concurrent.futures.Future:
    """Submit an export of a run: "checkpoint", "snapshot", "video" or "mesh". The future gives {name: path},
    or raises ExportRefused when the run was reset, switched or closed before the export began."""
    return session.worker.export(kind, named_run(session.runs, run), **kwargs)


def preview(session) -> tuple[int, object] | None:
    """(token, [H, 4W, 3] uint8) of the fixed preview views (A above B while forked), or None. The token changes
    when the image does; a new image is rendered on the worker thread."""
    return session.worker.preview(render_sources(session))


def save_if_dirty(session) -> Path | None:
    """After `stop`: checkpoint each run with steps no checkpoint holds yet; run A's folder (else B's), or None."""
    saved = session.worker.save_dirty()
    return saved[0] if saved else None


class Worker:
    """The session's worker thread and what it made: export reports and the latest preview.

    lock: the session lock; runs: the session's current runs (a callable: the list is replaced whole);
    out_root: where run folders are made; preview_size: the side of each preview view in pixels.
    """

    def __init__(self, *, lock: threading.Lock, runs: Callable[[], list[Run]], out_root: Path, preview_size: int):
        self.lock, self.runs, self.out_root, self.preview_size = lock, runs, Path(out_root), preview_size
        self.reports: list[str] = []  # one line per finished export: what was written, or why not
        self.latest_preview: tuple[int, object] | None = None  # (token of the snapshots, image [H, 4W, 3] uint8)
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
        future = self._pool.submit(self._export, run, trainer, kind, kwargs)

        def report(f: concurrent.futures.Future) -> None:
            self.reports.append(f"{label} failed: {f.exception()}" if f.exception() else
                                f"{label}: " + ", ".join(str(p) for p in f.result().values()))
            del self.reports[:-REPORTS_MAX]

        future.add_done_callback(report)
        return future

    def _export(self, run: Run, trainer: Trainer, kind: str, kwargs: dict) -> dict:
        with self.lock:  # copy what the export needs; the slow part runs after the lock is released
            runs = self.runs()
            if run.trainer is not trainer or run not in runs:
                what = "closed" if run not in runs else "reset or switched to another prior"
                raise ExportRefused(f"nothing was written: run {run.name} was {what} before the {kind} began; "
                                    "press Export again for the current field")
            live = run.used
            run_dir = run.folder(self.out_root, engine_export.run_folder, named=len(runs) > 1)
            if kind == "checkpoint":
                state = checkpoint_state(trainer, live)
                key = (id(trainer), trainer.step_count)
            else:
                source = RenderSource.from_trainer(trainer)
        if kind == "checkpoint":
            write_checkpoint(run_dir, *state)
            run.saved = key
            return {"checkpoint": str(run_dir)}
        if kind == "snapshot":
            paths = engine_export.snapshot(source, live, run_dir, **kwargs)
            return {k: str(v) for k, v in paths.items()}
        if kind == "video":
            return {"video": str(engine_export.write_orbit_video(source, run_dir / "orbit.mp4", live=live, **kwargs))}
        if kind == TEXTURED:
            return {"mesh": str(engine_export.export_textured_mesh(source, run_dir / "mesh_textured.glb", **kwargs)["files"][0])}
        return {"mesh": str(engine_export.export_mesh(source, run_dir / "mesh.glb", **kwargs))}

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

    # -- the preview strip ---------------------------------------------------------------------------
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
            rows = []
            for _, snap, live in sources:
                with torch.no_grad():
                    img = snap.render(preview_cameras(), self.preview_size, self.preview_size, "lambertian", live=live)
                rows.append(engine_export.tile(img))
            self.latest_preview = (token, np.concatenate(rows, axis=0))
        except Exception:
            log.exception("preview render failed")
        finally:
            self._preview_busy = False
