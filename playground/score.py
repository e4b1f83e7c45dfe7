"""The live score: the toy R-Precision (engine.evaluate) of each run's current field, every few seconds.

It runs on its own thread, never the training thread: under the session lock it takes a frozen copy of a
run's field (`RenderSource.from_trainer`, milliseconds), then renders and classifies that copy with the
lock released. Only prompts the procedural world's vocabulary names (`parse_prompt`: a colour, a shape)
are scored; a run's field is scored again only once it has changed. Beside the R-Precision (a share of
views: 1.00 once the object has formed) it keeps the silhouette IoU with the prompted solid, a continuous
quantity that still tells two formed runs apart. The cost is kept small: a few views at 32 px (the
classifier's own size); `costs` holds the seconds each score took.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import torch

from engine.evaluate import evaluate, load_classifier, parse_prompt
from engine.source import RenderSource

log = logging.getLogger(__name__)


def render_fn_of(source: RenderSource, size: int):
    """evaluate()'s render_fn for a frozen copy: (rgb [B, 3, S, S], opacity [B, 1, S, S]) on the CPU."""
    def fn(cams, light, shading):
        out = source.render(cams, size, size, shading, light=light)
        return out.rgb.cpu(), out.opacity.cpu()
    return fn


class Scorer:
    """Scores the runs that `runs()` returns, every `every_s` seconds, on its own thread.

    runs: the session's current runs (each with `trainer`, `used`, `add_score`); lock: the session lock.
    n_views / size: views per score and their side in pixels (the same views every time: seed 0).
    """

    def __init__(self, *, runs, lock: threading.Lock, every_s: float = 5.0, n_views: int = 6, size: int = 32):
        self.runs, self.lock, self.every_s, self.n_views, self.size = runs, lock, every_s, n_views, size
        self.costs: collections.deque = collections.deque(maxlen=100)  # seconds per score
        self.unavailable: str | None = None  # why nothing can be scored (no classifier), once known
        self._classifier = None
        self._scored: dict[str, tuple] = {}  # run name -> (id(trainer), step) last scored
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scorer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            for run in list(self.runs()):
                if self._stop.is_set() or self.unavailable:
                    return
                try:
                    self.score(run)
                except Exception:  # a failed score is logged; training and the next score go on
                    log.exception("live score of run %s failed", run.name)

    def _load(self):
        if self._classifier is None:
            try:
                self._classifier = load_classifier()
            except FileNotFoundError as err:
                self.unavailable = str(err)
                log.warning("no live score: %s", err)
                return None
        return self._classifier

    def score(self, run) -> dict | None:
        """Score `run` now if its prompt names a colour or a shape and its field changed; the score, or None."""
        prompt = run.used.prompt
        if parse_prompt(prompt) == (None, None):
            return None
        with self.lock:  # a copy of the field of one step; rendering it needs no lock
            trainer = run.trainer
            if trainer is None or self._scored.get(run.name) == (id(trainer), trainer.step_count):
                return None
            source = RenderSource.from_trainer(trainer)
        classifier = self._load()
        if classifier is None:
            return None
        t0 = time.perf_counter()
        with torch.no_grad():
            result = evaluate(render_fn_of(source, self.size), prompt, n_views=self.n_views, seed=0,
                              classifier=classifier)
        self.costs.append(time.perf_counter() - t0)
        score = {"step": source.step, "color_r_precision": result.get("colour_r_precision"),
                 "geometry_r_precision": result.get("geometry_r_precision"),
                 "shape_score": result.get("shape_score")}  # silhouette IoU: still moves once R-P reads 1.00
        self._scored[run.name] = (id(trainer), source.step)
        return score if run.add_score(trainer, score) else None
