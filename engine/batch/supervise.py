"""`python -m engine batch` runs the batch's driver (`run_batch`) in a process of its own (`child.py`) and
watches it from this one, which never touches Ray: a Ray that dies can block its driver for good, or end it
at once (Ray's core worker exits its process when its raylet's object store goes away), and this process still
stops everything within seconds and says what died.

It watches, every `POLL_S` s, the driver and the processes under it (the local Ray it started: GCS server,
raylet, agents, workers). When a Ray service dies, or the driver's watchdog tells of a dead cluster, or SIGINT
or SIGTERM comes, it asks the driver to stop (SIGTERM, or the SIGINT it got) and gives it `GRACE_S` s to
stop its workers and its Ray and write the manifest; then it kills whatever is left of that process tree."""

from __future__ import annotations

import json
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from engine.batch.cluster import ROOT, ProcessTree, alive, kill_all

POLL_S = 0.25
GRACE_S = 6.0


@dataclass
class Outcome:
    """How a supervised batch ended: `kind` "result" (detail: runs by status), "error" (a refusal or a worker
    that could not start: its message), "stopped" (the signal number) or "dead" (what died, in words)."""

    kind: str
    detail: object


class _Supervisor:
    def __init__(self, job: dict):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "ENGINE_BATCH_SUPERVISOR": str(os.getpid())}
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.batch.child"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, start_new_session=True)
        self.messages: queue.Queue = queue.Queue()
        self.final: dict = {}  # the driver's last word: {"result": ...}, {"error": ...}, {"dead": ...}
        self.tree = ProcessTree()  # the processes under the driver, as seen so far
        self.signum = self.dead = self.deadline = None
        self.closing = False  # the driver is shutting its Ray down: Ray's services go away on purpose
        threading.Thread(target=self._read, daemon=True, name="batch-driver-messages").start()
        self.proc.stdin.write(pickle.dumps(job))
        self.proc.stdin.close()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.messages.put(json.loads(line))
            except ValueError:
                pass

    def run(self) -> Outcome:
        saved = self._install()
        try:
            while self.proc.poll() is None:
                self._look()
                if self.deadline is not None and time.monotonic() > self.deadline:
                    self._kill_tree()
                    break
                time.sleep(POLL_S)
            self.proc.wait()
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
        self._look(after=True)
        kill_all(self.tree.procs.values(), grace=1.0)  # what the driver left: workers of a dead raylet, say
        return self._outcome()

    def _install(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _on_signal(self, signum, frame) -> None:
        if self.signum == signal.SIGINT == signum:  # a second Ctrl-C: no more waiting
            self.deadline = time.monotonic()
        self.signum = self.signum or signum
        self._stop(signum)

    def _stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask the driver to stop; it has GRACE_S s."""
        try:
            os.kill(self.proc.pid, signum)
        except ProcessLookupError:
            pass
        self.deadline = min(self.deadline or time.monotonic() + GRACE_S, time.monotonic() + GRACE_S)

    def _look(self, after: bool = False) -> None:
        """Read the driver's messages, note new processes under it, and act on a dead Ray service."""
        import psutil

        self._drain()
        try:
            self.tree.add(psutil.Process(self.proc.pid).children())
        except psutil.Error:
            pass
        what = self.tree.dead_service()
        if what and not after:
            time.sleep(POLL_S)  # the driver's "shutdown" note may be on its way: then Ray went down on purpose
            self._drain()
        if what and not (self.dead or self.closing or self.signum or "result" in self.final):
            self.dead = f"{what}, taking the local Ray node down"
            if not after:
                self._stop()

    def _drain(self) -> None:
        while not self.messages.empty():
            msg = self.messages.get()
            self.closing |= bool(msg.get("shutdown"))
            self.final.update({k: v for k, v in msg.items() if k != "shutdown"})
            if msg.get("dead") and not self.dead:
                self.dead = msg["dead"]
                self._stop()

    def _kill_tree(self) -> None:
        import psutil

        procs = [p for p in self.tree.procs.values() if alive(p)]
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.kill()
        psutil.wait_procs(procs, timeout=2)

    def _outcome(self) -> Outcome:
        if "result" in self.final:
            return Outcome("result", self.final["result"])
        if self.signum:
            return Outcome("stopped", self.signum)
        if self.dead:
            return Outcome("dead", self.dead)
        if "error" in self.final:
            return Outcome("error", self.final["error"])
        rc = self.proc.returncode
        how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
        return Outcome("dead", f"the batch's driver process (pid {self.proc.pid}) {how}")


def supervise(job: dict) -> Outcome:
    """Run the batch `job` (`run_batch`'s keyword arguments) in a driver process and watch it; how it ended."""
    return _Supervisor(job).run()
