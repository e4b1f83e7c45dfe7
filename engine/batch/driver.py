"""The driver of a batch: hands runs to `Worker` actors one segment of `checkpoint_every` steps at a time,
writes what comes back (checkpoints, exports, manifest) and resends a run whose worker died with its last
checkpoint. `run_batch` is the whole batch in this process; it stops on SIGINT/SIGTERM (between two Ray
calls: every file stays whole) and when its `Watchdog` finds the Ray it runs on dead (`RayDied`)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter, deque
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors

from engine.batch.cluster import ROOT, RayDied, Stopped, Watchdog, bounded, connect, first_line, shutdown, slots
from engine.batch.manifest import batch_key, disk_checkpoint, open_folder, write_manifest
from engine.batch.spec import EXPORTS, RunOutputs, RunSpec, run_config
from engine.batch.worker import Worker
from engine.checkpoint import atomic_write, write_checkpoint

# a finished run's metrics.json (as `python -m engine run` writes one), from its manifest row
METRICS = ("run_id", "prompt", "seed", "prior", "settings", "step", "steps", "wall_s", "its_per_s", "skipped_steps",
           "scores", "node")
WAIT_S = 1.0  # longest a `ray.wait` blocks: how soon a signal or a dead Ray is acted on
GET_S = 120.0  # longest a `ray.get` of a ready reply may take before Ray counts as unresponsive


class _Driver:
    """Hands runs to workers one segment of `every` steps at a time and writes what comes back."""

    def __init__(self, ray, out: Path, key: str, rows: dict, bar, *, every: int, outputs: RunOutputs,
                 max_retries: int, on_event, actor_options: dict, worker_args: tuple):
        self.ray, self.out, self.key, self.rows, self.bar = ray, out, key, rows, bar
        self.every, self.outputs, self.max_retries, self.on_event = every, outputs, max_retries, on_event
        self.actor_options, self.worker_args = actor_options, worker_args
        self.waiting: dict = {}  # ObjectRef -> (actor, spec, or None for a worker's `ready`; time sent)
        self.idle, self.actors, self.pending = [], [], deque()
        self.ckpt: dict[str, tuple[dict, bytes]] = {}  # run id -> its last checkpoint (meta, safetensors bytes)

    def run(self, todo: list[RunSpec], n_workers: int, check=lambda: None) -> None:
        """Until every run of `todo` ends; `check()`, called at least every WAIT_S s, raises to stop."""
        self.pending.extend(todo)
        try:
            for _ in range(n_workers):
                self._new_worker()
            while self.pending or any(spec for _, spec, _ in self.waiting.values()):
                check()
                ready, _ = self.ray.wait(list(self.waiting), num_returns=1, timeout=WAIT_S)
                for ref in ready:
                    self._receive(ref, *self.waiting.pop(ref))
                while self.idle and self.pending:
                    spec = self.pending.popleft()
                    self._send(self.idle.pop(), spec, self.ckpt.get(spec.run_id) or disk_checkpoint(self.out,
                                                                                                    spec.run_id))
        finally:  # also on a stop or a dead Ray: stop the workers; what did not finish is pending again
            bounded(lambda: [self.ray.kill(actor) for actor in self.actors], 3)
            for row in self.rows.values():
                row["status"] = "pending" if row["status"] == "running" else row["status"]
            write_manifest(self.out, self.key, list(self.rows.values()))

    def _new_worker(self) -> None:
        actor = self.ray.remote(Worker).options(**self.actor_options).remote(*self.worker_args)
        self.actors.append(actor)
        self.waiting[actor.ready.remote()] = (actor, None, time.monotonic())

    def _send(self, actor, spec: RunSpec, resume=None) -> None:
        self.rows[spec.run_id]["status"] = "running"
        if resume is not None:
            self.rows[spec.run_id]["resumed_from"].append(resume[0]["step"])
        self.waiting[actor.advance.remote(spec, resume, self.every, self.outputs)] = (actor, spec, time.monotonic())

    def _receive(self, ref, actor, spec: RunSpec | None, sent: float) -> None:
        from ray.exceptions import GetTimeoutError, RayError, RayTaskError

        try:
            reply = self.ray.get(ref, timeout=GET_S)
        except GetTimeoutError:
            raise RayDied(f"Ray did not hand over a finished reply within {GET_S:.0f} s") from None
        except RayError as err:
            if spec is None:  # e.g. the engine does not import on a node: every worker would fail alike
                raise RuntimeError(f"a worker could not start: {first_line(err)}") from None
            if isinstance(err, RayTaskError):  # the run failed (a bad value, a prior that will not load)
                self._end(spec, "failed", f"{type(err.cause).__name__}: {first_line(err.cause)}")
                self.idle.append(actor)
            else:  # the worker or its node died
                self._lost(actor, spec, err, time.monotonic() - sent)
            return
        if spec is not None and not reply.get("done"):  # keep the worker busy; then write what came back
            self.waiting[actor.advance.remote(spec, None, self.every, self.outputs)] = (actor, spec, time.monotonic())
        if spec is not None:
            self._checkpoint(spec, reply)
        if spec is None or reply.get("done"):
            self.idle.append(actor)

    def _checkpoint(self, spec: RunSpec, reply: dict) -> None:
        row, folder = self.rows[spec.run_id], self.out / spec.run_id
        self.ckpt[spec.run_id] = (reply["meta"], reply["weights"])
        write_checkpoint(folder, reply["meta"], load_tensors(reply["weights"]))
        row.update(step=reply["step"], steps=reply["meta"]["live"]["steps"], wall_s=round(reply["train_s"], 2),
                   its_per_s=round(reply["its_per_s"], 2), node=reply["node"])
        if reply["scores"]:
            row["scores"] = {**row.get("scores", {}), **reply["scores"]}
        self.on_event({"kind": "checkpoint", "run_id": spec.run_id, "step": reply["step"], "pid": reply["pid"],
                       "its_per_s": reply["its_per_s"]})
        if reply.get("done"):
            for kind, data in reply["files"].items():
                atomic_write(folder / EXPORTS[kind], lambda p, d=data: Path(p).write_bytes(d))
            row.update(reply["evaluation"], files={k: f"{spec.run_id}/{EXPORTS[k]}" for k in reply["files"]},
                       eval_s=reply["eval_s"], export_s=reply["export_s"], skipped_steps=reply["skipped_steps"])
            metrics = {k: row.get(k) for k in METRICS if k in row} | {"evaluation": reply["evaluation"]}
            atomic_write(folder / "metrics.json", lambda p: Path(p).write_text(json.dumps(metrics, indent=2)))
            errors = "; ".join(f"{k}: {v}" for k, v in reply["export_errors"].items())
            self._end(spec, "done", f"export failed: {errors}" if errors else "")
        self._progress()

    def _lost(self, actor, spec: RunSpec, err, lost_s: float) -> None:
        """A worker died: a new one takes its place and the run goes back to the queue's front (resent with its
        last checkpoint), unless it has died `max_retries` times already."""
        self.actors.remove(actor)
        self._new_worker()
        row = self.rows[spec.run_id]
        row["attempts"] += 1
        row["steps_redone"] += min(self.every, round(lost_s * (row["its_per_s"] or 0)))  # estimated from its speed
        self.on_event({"kind": "lost", "run_id": spec.run_id, "step": row["step"], "pid": None})
        if row["attempts"] > self.max_retries:
            self._end(spec, "failed", f"its worker died {row['attempts']} times; last: {first_line(err)}")
        else:
            self.pending.appendleft(spec)

    def _end(self, spec: RunSpec, status: str, message: str = "") -> None:
        self.rows[spec.run_id].update(status=status, message=message)
        self.ckpt.pop(spec.run_id, None)  # the driver keeps checkpoints of unfinished runs only
        self.bar.update(1)
        write_manifest(self.out, self.key, list(self.rows.values()))  # before the event: its hearers may read it
        self.on_event({"kind": status, "run_id": spec.run_id, "step": self.rows[spec.run_id]["step"], "pid": None})

    def _progress(self) -> None:
        count = Counter(r["status"] for r in self.rows.values())
        speeds = ", ".join(f"{r['run_id'][:18]} {r['its_per_s'] or 0:.0f} it/s" for r in self.rows.values()
                           if r["status"] == "running")
        self.bar.set_postfix_str(f"failed {count['failed']}, running {count['running']} | {speeds}")


class _Signals:
    """While entered (in the main thread): SIGINT and SIGTERM only ask the batch to stop (`check` raises
    `Stopped` at the driver's next look, within WAIT_S); a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self):
        self.signum, self.saved = None, {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT == signum:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def check(self) -> None:
        if self.signum:
            raise Stopped(self.signum)


def prepare(runs: list[RunSpec], out: Path, outputs: RunOutputs, gpus_per_run: float | None, address: str):
    """The refusals that need no Ray (ValueError, RuntimeError) and (batch key, rows, runs to do); a run with a
    bad line or value fails here, before Ray starts. Writes nothing."""
    if len({r.run_id for r in runs}) < len(runs):
        raise ValueError("the batch asks for the same run (prompt, seed, prior, steps, settings) twice")
    if set(outputs.exports) - set(EXPORTS):
        raise ValueError(f"--export {','.join(outputs.exports)}: choose from {', '.join(EXPORTS)}")
    if gpus_per_run and not address and not torch.cuda.is_available():
        raise RuntimeError(f"--gpus-per-run {gpus_per_run:g}: this machine has no CUDA GPU (use --gpus-per-run 0)")
    key = batch_key(runs, outputs)
    rows = open_folder(out, key, runs)
    todo = []
    for spec in (r for r in runs if rows[r.run_id]["status"] != "done"):
        try:
            rows[spec.run_id]["steps"] = run_config(spec)[1].steps
            todo.append(spec)
        except (ValueError, TypeError) as err:
            rows[spec.run_id].update(status="failed", message=str(err))
    return key, rows, todo


def run_batch(runs: list[RunSpec], out: str | Path, *, outputs: RunOutputs = RunOutputs(), address: str = "",
              workers: int | None = None, cpus_per_run: float = 1, gpus_per_run: float | None = None,
              max_retries: int = 2, checkpoint_every: int = 200, progress: bool = True, on_event=None,
              on_dead=None) -> list[dict]:
    """Run `runs` on Ray; their manifest rows, in the order of `runs`.

    Runs done in `out` are skipped; an interrupted one resumes from the checkpoint in its folder. Refusals
    (RuntimeError, ValueError; one line) come before anything starts. A run with a bad line or value fails
    alone, its message in the manifest. SIGINT or SIGTERM (Ctrl-C) stops the workers and the local Ray this
    started, keeps every finished run and checkpoint and raises `Stopped` (a KeyboardInterrupt); a Ray node or
    cluster that dies raises `RayDied` (also telling `on_dead(words)` at once, from the watchdog's thread).
    `on_event(dict)` hears of each checkpoint, lost worker and end of a run, and of the shutdown of a local Ray
    ({"kind": "shutdown"})."""
    out, on_event = Path(out), on_event or (lambda event: None)
    key, rows, todo = prepare(runs, out, outputs, gpus_per_run, address)
    if todo:
        _run_on_ray(todo, out, key, rows, len(runs), on_event, on_dead, outputs=outputs, address=address,
                    workers=workers, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run, max_retries=max_retries,
                    checkpoint_every=checkpoint_every, progress=progress)
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, key, list(rows.values()))
    return [rows[r.run_id] for r in runs]


def _run_on_ray(todo, out: Path, key: str, rows: dict, total: int, on_event, on_dead, *, outputs, address, workers,
                cpus_per_run, gpus_per_run, max_retries, checkpoint_every, progress) -> None:
    from tqdm import tqdm

    ray, started, endpoint = connect(address)
    watchdog = Watchdog(ray, address, endpoint, on_dead=on_dead)
    try:
        with watchdog, _Signals() as signals:
            def check():
                signals.check()
                if watchdog.dead:
                    raise RayDied(watchdog.dead)

            gpus, n = slots(ray, cpus_per_run, gpus_per_run, workers, len(todo))
            options = {"num_cpus": cpus_per_run, "num_gpus": gpus, "max_restarts": 0}
            if not address and Path.cwd().resolve() != ROOT:  # Ray's local workers see the driver's folder
                options["runtime_env"] = {"env_vars": {"PYTHONPATH": str(ROOT)}}
            out.mkdir(parents=True, exist_ok=True)
            with tqdm(total=total, initial=total - len(todo), unit="run", disable=not progress) as bar:
                _Driver(ray, out, key, rows, bar, every=checkpoint_every, outputs=outputs, max_retries=max_retries,
                        on_event=on_event, actor_options=options,
                        worker_args=("cuda" if gpus else "cpu", max(1, int(cpus_per_run)))).run(todo, n, check)
    finally:
        if started:
            on_event({"kind": "shutdown", "run_id": None, "step": None, "pid": None})
            watchdog.tree.add(watchdog.tops)
            shutdown(ray, list(watchdog.tree.procs.values()))
